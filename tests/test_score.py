"""Scoring: `echo` + `logprobs` on /v1/completions (the prompt's token log-probs) and
POST /v1/score (candidates' log-probs), both against PEFT's forward in float32 (1e-4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from tests.apiutil import adapter_files, assert_error, make_peft_adapter, settings
from tests.apiutil import complete as _complete

TOL = 1e-4
PROMPT = "The capital of France is a city where many people live and"


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-score")
    folder = tmp_path_factory.mktemp("adapter-score")
    pm = make_peft_adapter(tiny_model_dir, folder, num_virtual_tokens=6, seed=4)
    # a small token budget: a long prompt's prefill is chunked, so chunk edges are covered
    with TestClient(create_app(settings(tiny_model_dir, data, max_num_batched_tokens=16))) as c:
        r = c.post("/v1/tasks", json={"name": "judge", "num_virtual_tokens": 6})
        assert r.status_code == 201, r.text
        r = c.post("/v1/tasks/judge/prompt", files=adapter_files(folder))
        assert r.status_code == 201, r.text
        yield c, pm


def _ids(client, text: str) -> list[int]:
    return client.app.state.runtime.encode(text)


@torch.no_grad()
def _ref_logprobs(pm, ids: list[int]) -> list[float]:
    """PEFT's float32 log-prob of each token after the first (the soft prompt in front)."""
    logits = pm(input_ids=torch.tensor([ids])).logits[0].float()
    n_virt = logits.shape[0] - len(ids)
    lp = torch.log_softmax(logits[n_virt:], dim=-1)
    return [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]


@torch.no_grad()
def _ref_base(tiny_model_dir, ids: list[int]) -> list[float]:
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    lp = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]


def test_echo_returns_the_prompt_log_probs_exactly(setup):
    client, pm = setup
    long_prompt = " ".join([PROMPT] * 4)  # ~50 tokens: several prefill chunks of 16
    ids = _ids(client, long_prompt)
    assert len(ids) > 40
    body = _complete(client, model="judge", prompt=long_prompt, max_tokens=0, echo=True, logprobs=1)
    choice = body["choices"][0]
    assert choice["text"] == long_prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert "".join(lp["tokens"]) == long_prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _ref_logprobs(pm, ids)
    got = lp["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, ref)) < TOL
    for value, top in zip(got, lp["top_logprobs"][1:]):  # the top alternative is at least as likely
        assert len(top) == 1 and max(top.values()) >= value - 1e-6
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_with_a_completion_and_token_prompts(setup):
    """What lm-eval's local-completions sends: token-id prompts, echo, max_tokens 1, logprobs 1."""
    client, pm = setup
    ids_a, ids_b = _ids(client, PROMPT), _ids(client, "Two plus two equals")
    body = _complete(client, model="judge", prompt=[ids_a, ids_b], max_tokens=3, echo=True, logprobs=2,
                     temperature=0, ignore_eos=True)
    plain = _complete(client, model="judge", prompt=[ids_a, ids_b], max_tokens=3, logprobs=2, temperature=0,
                      ignore_eos=True)
    for ids, choice, alone in zip((ids_a, ids_b), body["choices"], plain["choices"]):
        prompt_text = client.app.state.runtime.tokenizer.decode(ids)
        assert choice["text"] == prompt_text + alone["text"]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 3
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], _ref_logprobs(pm, ids))) < TOL
        assert lp["token_logprobs"][len(ids):] == alone["logprobs"]["token_logprobs"]
        assert lp["text_offset"][len(ids):] == [len(prompt_text) + o for o in alone["logprobs"]["text_offset"]]
        assert all(len(t) == 2 for t in lp["top_logprobs"][1:])


def test_echo_streamed_matches_non_streamed(setup):
    client, _ = setup
    args = dict(model="judge", prompt=PROMPT, max_tokens=5, echo=True, logprobs=1, temperature=0, ignore_eos=True)
    whole = _complete(client, **args)["choices"][0]
    r = client.post("/v1/completions", json={**args, "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)
    joined = [v for c in chunks for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert joined == whole["logprobs"]["token_logprobs"]
    offsets = [v for c in chunks for v in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


def test_echo_without_logprobs_and_refusals(setup):
    client, _ = setup
    body = _complete(client, model="judge", prompt=PROMPT, max_tokens=0, echo=True)
    assert body["choices"][0]["text"] == PROMPT and body["choices"][0]["logprobs"] is None
    r = client.post("/v1/completions", json={"model": "judge", "prompt": PROMPT, "max_tokens": 0})
    assert_error(r, 422, "max_tokens 0", "echo")
    r = client.post("/v1/completions", json={"model": "judge", "prompt": PROMPT, "max_tokens": -1, "echo": True})
    assert_error(r, 422, "max_tokens")


def test_score_equals_peft_forward(setup):
    client, pm = setup
    candidates = [" Paris", " a big city by the river", " London", " the"]
    runtime = client.app.state.runtime
    computed = runtime.engine.prefixes.computed
    r = client.post("/v1/score", json={"model": "judge", "prompt": PROMPT, "candidates": candidates})
    assert r.status_code == 200, r.text
    body = r.json()
    assert runtime.engine.prefixes.computed == computed + 1  # the prompt's keys/values computed once
    p_ids = _ids(client, PROMPT)
    want = []
    for cand, res in zip(candidates, body["results"]):
        c_ids = _ids(client, cand)
        ref = _ref_logprobs(pm, p_ids + c_ids)[len(p_ids) - 1:]
        assert res["candidate"] == cand and res["num_tokens"] == len(c_ids)
        assert abs(res["logprob"] - sum(ref)) < TOL
        assert abs(res["mean_logprob"] - sum(ref) / len(ref)) < TOL
        want.append(sum(ref))
    assert body["best"] == max(range(len(want)), key=want.__getitem__)
    assert body["usage"]["prompt_tokens"] == len(p_ids) + sum(len(_ids(client, c)) for c in candidates)
    # a repeat reuses the cached prompt prefix and gives the same numbers
    again = client.post("/v1/score", json={"model": "judge", "prompt": PROMPT, "candidates": candidates}).json()
    assert runtime.engine.prefixes.computed == computed + 1
    assert [x["logprob"] for x in again["results"]] == [x["logprob"] for x in body["results"]]


def test_score_on_the_base_model_and_token_inputs(setup, tiny_model_dir):
    client, _ = setup
    base = client.app.state.runtime.model_id
    p_ids = _ids(client, "Hello")  # one token: no prefix at all on the base model
    assert len(p_ids) == 1
    cands = [_ids(client, " world"), _ids(client, " there, friend")]
    r = client.post("/v1/score", json={"model": base, "prompt": p_ids, "candidates": cands})
    assert r.status_code == 200, r.text
    for c_ids, res in zip(cands, r.json()["results"]):
        ref = _ref_base(tiny_model_dir, p_ids + c_ids)
        assert abs(res["logprob"] - sum(ref)) < TOL and res["num_tokens"] == len(c_ids)
        assert math.isfinite(res["mean_logprob"])


def test_score_refusals(setup):
    client, _ = setup
    ok = {"model": "judge", "prompt": PROMPT, "candidates": [" yes"]}
    assert_error(client.post("/v1/score", json={**ok, "model": "nope"}), 404, "not found")
    assert_error(client.post("/v1/score", json={**ok, "candidates": []}), 422, "candidates")
    assert_error(client.post("/v1/score", json={**ok, "candidates": [" a"] * 65}), 422, "candidates")
    assert_error(client.post("/v1/score", json={**ok, "candidates": [" a", ""]}), 422, "empty")
    assert_error(client.post("/v1/score", json={**ok, "prompt": ""}), 422, "prompt")
    assert_error(client.post("/v1/score", json={**ok, "extra": 1}), 422, "extra")
    long = {**ok, "candidates": [" a", " word" * 2000]}
    assert_error(client.post("/v1/score", json=long), 400, "candidate 1", "context")
    # the server still serves after the refusals
    assert client.post("/v1/score", json=ok).status_code == 200
