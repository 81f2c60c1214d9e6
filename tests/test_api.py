"""HTTP API, serving side: /health, /v1/models, /v1/completions, /v1/generate, /metrics,
errors in OpenAI's shape. One app for the module (TestClient as a context manager)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.apiutil import assert_error, greedy, settings
from tests.apiutil import complete as _complete
from tests.apiutil import sse as _sse

TASKS = {"alpha": {"num_virtual_tokens": 5, "seed": 1},
         "beta": {"num_virtual_tokens": 3, "init": "vocab", "seed": 2},
         "gamma": {"init": "text", "init_text": "Answer briefly:", "num_virtual_tokens": 6}}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def base_id(tiny_model_dir) -> str:
    return Path(tiny_model_dir).resolve().name


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-api")
    with TestClient(create_app(settings(tiny_model_dir, data))) as c:
        for name, body in TASKS.items():
            r = c.post("/v1/tasks", json={"name": name, **body})
            assert r.status_code == 201, r.text
        yield c


def _encode(client, text: str) -> list[int]:
    return client.app.state.runtime.encode(text)


# ------------------------------------------------------------------ health, models

def test_health(client, base_id):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["model"] == base_id
    assert h["device"] == "cpu" and h["dtype"] == "float32"
    assert h["tasks"] == len(TASKS)
    assert h["quantize"] == "none"
    assert {"attention", "matmuls", "greedy"} <= set(h["paths"])  # which path each part takes here


def test_models(client, base_id):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == base_id
    assert sorted(ids[1:]) == sorted(TASKS)
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]


# ------------------------------------------------------------------ completions

def test_completion_string_prompt(client):
    out = greedy(client, "alpha", PROMPT, max_tokens=6, ignore_eos=True)
    assert out["object"] == "text_completion" and out["model"] == "alpha"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    (ch,) = out["choices"]
    assert ch["index"] == 0 and isinstance(ch["text"], str)
    assert ch["finish_reason"] == "length" and len(ch["token_ids"]) == 6
    assert ch["logprobs"] is None
    u = out["usage"]
    # usage counts the user's tokens, not the 5 virtual ones
    assert u["prompt_tokens"] == len(_encode(client, PROMPT))
    assert u["completion_tokens"] == 6 and u["total_tokens"] == u["prompt_tokens"] + 6
    # the text is the decoded tokens
    tok = client.app.state.runtime.tokenizer
    assert ch["text"] == tok.decode(ch["token_ids"])


def test_completion_defaults_to_16_tokens(client, base_id):
    out = _complete(client, model=base_id, prompt=PROMPT, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16


def test_greedy_is_deterministic_and_task_dependent(client, base_id):
    a = greedy(client, "alpha", PROMPT, ignore_eos=True)["choices"][0]["token_ids"]
    assert greedy(client, "alpha", PROMPT, ignore_eos=True)["choices"][0]["token_ids"] == a
    outs = {m: tuple(greedy(client, m, PROMPT, ignore_eos=True)["choices"][0]["token_ids"])
            for m in [base_id, "alpha", "beta", "gamma"]}
    assert len(set(outs.values())) > 1  # the soft prompt matters


def test_completion_list_prompt(client):
    prompts = [PROMPT, "The weather today", "x"]
    out = greedy(client, "beta", prompts, max_tokens=5, ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    singles = [greedy(client, "beta", p, max_tokens=5, ignore_eos=True) for p in prompts]
    for ch, s in zip(out["choices"], singles):
        assert ch["token_ids"] == s["choices"][0]["token_ids"]
        assert ch["text"] == s["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == sum(len(_encode(client, p)) for p in prompts)
    assert out["usage"]["completion_tokens"] == 15


def test_completion_token_id_prompt(client):
    ids = _encode(client, PROMPT)
    by_text = greedy(client, "alpha", PROMPT, ignore_eos=True)
    by_ids = greedy(client, "alpha", ids, ignore_eos=True)
    assert by_ids["choices"][0]["token_ids"] == by_text["choices"][0]["token_ids"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    two = greedy(client, "alpha", [ids, ids[:2]], ignore_eos=True)
    assert len(two["choices"]) == 2
    assert two["choices"][0]["token_ids"] == by_text["choices"][0]["token_ids"]
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": [10**9]}), 400, "vocab")


def test_preparing_on_the_loop_or_a_thread_answers_the_same(client, monkeypatch):
    """Requests whose soft prompts are in memory and whose text is short are prepared on the
    event loop (service._quick); the rest on a worker thread. Same answers either way."""
    from server import service

    rt = client.app.state.runtime
    ids = _encode(client, PROMPT)
    quick = greedy(client, "alpha", PROMPT, ignore_eos=True)
    info = service._resolve(rt, "alpha")
    assert rt.has_prompt(info.sha256)
    assert service._quick(rt, [("alpha", PROMPT, None, None)], {"alpha": info})
    assert service._quick(rt, [("alpha", ids, None, None)], {"alpha": info})
    assert not service._quick(rt, [("alpha", "x" * (service.INLINE_CHARS + 1), None, None)], {"alpha": info})
    monkeypatch.setattr(service, "INLINE_CHARS", -1)  # every request through the thread now
    assert not service._quick(rt, [("alpha", ids, None, None)], {"alpha": info})
    assert greedy(client, "alpha", PROMPT, ignore_eos=True)["choices"] == quick["choices"]
    monkeypatch.undo()
    with rt._prompts_lock:  # out of memory: read from the registry on the thread, then cached
        rt._prompts.clear()
        rt._prompt_bytes = 0
    assert not service._quick(rt, [("alpha", ids, None, None)], {"alpha": info})
    assert greedy(client, "alpha", ids, ignore_eos=True)["choices"][0]["token_ids"] == \
        quick["choices"][0]["token_ids"]
    assert rt.has_prompt(info.sha256)


def test_n_with_seed(client):
    body = dict(model="alpha", prompt=PROMPT, n=3, temperature=1.0, seed=7, max_tokens=8,
                ignore_eos=True, return_token_ids=True)
    a = _complete(client, **body)
    b = _complete(client, **body)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({tuple(c["token_ids"]) for c in a["choices"]}) > 1  # n samples, not n copies
    assert a["usage"]["completion_tokens"] == 24
    assert a["usage"]["prompt_tokens"] == len(_encode(client, PROMPT))
    # n with a list prompt: n choices per prompt
    two = _complete(client, **{**body, "prompt": [PROMPT, "abc"], "n": 2})
    assert len(two["choices"]) == 4


def test_return_token_ids_matches_usage(client):
    for kw in ({"max_tokens": 5, "ignore_eos": True}, {"max_tokens": 12, "stop": [" "]},
               {"max_tokens": 9, "temperature": 0.8, "seed": 3}):
        body = {"model": "gamma", "prompt": [PROMPT, "hello"], "return_token_ids": True, "temperature": 0, **kw}
        out = _complete(client, **body)
        assert sum(len(c["token_ids"]) for c in out["choices"]) == out["usage"]["completion_tokens"]
        assert all(len(c["token_ids"]) <= kw["max_tokens"] for c in out["choices"])
    out = _complete(client, model="gamma", prompt="x", max_tokens=3, ignore_eos=True)
    assert len(out["choices"]) == 1 and "token_ids" not in out["choices"][0]
    assert out["usage"]["completion_tokens"] == 3


def test_stop_string(client, base_id):
    full = greedy(client, base_id, PROMPT, max_tokens=12, ignore_eos=True)["choices"][0]
    text = full["text"]
    assert len(text) >= 6
    # a stop string taken from the middle of the greedy output
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text[: text.find(stop)]
    out = greedy(client, base_id, PROMPT, max_tokens=12, ignore_eos=True, stop=stop)["choices"][0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == cut and stop not in out["text"]
    out = greedy(client, base_id, PROMPT, max_tokens=12, ignore_eos=True, stop=["\u2603never", stop])["choices"][0]
    assert out["text"] == cut and out["finish_reason"] == "stop"
    # a stop string that never appears changes nothing
    out = greedy(client, base_id, PROMPT, max_tokens=12, ignore_eos=True, stop="\u2603never")["choices"][0]
    assert out["text"] == text and out["finish_reason"] == "length"
    # streaming cuts at the same place
    r = client.post("/v1/completions", json={"model": base_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                             "ignore_eos": True, "stop": stop, "stream": True})
    ev = _sse(r)
    assert "".join(e["choices"][0]["text"] for e in ev[:-1] if e["choices"]) == cut
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_length(client):
    for n in (1, 4):
        ch = greedy(client, "beta", PROMPT, max_tokens=n, ignore_eos=True)["choices"][0]
        assert ch["finish_reason"] == "length" and len(ch["token_ids"]) == n


def test_logprobs(client):
    out = _complete(client, model="alpha", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                    ignore_eos=True, return_token_ids=True)
    ch = out["choices"][0]
    lp = ch["logprobs"]
    assert set(lp) >= {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen <= 0.0
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert all(v <= 0.0 for v in top.values())
        assert chosen >= max(top.values()) - 1e-5  # greedy picks the most likely token
    # logprobs=0: the chosen token's logprob only
    out = _complete(client, model="alpha", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0, ignore_eos=True)
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == 3
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "logprobs": 21}), 422)


def test_stream_matches_non_stream(client):
    body = {"model": "gamma", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    want = _complete(client, **body)["choices"][0]
    r = client.post("/v1/completions", json={**body, "stream": True, "return_token_ids": True,
                                             "stream_options": {"include_usage": True}})
    ev = _sse(r)
    assert ev[-1] == "[DONE]"
    chunks = [e for e in ev[:-1] if e["choices"]]
    assert len(chunks) >= 2
    for e in chunks:
        assert e["object"] == "text_completion" and e["model"] == "gamma"
        assert len(e["choices"]) == 1 and e["choices"][0]["index"] == 0
    assert len({e["id"] for e in ev[:-1]}) == 1
    assert "".join(e["choices"][0]["text"] for e in chunks) == want["text"]
    assert [t for e in chunks for t in e["choices"][0]["token_ids"]] == greedy(
        client, "gamma", PROMPT, 10, ignore_eos=True)["choices"][0]["token_ids"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = [e for e in ev[:-1] if not e["choices"]]
    assert usage and usage[-1]["usage"]["completion_tokens"] == 10


def test_stream_logprobs_match_non_stream(client):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    want = _complete(client, **body)["choices"][0]["logprobs"]
    ev = _sse(client.post("/v1/completions", json={**body, "stream": True}))
    got = [e["choices"][0]["logprobs"] for e in ev[:-1] if e["choices"]]
    assert [t for lp in got for t in lp["tokens"]] == want["tokens"]
    assert [t for lp in got for t in lp["token_logprobs"]] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert [t for lp in got for t in lp["text_offset"]] == want["text_offset"]


def test_stream_n_and_lists(client):
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": [PROMPT, "abc"], "max_tokens": 4,
                                             "temperature": 0, "ignore_eos": True, "stream": True})
    ev = _sse(r)
    assert ev[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for e in ev[:-1]:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["text"]
    want = greedy(client, "alpha", [PROMPT, "abc"], 4, ignore_eos=True)["choices"]
    assert texts == {0: want[0]["text"], 1: want[1]["text"]}


def test_seeded_sampling_repeats_alone_and_in_batch(client, base_id):
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 10, "temperature": 0.9, "top_p": 0.95,
            "top_k": 50, "seed": 1234, "ignore_eos": True, "return_token_ids": True}
    a = _complete(client, **body)["choices"][0]["token_ids"]
    b = _complete(client, **body)["choices"][0]["token_ids"]
    assert a == b
    c = _complete(client, **{**body, "seed": 4321})["choices"][0]["token_ids"]
    assert c != a
    # the same seeded request inside a mixed batch
    item = {k: v for k, v in body.items() if k not in ("model", "return_token_ids")}
    reqs = [{"task": "alpha", "prompt": "noise " * 5, "max_tokens": 7, "temperature": 1.0},
            {"task": "beta", **item},
            {"task": base_id, "prompt": "x", "max_tokens": 3, "temperature": 0.5, "seed": 9},
            {"task": "beta", **item}]
    r = client.post("/v1/generate", json={"requests": reqs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[1]["token_ids"] == a and res[3]["token_ids"] == a
    # and as the first prompt of a list (its choice keeps the request's seed)
    lst = _complete(client, **{**body, "prompt": [PROMPT, "other"]})
    assert lst["choices"][0]["token_ids"] == a


def test_unknown_model_404(client):
    err = assert_error(client.post("/v1/completions", json={"model": "no-such-task", "prompt": "x"}), 404,
                       "no-such-task")
    assert err["type"] == "invalid_request_error"
    # /v1/generate: the unknown item gets its own error, the others run; all unknown: the call fails
    r = client.post("/v1/generate", json={"requests": [{"task": "alpha", "prompt": "x", "max_tokens": 2},
                                                       {"task": "no-such-task", "prompt": "x"},
                                                       {"task": "alpha", "prompt": "", "max_tokens": 2},
                                                       {"task": "beta", "prompt": [10 ** 6]},
                                                       {"task": "beta", "prompt": "y", "max_tokens": 3,
                                                        "temperature": 0}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["task"] for x in res] == ["alpha", "no-such-task", "alpha", "beta", "beta"]
    assert res[0]["finish_reason"] and "error" not in res[0]
    assert res[1]["status"] == 404 and res[1]["error"]["code"] == "model_not_found"
    assert "no-such-task" in res[1]["error"]["message"] and "text" not in res[1]
    assert res[2]["status"] == 400 and "empty" in res[2]["error"]["message"]
    assert res[3]["status"] == 400 and "vocabulary" in res[3]["error"]["message"]
    alone = greedy(client, "beta", "y", 3)["choices"][0]
    assert res[4]["text"] == alone["text"] and res[4]["token_ids"] == alone["token_ids"]
    r = client.post("/v1/generate", json={"requests": [{"task": "no-such-task", "prompt": "x"},
                                                       {"task": "nor-this", "prompt": "x"}]})
    assert_error(r, 404, "no-such-task")


def test_context_overflow_400(client):
    ids = [11] * 1000
    # 1000 prompt + 5 virtual + 30 max_tokens = 1035 > 1024: over by 11
    err = assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": ids, "max_tokens": 30}),
                       400, "1024")
    assert re.search(r"\b11\b", err["message"]), err["message"]  # says by how much
    assert err["code"]
    # the same request fits without the virtual tokens' and max_tokens' excess
    ok = client.post("/v1/completions", json={"model": "alpha", "prompt": ids, "max_tokens": 19,
                                              "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 19
    # base model: no virtual tokens
    base = client.get("/health").json()["model"]
    err = assert_error(client.post("/v1/completions", json={"model": base, "prompt": ids, "max_tokens": 25}),
                       400)
    assert re.search(r"\b1\b", err["message"]), err["message"]
    r = client.post("/v1/generate", json={"requests": [{"task": "alpha", "prompt": ids, "max_tokens": 30}]})
    assert_error(r, 400, "11")


def test_empty_prompt_400(client):
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": ""}), 400, "empty")
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": []}), 400, "empty")
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": ["a", ""]}), 400, "empty")
    r = client.post("/v1/generate", json={"requests": [{"task": "alpha", "prompt": ""}]})
    assert_error(r, 400, "empty")


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"max_tokens": 0}, {"top_p": 0}, {"n": 0},
                                 {"prompt": 5}, {"model": None}, {"stop": ["s"] * 17}])
def test_bad_fields_422(client, bad):
    body = {"model": "alpha", "prompt": "x", **bad}
    err = assert_error(client.post("/v1/completions", json=body), 422)
    assert err["type"] == "invalid_request_error"


def test_bad_json_and_unsupported(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422)
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "best_of": 3}), 400, "best_of")
    assert_error(client.post("/v1/generate", json={"requests": []}), 422)


def test_generate_mixed_in_order(client, base_id):
    reqs = [{"task": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
            {"task": base_id, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            {"task": "gamma", "prompt": _encode(client, "token ids"), "max_tokens": 5, "temperature": 0,
             "ignore_eos": True},
            {"task": "beta", "prompt": "x " * 40, "max_tokens": 3, "temperature": 0, "ignore_eos": True},
            {"task": "alpha", "prompt": "Short", "max_tokens": 2, "temperature": 0, "ignore_eos": True,
             "logprobs": 1}]
    r = client.post("/v1/generate", json={"requests": reqs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["task"] for x in res] == [q["task"] for q in reqs]
    for q, x in zip(reqs, res):
        single = greedy(client, q["task"], q["prompt"], q["max_tokens"], ignore_eos=True)
        assert x["token_ids"] == single["choices"][0]["token_ids"], q["task"]
        assert x["text"] == single["choices"][0]["text"]
        assert x["finish_reason"] == "length"
        assert x["usage"]["completion_tokens"] == len(x["token_ids"]) == q["max_tokens"]
        assert x["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert len(res[4]["logprobs"]["token_logprobs"]) == 2


def test_oversized_body_413_and_full_queue_503(tiny_model_dir, tmp_path, base_id):
    s = settings(tiny_model_dir, tmp_path, max_body_mb=0.001, max_queue=0)
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/completions", json={"model": base_id, "prompt": "word " * 1000, "max_tokens": 1})
        assert_error(r, 413)
        r = c.post("/v1/tasks/x/prompt", files={"adapter_model.safetensors": ("adapter_model.safetensors",
                                                                                b"\0" * 5000)})
        assert_error(r, 413)
        # a chunked body (no Content-Length) is counted as it arrives: same 413
        body = json.dumps({"model": base_id, "prompt": "word " * 1000, "max_tokens": 1}).encode()
        r = c.post("/v1/completions", content=(body[i:i + 256] for i in range(0, len(body), 256)),
                   headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413)
        # a chunked multipart upload too
        boundary = "polyprompt-test"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
                f"filename=\"adapter_model.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + b"\0" * 5000 + f"\r\n--{boundary}--\r\n".encode()
        r = c.post("/v1/tasks/x/prompt", content=(form[i:i + 512] for i in range(0, len(form), 512)),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert_error(r, 413)
        # a small chunked body passes
        small = json.dumps({"model": base_id, "prompt": "hi", "max_tokens": 1}).encode()
        r = c.post("/v1/completions", content=iter([small]), headers={"content-type": "application/json"})
        assert r.status_code == 503  # it reached the engine (no queue room), past the size check
        # a small body passes the size check; with no queue room the answer is 503 + Retry-After
        r = c.post("/v1/completions", json={"model": base_id, "prompt": "hi", "max_tokens": 1})
        assert_error(r, 503, "queue")
        assert int(r.headers["retry-after"]) >= 1
        r = c.post("/v1/generate", json={"requests": [{"task": base_id, "prompt": "hi", "max_tokens": 1}]})
        assert_error(r, 503, "queue")  # the same documented answer as a completion: 503 + Retry-After
        assert int(r.headers["retry-after"]) >= 1
        # streaming too: the 503 comes before the event stream starts, not inside it
        r = c.post("/v1/completions", json={"model": base_id, "prompt": "hi", "max_tokens": 1, "stream": True})
        assert_error(r, 503, "queue")
        assert int(r.headers["retry-after"]) >= 1


def test_unknown_route_error_shape(client):
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get("/v1/completions"), 405)


# ------------------------------------------------------------------ metrics

def _metric_samples(client) -> dict[str, float]:
    """Every sample line of /metrics, `name{labels}` -> value (each line must parse)."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics(client, base_id):
    """Counters move by exactly what two requests did; histograms are consistent."""
    before = _metric_samples(client)
    a = greedy(client, "alpha", PROMPT, 3, ignore_eos=True)
    b = greedy(client, base_id, PROMPT, 2, ignore_eos=True)
    text = client.get("/metrics").text
    for name in ("polyprompt_requests_total", "polyprompt_queue_depth", "polyprompt_running_batch_size",
                 "polyprompt_prompt_tokens_total", "polyprompt_generation_tokens_total",
                 "polyprompt_request_latency_seconds_bucket", "polyprompt_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert "# TYPE polyprompt_request_latency_seconds histogram" in text
    after = _metric_samples(client)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('polyprompt_requests_total{finish_reason="length",task="alpha"}') == 1
    assert delta(f'polyprompt_requests_total{{finish_reason="length",task="{base_id}"}}') == 1  # the base model
    assert sum(delta(k) for k in after if k.startswith("polyprompt_requests_total")) == 2
    assert delta("polyprompt_generation_tokens_total") == 3 + 2
    assert delta("polyprompt_prompt_tokens_total") == (a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"])
    for hist in ("polyprompt_request_latency_seconds", "polyprompt_time_to_first_token_seconds"):
        assert after[f'{hist}_bucket{{le="+Inf"}}'] == after[f"{hist}_count"]
        assert delta(f"{hist}_count") == 2
    assert delta("polyprompt_inter_token_latency_seconds_count") == 2  # both made more than one token
    assert after["polyprompt_tasks"] == len(client.get("/v1/tasks").json()["data"])


def test_metrics_gauges_follow_the_engine(client):
    """queue depth and running batch size are the engine's counts: 0 / 1 while one request runs,
    0 / 0 once it is done."""
    import threading
    import time

    rt = client.app.state.runtime
    done = {}
    th = threading.Thread(target=lambda: done.setdefault("r", greedy(client, "alpha", PROMPT, 900,
                                                                     ignore_eos=True)))
    th.start()
    try:
        deadline = time.monotonic() + 30
        while rt.engine.num_running == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        running = _metric_samples(client)
        assert th.is_alive(), "the request ended before /metrics was read: make it longer"
        assert running["polyprompt_running_batch_size"] == 1 and running["polyprompt_queue_depth"] == 0
    finally:
        th.join(120)
    assert len(done["r"]["choices"][0]["token_ids"]) == 900
    deadline = time.monotonic() + 10  # the engine frees the slot at the end of the step that finished it
    while rt.engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    idle = _metric_samples(client)
    assert idle["polyprompt_running_batch_size"] == 0 and idle["polyprompt_queue_depth"] == 0


def test_restarted_server_computes_active_prefixes_before_requests(tiny_model_dir, tmp_path):
    """After a restart the active versions' prefix KV is computed in the background, so the
    first requests find it (no miss), as on a server that has been up."""
    import time

    data = tmp_path / "data"
    with TestClient(create_app(settings(tiny_model_dir, data))) as c:
        for name, n in (("one", 3), ("two", 8)):
            assert c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n}).status_code == 201
    with TestClient(create_app(settings(tiny_model_dir, data))) as c:
        prefixes = c.app.state.runtime.engine.prefixes
        deadline = time.monotonic() + 10
        while prefixes.stats()["computed"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert prefixes.stats()["computed"] == 2  # both computed, no request sent
        for name in ("one", "two"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
        st = prefixes.stats()
        assert st["computed"] == 2 and st["misses"] == 0 and st["hits"] == 2


def test_stream_left_before_it_started_aborts_its_requests(client, base_id):
    """A streaming request is handed to the engine before its response starts (so a full
    queue is a clean 503); if the client leaves before the stream is read, the response's
    background task (`Submission.close`) aborts it instead of letting it run on."""
    import asyncio

    from server import service
    from server.engine.sampler import SamplingParams

    rt = client.app.state.runtime

    async def go():
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        sub = service.Submission(rt, await service.prepare(rt, [(base_id, "hello", lambda: params, None)]), stream=True)
        sub.close()
        while True:  # the engine answers the abort on this loop
            _, out = await asyncio.wait_for(sub.queue.get(), 30)
            if out.finished:
                return out

    out = asyncio.run(go())
    assert out.finish_reason == "abort" and len(out.token_ids) < 200


def test_startup_warm_stays_within_half_the_prefix_cache(tiny_model_dir, tmp_path):
    """Startup warming skips a version whose prefix would take more than what is left of
    half the prefix cache (tiny model, fp32: 2 KB a virtual token)."""
    import time

    data = tmp_path / "data"
    with TestClient(create_app(settings(tiny_model_dir, data))) as c:
        for name, n in (("small", 3), ("large", 8)):
            assert c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n}).status_code == 201
    with TestClient(create_app(settings(tiny_model_dir, data, prefix_cache_mb=0.02))) as c:  # half: ~10 KB
        prefixes = c.app.state.runtime.engine.prefixes
        deadline = time.monotonic() + 10
        while prefixes.stats()["computed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the queued warms are computed in one batch, so none is still pending
        assert prefixes.stats()["computed"] == 1 and prefixes.stats()["bytes"] == 3 * 2048
