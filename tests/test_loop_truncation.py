"""Loop truncation: `stop_on_repetition` per request and as a server setting
(`--stop-on-repetition`, thresholds `--loop-max-period/--loop-min-repeats/--loop-min-span`),
off by default so greedy output stays PEFT's."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.output import detect_loop
from tests.apiutil import settings

PROMPT = "Once upon a time"  # the tiny random model repeats one token three times within ~12 tokens
LOOSE = dict(loop_max_period=1, loop_min_repeats=3, loop_min_span=3)


def test_detect_loop_thresholds():
    assert detect_loop([1, 2, 3] + [7] * 32)  # period 1 over the default 32-token span
    assert not detect_loop([1, 2, 3] + [7] * 31)
    assert detect_loop([5, 6] * 16)  # period 2, 16 repeats, span 32
    assert not detect_loop([5, 6] * 16, max_period=1)
    assert detect_loop([9, 7, 7, 7], 1, 3, 3) and not detect_loop([9, 7, 7], 1, 3, 3)
    assert not detect_loop([1, 2, 3, 1, 2, 3], 3, 3, 6) and detect_loop([1, 2, 3] * 3, 3, 3, 9)


def _first_loop(ids: list[int], period: int, repeats: int, span: int) -> int | None:
    return next((n for n in range(1, len(ids) + 1) if detect_loop(ids[:n], period, repeats, span)), None)


@pytest.fixture(scope="module")
def clients(tiny_model_dir, tmp_path_factory):
    """Two servers (apps) on one model: defaults, and loop truncation on with loose thresholds."""
    base = dict(model_dir=tiny_model_dir)
    with TestClient(create_app(settings(data_dir=tmp_path_factory.mktemp("loop-off"), **base))) as off, \
            TestClient(create_app(settings(data_dir=tmp_path_factory.mktemp("loop-on"), stop_on_repetition=True,
                                           **LOOSE, **base))) as on:
        model = off.app.state.runtime.model_id
        yield off, on, model


def _ask(client, model, **kw):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_off_by_default_and_per_request(clients):
    off, _, model = clients
    full = _ask(off, model)
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == 40
    # the default thresholds find no loop here; the request's own switch uses the server's thresholds
    assert _first_loop(full["token_ids"], 16, 4, 32) is None
    assert _ask(off, model, stop_on_repetition=True) == full


def test_server_setting_truncates_at_the_first_loop(clients):
    off, on, model = clients
    full = _ask(off, model)["token_ids"]
    cut = _first_loop(full, 1, 3, 3)
    assert cut is not None and cut < 40
    got = _ask(on, model)
    assert got["finish_reason"] == "repetition"
    assert got["token_ids"] == full[:cut]  # the same greedy tokens, ended where the loop became one
    # a request can turn it off again on that server
    again = _ask(on, model, stop_on_repetition=False)
    assert again["finish_reason"] == "length" and again["token_ids"] == full
    # streamed: the same tokens and reason
    r = on.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                         "ignore_eos": True, "stream": True, "return_token_ids": True})
    chunks = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == full[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "repetition"


def test_thresholds_are_validated(tiny_model_dir, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings(tiny_model_dir, tmp_path, loop_min_repeats=1)
    with pytest.raises(ValidationError):
        settings(tiny_model_dir, tmp_path, loop_max_period=0)
