"""Issue 13: one request never hurts another. A row that fails is retired alone; values the
engine cannot take are validated or reduced; work over a limit is refused before it is done;
overload is bounded by the expected queue wait; per-request timeouts."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

import server.engine.sampler as sampler_mod
from server.app import create_app
from server.engine.engine import Engine, EngineConfig, QueueFull, Request
from server.engine.sampler import SamplingParams
from server.model import GPT2
from tests.apiutil import assert_error, settings

VICTIMS = 8


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model = GPT2.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = {n: torch.randn(n, model.spec.n_embd, generator=g) * 0.4 for n in (3, 6)}
    return model, tok, prompts


def _victims(tok, prompts):
    """Greedy and seeded-sampled rows of two tasks, the requests a bad neighbour must not hurt."""
    out = []
    for i in range(VICTIMS):
        n = (3, 6)[i % 2]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True) if i % 3 else \
            SamplingParams(max_tokens=6, temperature=0.8, seed=100 + i, ignore_eos=True)
        out.append((f"v{i}", tok.encode(f"victim number {i} says"), params, n))
    return out


def _run(eng, specs, prompts, extra=()):
    reqs = [Request(rid, ids, p, prefix_key=f"p{n}", soft_prompt=prompts[n]) for rid, ids, p, n in specs]
    outs = eng.generate(list(extra) + reqs)
    return {o.req_id: o for o in outs}


def _alone(model, tok, specs, prompts):
    return {rid: o.token_ids for rid, o in _run(Engine(model, tok, EngineConfig(max_num_seqs=16)),
                                                  specs, prompts).items()}


# ------------------------------------------------------------------ the engine contains a failing row

def test_a_row_failing_in_the_forward_pass_is_retired_alone(setup, monkeypatch):
    model, tok, prompts = setup
    specs = _victims(tok, prompts)
    want = _alone(model, tok, specs, prompts)
    poison = 31337 % model.spec.vocab_size  # any step holding this token id raises
    real = model.forward_step

    def forward_step(ids, *a, **k):
        if bool((ids == poison).any()):
            raise RuntimeError("a kernel failed on this row")
        return real(ids, *a, **k)

    monkeypatch.setattr(model, "forward_step", forward_step)
    eng = Engine(model, tok, EngineConfig(max_num_seqs=16))
    bad = Request("bad", [poison, 5, 6], SamplingParams(max_tokens=6, temperature=0), prefix_key="p3",
                  soft_prompt=prompts[3])
    outs = _run(eng, specs, prompts, extra=[bad])
    assert outs["bad"].finish_reason == "error"
    for rid, tokens in want.items():
        assert outs[rid].finish_reason == "length" and outs[rid].token_ids == tokens, rid
    assert eng.cache.num_free == eng.cache.num_slots and not eng.requests
    assert eng.prefixes.stats()["in_use"] == 0 and eng.stats["row_failures"] == 1


def test_a_row_failing_in_sampling_is_retired_alone(setup, monkeypatch):
    model, tok, prompts = setup
    specs = _victims(tok, prompts)
    want = _alone(model, tok, specs, prompts)
    real = sampler_mod._draw

    def draw(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, gen)

    monkeypatch.setattr(sampler_mod, "_draw", draw)
    eng = Engine(model, tok, EngineConfig(max_num_seqs=16))
    bad = Request("bad", [1, 2, 3], SamplingParams(max_tokens=6, temperature=1.0, seed=666), prefix_key="p6",
                  soft_prompt=prompts[6])
    outs = _run(eng, specs, prompts, extra=[bad])
    assert outs["bad"].finish_reason == "error"
    for rid, tokens in want.items():  # seeded rows drew exactly what they draw alone
        assert outs[rid].token_ids == tokens, rid
    assert eng.cache.num_free == eng.cache.num_slots


def test_values_that_used_to_raise_in_a_step_are_taken_by_the_engine(setup):
    """temperature / top_p / seeds that made a step raise: a temperature below 1e-5 is greedy,
    a tiny top_p keeps the top token, any integer seed is reduced modulo 2**64."""
    model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=8))
    ids = tok.encode("edge values")

    def run(**kw):
        return eng.generate([Request("x", ids, SamplingParams(max_tokens=6, ignore_eos=True, **kw))])[0]

    greedy = run(temperature=0).token_ids
    assert run(temperature=1e-300).token_ids == greedy
    assert run(top_p=1e-300, seed=1).token_ids == greedy
    assert run(seed=2**100).finish_reason == "length"
    assert run(seed=-2**70).finish_reason == "length"
    assert run(seed=5 + 2**64).token_ids == run(seed=5).token_ids
    assert run(seed=-5).token_ids == run(seed=2**64 - 5).token_ids  # torch's own mapping, unchanged


# ------------------------------------------------------------------ over HTTP: bad values hurt nobody

@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-isolation")
    with TestClient(create_app(settings(tiny_model_dir, data, max_batch_size=16))) as c:
        for name, n in (("iso-a", 3), ("iso-b", 6)):
            assert c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n, "seed": n}).status_code == 201
        yield c


def _body(i: int) -> dict:
    return {"model": ("iso-a", "iso-b")[i % 2], "prompt": f"victim number {i} says", "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.mark.parametrize("bad", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"seed": 2**100},
                                 {"seed": -2**70}, {"temperature": 1e-300, "top_p": 1e-300, "seed": 2**200}],
                         ids=["tiny-temperature", "tiny-top-p", "huge-seed", "negative-seed", "all"])
def test_bad_values_do_not_fail_the_batch(client, bad):
    want = [client.post("/v1/completions", json=_body(i)).json()["choices"][0]["token_ids"] for i in range(VICTIMS)]

    async def go():
        import httpx

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            bodies = [_body(i) for i in range(VICTIMS)]
            bodies.insert(3, {"model": "iso-a", "prompt": "the bad one", "max_tokens": 6, **bad})
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * (VICTIMS + 1), [r.text for r in rs]
    got = [r.json()["choices"][0]["token_ids"] for i, r in enumerate(rs) if i != 3]
    assert got == want


@pytest.mark.parametrize("field,value", [("version", True), ("max_tokens", True), ("n", True), ("seed", False),
                                         ("temperature", True), ("max_tokens", "16"), ("prompt", [True, False])])
def test_booleans_and_strings_are_not_numbers(client, field, value):
    if field == "version":
        r = client.post("/v1/tasks/iso-a/activate", json={"version": value})
    else:
        r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "x", "max_tokens": 2, field: value})
    assert_error(r, 422, field)


@pytest.mark.parametrize("raw", ['{"model": "iso-a", "prompt": "x", "temperature": NaN}',
                                 '{"model": "iso-a", "prompt": "x", "repetition_penalty": Infinity}',
                                 '{"model": "iso-a", "prompt": "x", "repetition_penalty": 1e-300}'])
def test_non_finite_and_out_of_range_floats_are_422(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422)


@pytest.mark.parametrize("raw", ['{"model": "iso-a", "prompt": "a \\ud800 b"}',
                                 '{"model": "iso-a", "prompt": ["ok", "\\udfff"]}',
                                 '{"model": "iso-a", "prompt": "x", "stop": "\\ud800"}',
                                 '{"requests": [{"task": "iso-a", "prompt": "\\ud800"}]}'])
def test_lone_surrogates_are_refused(client, raw):
    path = "/v1/generate" if raw.startswith('{"requests"') else "/v1/completions"
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422, "surrogate")


# ------------------------------------------------------------------ work refused before it is done

def test_huge_prompt_refused_without_tokenizing_it(client, monkeypatch):
    rt = client.app.state.runtime
    seen = []
    real = rt.encode
    monkeypatch.setattr(rt, "encode", lambda text: seen.append(len(text)) or real(text))
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "lorem ipsum " * 2_000_000,
                                             "max_tokens": 4})
    err = assert_error(r, 400, "at least", "context")
    assert err["code"] == "context_length_exceeded"
    assert seen == []  # refused from its length alone
    # a prompt short enough to be possible is refused from a probe of its start
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "lorem ipsum " * 5000, "max_tokens": 4})
    assert_error(r, 400, "at least")
    assert seen == []  # the probe's encode is not the full one
    # one that fits is tokenized in full, once
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "lorem ipsum " * 50, "max_tokens": 4})
    assert r.status_code == 200 and seen == [len("lorem ipsum " * 50)]


def test_probe_lower_bound_never_exceeds_the_true_count(client):
    """The probe refuses only prompts that really are too long: its bound is <= the real count."""
    rt = client.app.state.runtime
    g = torch.Generator().manual_seed(0)
    alphabet = list("abc xyz--==  \n\t.,é✓😀'sllve")
    for trial in range(40):
        n = int(torch.randint(100, 4000, (1,), generator=g))
        text = "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (n,), generator=g))
        true = len(rt.encode(text))
        for room in (5, 20, 60, 200):
            got = rt.encode_bounded(text, room)
            if isinstance(got, int):
                assert room < got <= true, (trial, room, got, true)
            else:
                assert got == rt.encode(text)


def test_item_count_refused_before_building_items(client, monkeypatch):
    from server.api import schemas

    built = []
    real = schemas.SamplingFields.sampling_params
    monkeypatch.setattr(schemas.SamplingFields, "sampling_params",
                        lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": ["p"] * 20_000, "n": 64, "max_tokens": 1})
    err = assert_error(r, 400, "1280000", "split")
    assert err["code"] == "too_many_items" and built == []
    r = client.post("/v1/generate", json={"requests": [{"task": "iso-a", "prompt": "p", "max_tokens": 1}] * 1500})
    assert_error(r, 400, "1500")
    assert built == []


# ------------------------------------------------------------------ overload: bounded queue wait

def _blockers(eng, n, tokens=400):
    reqs = [Request(f"block{i}", [1, 2, 3], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
            for i in range(n)]
    for r in reqs:
        eng.add_request(r)
    return reqs


def test_expected_wait_over_the_bound_is_refused_at_once(setup):
    model, tok, _ = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=2, max_queue=100, max_queue_wait_s=5.0))
    assert eng.expected_wait(50) == 0.0  # nothing measured yet: only the queue length bounds
    eng.slot_seconds = 1.0  # as measured: a request holds its slot 1 s
    _blockers(eng, 2)
    eng.step()  # both running: no free slot
    assert eng.expected_wait(1) == pytest.approx(0.5)  # 2 slots, each frees once a second
    for i in range(9):
        eng.add_request(Request(f"q{i}", [1], SamplingParams(max_tokens=1, temperature=0)))
    assert eng.expected_wait(1) == pytest.approx(5.0)  # the 10th in line: 5 s, at the bound
    eng.add_request(Request("q9", [1], SamplingParams(max_tokens=1, temperature=0)))
    with pytest.raises(QueueFull) as e:
        eng.add_request(Request("q10", [1], SamplingParams(max_tokens=1, temperature=0)))  # 5.5 s > 5
    assert "expected queue wait" in str(e.value) and e.value.retry_after >= 1
    with pytest.raises(QueueFull):
        eng.check_admission(2)


def test_queued_past_the_bound_ends_with_queue_timeout(setup):
    """If the estimate was wrong, a request still queued after the bound ends (503), so no
    accepted request waits longer than the bound."""
    model, tok, _ = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=1, max_queue_wait_s=0.3))
    _blockers(eng, 1, tokens=1000)
    ended = []
    eng.add_request(Request("late", [1], SamplingParams(max_tokens=1, temperature=0), on_output=ended.append))
    t0 = time.monotonic()
    while not ended and time.monotonic() - t0 < 60:
        eng.step()
    assert [o.finish_reason for o in ended] == ["queue_timeout"]
    assert eng.num_running == 1  # the blocker runs on


def test_http_overload_is_503_with_retry_after(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, tmp_path, max_batch_size=2, max_queue_wait=2.0)
    with TestClient(create_app(s)) as c:
        eng = c.app.state.runtime.engine
        eng.slot_seconds = 10.0  # as if each request held its slot 10 s: one in line waits 5 s
        r = c.post("/v1/completions", json={"model": c.app.state.runtime.model_id, "prompt": "hi",
                                            "max_tokens": 2, "n": 3})  # 3 > 2 free slots: 5 s expected
        err = assert_error(r, 503, "expected queue wait")
        assert err["type"] == "server_error" and int(r.headers["retry-after"]) >= 1
        r = c.post("/v1/completions", json={"model": c.app.state.runtime.model_id, "prompt": "hi", "max_tokens": 2,
                                            "n": 2})
        assert r.status_code == 200  # fits the free slots: no wait


def test_per_request_timeout_is_408(client):
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "hi", "max_tokens": 900,
                                             "ignore_eos": True, "temperature": 0, "timeout": 0.05})
    err = assert_error(r, 408, "timeout")
    assert err["type"] == "invalid_request_error" and err["code"] == "timeout"
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "hi", "max_tokens": 2, "timeout": 60})
    assert r.status_code == 200


def test_failed_row_over_http_is_a_server_error(client, monkeypatch):
    rt = client.app.state.runtime
    real = sampler_mod._draw
    monkeypatch.setattr(sampler_mod, "_draw", lambda logits, params, gen: (_ for _ in ()).throw(
        RuntimeError("boom")) if params.seed == 4242 else real(logits, params, gen))
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "hi", "max_tokens": 3, "seed": 4242})
    err = assert_error(r, 500, "other requests are unaffected")
    assert err["type"] == "server_error" and err["code"] == "engine_error"
    r = client.post("/v1/completions", json={"model": "iso-a", "prompt": "hi", "max_tokens": 3, "seed": 4242,
                                             "stream": True})
    events = [b[len("data: "):] for b in r.text.split("\n\n") if b.strip()]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    assert rt.engine.num_running == 0
