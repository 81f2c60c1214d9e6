"""Issue 3 end to end: a server started first; training registers straight into the
registry; the server picks the new version up on its own (its registry poll reloads the task
table and computes the new version's prefix before any request); export loads in PEFT;
rollback. The reload's latency is printed, not asserted: it is a poll interval plus whatever
the machine is doing (`reload_interval` in server/settings.py)."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import torch

from server.cli.tasks import main as tasks_main
from tests.peft_ref import peft_greedy
from tests.serverutil import running_server
from training.train import main as train_main

pytestmark = pytest.mark.slow  # a real `polyprompt serve` subprocess, and a training run

MEMO = [
    ("Review: a wonderful film\nSentiment:", " positive"),
    ("Review: dull and far too long\nSentiment:", " negative"),
    ("Capital of France:", " Paris"),
    ("Capital of Japan:", " Tokyo"),
]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("live-data")
    with running_server(tiny_model_dir, data_dir) as url:
        yield url, data_dir


def _complete(url, task, prompt, max_tokens=4):
    r = httpx.post(f"{url}/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": max_tokens,
                                                  "temperature": 0, "return_token_ids": True}, timeout=60)
    return r


def _seconds_until(predicate, what: str, timeout: float = 60.0) -> float:
    """Poll `predicate` until true (generous `timeout`: this asserts that it happens, not how
    fast); print and return how long it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            took = time.monotonic() - t0
            print(f"{what}: after {took:.2f}s")
            return took
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def _counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^polyprompt_prefix_cache_{name}_total (\S+)", text, re.M).group(1))


def _table_size(url: str) -> int:
    """How many tasks the server's own task table holds (not the registry's count)."""
    return httpx.get(f"{url}/health").json()["tasks"]


def test_train_registers_and_server_picks_it_up(live, tiny_model_dir, tmp_path, capsys):
    url, data_dir = live
    assert _complete(url, "memo", MEMO[0][0]).status_code == 404
    tasks, computed, misses = _table_size(url), _counter(url, "computed"), _counter(url, "misses")
    data = tmp_path / "memo.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in MEMO))
    common = ["--data-dir", str(data_dir), "--model", str(tiny_model_dir), "--no-progress"]
    rc = train_main(["--task", "memo", "--data", str(data), "--create", "--epochs", "150", "--lr", "0.3",
                     "--num-virtual-tokens", "8", "--batch-size", "4", "--seed", "1", *common])
    assert rc == 0
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done: train loss")][0]
    start, end = (float(x) for x in re.match(r"done: train loss ([\d.]+) → ([\d.]+)", summary).groups())
    assert end < 0.1 * start, summary
    # the server was not told and gets no request: its registry poll must reload the task table
    # and compute the new version's prefix on its own
    with capsys.disabled():
        _seconds_until(lambda: _table_size(url) == tasks + 1 and _counter(url, "computed") == computed + 1,
                       "trained version in the server's task table, prefix computed")
    for prompt, completion in MEMO:
        text = _complete(url, "memo", prompt, max_tokens=3).json()["choices"][0]["text"]
        assert text.startswith(completion), (prompt, text)
    # every request found the prefix the reload computed: no miss, no other computation
    assert _counter(url, "misses") == misses and _counter(url, "computed") == computed + 1


def test_export_loads_in_peft_and_matches_server(live, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2LMHeadModel

    url, data_dir = live
    if httpx.get(f"{url}/v1/tasks/memo").status_code != 200:
        httpx.post(f"{url}/v1/tasks", json={"name": "memo", "num_virtual_tokens": 6}).raise_for_status()
    out = tmp_path / "exported"
    assert tasks_main(["export", "memo", str(out), "--data-dir", str(data_dir), "--model", str(tiny_model_dir)]) == 0
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_model_dir), out).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt in ("Capital of France:", "Something else entirely, longer than the others", "x"):
        served = _complete(url, "memo", prompt, max_tokens=10).json()["choices"][0]["token_ids"]
        assert served == peft_greedy(pm, tok.encode(prompt), 10), prompt


def test_rollback_with_cli_goes_live(live, tiny_model_dir, capsys):
    url, data_dir = live
    httpx.post(f"{url}/v1/tasks", json={"name": "roll", "num_virtual_tokens": 4, "seed": 1}).raise_for_status()
    v1_tokens = _complete(url, "roll", "Hello world", 8).json()["choices"][0]["token_ids"]
    g = torch.Generator().manual_seed(3)
    from safetensors.torch import save

    emb = torch.randn(9, 128, generator=g) * 0.5
    files = {"adapter_model.safetensors": ("adapter_model.safetensors", save({"prompt_embeddings": emb}))}
    r = httpx.post(f"{url}/v1/tasks/roll/prompt", files=files)
    assert r.status_code == 201 and r.json()["version"] == 2
    assert _complete(url, "roll", "Hello world", 8).json()["choices"][0]["token_ids"] != v1_tokens
    common = ["--data-dir", str(data_dir), "--model", str(tiny_model_dir)]
    computed, misses = _counter(url, "computed"), _counter(url, "misses")
    assert tasks_main(["activate", "roll", "1", *common]) == 0  # writes the registry, not the server
    # v1's prefix was dropped when v2 went live: the reload that sees the activation computes it
    # again, before any request
    with capsys.disabled():
        _seconds_until(lambda: _counter(url, "computed") == computed + 1, "rollback seen by the server")
    assert _complete(url, "roll", "Hello world", 8).json()["choices"][0]["token_ids"] == v1_tokens
    assert _counter(url, "misses") == misses and _counter(url, "computed") == computed + 1


def test_new_version_prefix_computed_before_first_request(live, capsys):
    """The server computes a new version's prefix KV on its own, before any request needs it."""
    url, _ = live

    def counter(name: str) -> float:
        return _counter(url, name)

    before = {name: counter(name) for name in ("computed", "hits", "misses")}
    r = httpx.post(f"{url}/v1/tasks", json={"name": "prewarm", "num_virtual_tokens": 5, "seed": 4})
    assert r.status_code == 201
    with capsys.disabled():  # no completion was sent
        _seconds_until(lambda: counter("computed") == before["computed"] + 1, "new version's prefix computed")
    served = _complete(url, "prewarm", "hello", 3)
    assert served.status_code == 200 and counter("computed") == before["computed"] + 1
    # the request found the warm entry: a hit, not a miss
    assert counter("hits") == before["hits"] + 1 and counter("misses") == before["misses"]
