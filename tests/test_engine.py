"""The engine in-process: exactness under continuous batching and the prefix cache."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from server.engine.engine import Engine, EngineConfig, QueueFull, Request
from server.engine.sampler import SamplingParams
from server.model import GPT2
from tests.peft_ref import peft_greedy, peft_model


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    model = GPT2.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(11)
    prompts = {n: torch.randn(n, base.config.n_embd, generator=g) * 0.4 for n in (1, 4, 9, 17)}
    return base, model, tok, prompts


def _greedy(n, max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("native", [False, True], ids=["sdpa", "native-attention"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_requests_joining_mid_decode_are_exact(setup, token_major, native, request):
    base, model, tok, prompts = setup
    request.addfinalizer(lambda: model.set_native_kernels(True))  # the module's model is shared
    if model.set_native_kernels(native) != native:
        pytest.skip("the native CPU attention kernel cannot run here (no AVX-512 or no C compiler)")
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, kv_token_major=token_major))
    assert eng.cache.token_major == token_major
    # torch.empty memory may hold NaN patterns: masked-out keys must never leak them
    eng.cache._kv.fill_(float("nan"))
    g = torch.Generator().manual_seed(5)
    specs = [(n, torch.randint(0, 50257, (length,), generator=g).tolist(), mt)
             for n, length, mt in [(9, 30, 20), (1, 5, 12), (17, 2, 15), (4, 40, 10), (9, 7, 9), (1, 25, 14)]]
    outs = {}

    def cb(out):
        if out.finished:
            outs[out.req_id] = out.token_ids

    reqs = [Request(f"r{i}", ids, _greedy(n, mt), prefix_key=f"p{n}", soft_prompt=prompts[n], on_output=cb)
            for i, (n, ids, mt) in enumerate(specs)]
    eng.add_request(reqs[0])
    eng.add_request(reqs[1])
    for step in range(200):
        if step == 3:
            eng.add_request(reqs[2])  # arrives while r0/r1 decode
        if step == 6:
            for r in reqs[3:]:
                eng.add_request(r)  # more than free slots: queued, admitted as rows finish
        eng.step()
        if len(outs) == len(reqs):
            break
    assert len(outs) == len(reqs)
    for i, (n, ids, mt) in enumerate(specs):
        assert outs[f"r{i}"] == peft_greedy(peft_model(base, prompts[n]), ids, mt), f"r{i}"
    assert eng.cache.num_free == eng.cache.num_slots  # every slot returned
    st = eng.prefixes.stats()
    assert st["hits"] >= 2 and st["in_use"] == 0
    assert model.native_kernels == native


def test_version_change_mid_run(setup):
    """A running request finishes on its version; a new one uses the new version."""
    base, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    v1, v2 = prompts[4], prompts[9]
    ids = tok.encode("The same prompt for both versions")
    a = Request("a", ids, _greedy(4, 16), task="t", prefix_key="sha-v1", soft_prompt=v1)
    outs = {}
    a.on_output = lambda o: outs.__setitem__("a", o.token_ids) if o.finished else None
    eng.add_request(a)
    for _ in range(4):
        eng.step()
    eng.prefixes.invalidate("sha-v1")  # what the runtime does when the active version changes
    b = Request("b", ids, _greedy(9, 16), task="t", prefix_key="sha-v2", soft_prompt=v2)
    b.on_output = lambda o: outs.__setitem__("b", o.token_ids) if o.finished else None
    eng.add_request(b)
    while len(outs) < 2:
        eng.step()
    assert outs["a"] == peft_greedy(peft_model(base, v1), ids, 16)
    assert outs["b"] == peft_greedy(peft_model(base, v2), ids, 16)
    assert outs["a"] != outs["b"]


def test_seeded_sampling_independent_of_batch(setup):
    _, model, tok, prompts = setup
    ids = tok.encode("Sampling should not depend on neighbours")
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=42, ignore_eos=True)

    def run(extra: int):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=8, max_num_batched_tokens=256))
        others = [Request(f"o{i}", tok.encode("x " * (i + 1)), SamplingParams(max_tokens=5 + i, temperature=0.8),
                          prefix_key="p1", soft_prompt=prompts[1]) for i in range(extra)]
        target = Request("t", ids, p, prefix_key="p17", soft_prompt=prompts[17])
        return eng.generate(others + [target])[-1].token_ids

    assert run(0) == run(5) == run(2)


def test_stop_strings_eos_and_limits(setup):
    _, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4, max_queue=2))
    ids = tok.encode("Hello there")
    full = eng.generate([Request("f", ids, _greedy(0, 12), prefix_key="p4", soft_prompt=prompts[4])])[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = eng.generate([Request("s", ids, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)),
                                prefix_key="p4", soft_prompt=prompts[4])])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    with pytest.raises(ValueError):
        eng.add_request(Request("big", ids, _greedy(0, 1023), prefix_key="p4", soft_prompt=prompts[4]))
    eng.add_request(Request("q1", ids, _greedy(0, 2)))
    eng.add_request(Request("q2", ids, _greedy(0, 2)))
    with pytest.raises(QueueFull):
        eng.add_request(Request("q3", ids, _greedy(0, 2)))


def test_abort_frees_slot(setup):
    _, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=2))
    seen = []
    r = Request("x", tok.encode("abort me"), _greedy(0, 50), prefix_key="p9", soft_prompt=prompts[9],
                on_output=seen.append)
    eng.add_request(r)
    eng.step()
    eng.abort("x")
    eng.step()
    assert seen and seen[-1].finish_reason == "abort"
    assert eng.cache.num_free == 2 and not eng.scheduler.has_work()


def test_static_decode_path_matches_dynamic(setup):
    """The padded static-shape decode (what CUDA graphs capture) == the dynamic path, on CPU."""
    base, model, tok, prompts = setup
    g = torch.Generator().manual_seed(9)
    specs = [(n, torch.randint(0, 50257, (ln,), generator=g).tolist()) for n, ln in [(1, 3), (17, 20), (4, 9), (9, 1)]]

    def run(static):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=6, max_num_batched_tokens=24, static_decode=static))
        eng.cache._kv.fill_(float("nan"))
        reqs = [Request(f"r{i}", ids, _greedy(n, 10 + i), prefix_key=f"p{n}", soft_prompt=prompts[n])
                for i, (n, ids) in enumerate(specs)]
        return [o.token_ids for o in eng.generate(reqs)]

    static = run(True)
    assert static == run(False)
    assert static[1] == peft_greedy(peft_model(base, prompts[17]), specs[1][1], 11)


def test_static_decode_path_samples_like_dynamic(setup):
    """A sampled request in the batch: the static step hands back logits (not its on-device
    argmax), and seeded sampling gives what the dynamic path gives; greedy rows beside it
    are unchanged."""
    base, model, tok, prompts = setup
    g = torch.Generator().manual_seed(3)
    specs = [(n, torch.randint(0, 50257, (ln,), generator=g).tolist()) for n, ln in [(4, 6), (9, 11), (1, 2)]]
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)

    def run(static):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, static_decode=static))
        reqs = [Request(f"r{i}", ids, sampled if i == 1 else _greedy(n, 12), prefix_key=f"p{n}",
                        soft_prompt=prompts[n]) for i, (n, ids) in enumerate(specs)]
        return [o.token_ids for o in eng.generate(reqs)]

    static = run(True)
    assert static == run(False)
    assert static[0] == peft_greedy(peft_model(base, prompts[4]), specs[0][1], 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_fp16_agree_with_fp32_reference(setup, tiny_model_dir):
    base, _, tok, prompts = setup
    ref_model = GPT2.from_pretrained(str(tiny_model_dir))
    gpu_model = GPT2.from_pretrained(str(tiny_model_dir), device="cuda", dtype=torch.float16)
    ids = tok.encode("A prompt for the graph test")

    def reqs():
        return [Request(f"r{n}", ids, _greedy(n, 12), prefix_key=f"p{n}", soft_prompt=prompts[n]) for n in prompts]

    ref = [o.token_ids for o in Engine(ref_model, tok, EngineConfig(max_num_seqs=8)).generate(reqs())]
    eng = Engine(gpu_model, tok, EngineConfig(max_num_seqs=8))
    assert eng.static is not None and eng.static.capture
    got = [o.token_ids for o in eng.generate(reqs())]
    assert eng.static._graphs  # decode steps were captured and replayed
    assert gpu_model.backend.head_full is not None and gpu_model.backend.head_full.shape[0] % 64 == 0  # aligned LM head
    same = sum(a == b for a, b in zip(got, ref)) / len(ref)
    assert same >= 0.75, (got, ref)
    # a seeded sampled request beside greedy ones: the graph hands back logits for sampling,
    # and the same seed gives the same tokens twice; the greedy rows keep their tokens
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)

    def mixed():
        return [Request(f"m{n}", ids, sampled if n == 4 else _greedy(n, 12), prefix_key=f"p{n}",
                        soft_prompt=prompts[n]) for n in prompts]

    first, second = ([o.token_ids for o in eng.generate(mixed())] for _ in range(2))
    assert first == second
    assert [t for t, n in zip(first, prompts) if n != 4] == [t for t, n in zip(got, prompts) if n != 4]


def test_warm_prefix_ahead_of_first_request(setup):
    base, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=2))
    eng.warm_prefix("v9", prompts[9])
    eng.step()  # no requests: only the warm-up runs
    assert "v9" in eng.prefixes and eng.prefixes.stats()["computed"] == 1
    ids = tok.encode("warm start")
    out = eng.generate([Request("w", ids, _greedy(9, 6), prefix_key="v9", soft_prompt=prompts[9])])[0]
    st = eng.prefixes.stats()
    assert (st["computed"], st["hits"], st["misses"]) == (1, 1, 0)  # served from the warmed entry
    assert out.token_ids == peft_greedy(peft_model(base, prompts[9]), ids, 6)


def test_rows_of_one_task_admitted_together_share_one_prefix_copy(setup, monkeypatch):
    """Three rows of one task and one of another admitted in one step: the prefix goes
    into the three slots in one write, and every row still equals PEFT's greedy output."""
    base, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4))
    eng.cache._kv.fill_(float("nan"))
    writes = []
    real = eng.cache.write_prefix
    monkeypatch.setattr(eng.cache, "write_prefix", lambda slots, p: writes.append(list(slots)) or real(slots, p))
    g = torch.Generator().manual_seed(21)
    specs = [(9, torch.randint(0, 50257, (ln,), generator=g).tolist()) for ln in (4, 11, 7)]
    specs.append((4, torch.randint(0, 50257, (5,), generator=g).tolist()))
    outs = eng.generate([Request(f"s{i}", ids, _greedy(n, 8), prefix_key=f"p{n}", soft_prompt=prompts[n])
                         for i, (n, ids) in enumerate(specs)])
    assert sorted(map(len, writes)) == [1, 3]
    for (n, ids), out in zip(specs, outs):
        assert out.token_ids == peft_greedy(peft_model(base, prompts[n]), ids, 8)


def test_prefix_hits_and_misses_count_requests(setup):
    """A request whose prefix had to be computed for it is a miss (once, not also a hit);
    a second request of that task in the same step, and a later one, are hits."""
    _, model, tok, prompts = setup
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4))
    ids = tok.encode("count me")
    def req(rid):
        return Request(rid, ids, _greedy(4, 2), prefix_key="p4", soft_prompt=prompts[4])
    eng.generate([req("a"), req("b")])  # admitted in one step: one computation
    st = eng.prefixes.stats()
    assert (st["computed"], st["misses"], st["hits"]) == (1, 1, 1)
    eng.generate([req("c")])
    st = eng.prefixes.stats()
    assert (st["computed"], st["misses"], st["hits"]) == (1, 1, 2)


def test_idle_engine_gathers_a_burst_then_stops_waiting(setup):
    """While arrivals keep coming the idle engine waits another window; once they pause it
    goes (one window after the last arrival); once they fill the batch it goes at once; it
    never waits past the max wait. Real threads and clocks, generous margins."""
    _, model, tok, _ = setup
    ids = tok.encode("burst")

    def burst(max_seqs: int, window: float, max_wait: float, n: int, gap: float) -> tuple[Engine, float, int]:
        """One request, then `n` more `gap` apart on another thread: (the engine, how long
        its burst wait took, how many had arrived when it ended)."""
        eng = Engine(model, tok, EngineConfig(max_num_seqs=max_seqs, admission_window_s=window,
                                              admission_max_wait_s=max_wait))
        eng.add_request(Request("first", ids, _greedy(0, 2)))

        def arrive():
            for k in range(n):
                time.sleep(gap)
                eng.add_request(Request(f"b{k}", ids, _greedy(0, 2)))
        t = threading.Thread(target=arrive)
        t0 = time.monotonic()
        t.start()
        eng._await_burst()
        took, waiting = time.monotonic() - t0, eng.num_waiting
        t.join()
        return eng, took, waiting

    # 6 more arrivals 0.1 s apart, inside a 0.4 s window: the wait ends ~0.4 s after the last
    eng, took, waiting = burst(8, 0.4, 10.0, 6, 0.1)
    assert waiting == 7 and 0.6 + 0.4 - 0.05 <= took < 0.6 + 0.4 + 0.35
    eng.step()
    assert eng.num_running == 7  # the whole burst prefilled in one step
    # the batch (8) fills after 7 more arrivals: no window after the last one
    _, took, waiting = burst(8, 2.0, 10.0, 7, 0.02)
    assert waiting == 8 and took < 1.0
    # arrivals that never pause: the max wait ends it
    _, took, waiting = burst(64, 0.3, 0.5, 20, 0.05)
    assert 0.45 <= took < 0.8 and waiting < 21


def test_step_that_fails_once_is_rerun_and_nobody_fails(setup, monkeypatch):
    """A step that raises once (nothing wrong with any row) is re-run in halves: every request
    finishes normally with the tokens it gets alone, and the slots and prefix references return."""
    _, model, tok, prompts = setup
    ids = tok.encode("this step will fail once")
    alone = Engine(model, tok, EngineConfig(max_num_seqs=2)).generate(
        [Request("ref", ids, _greedy(4, 5), prefix_key="p4", soft_prompt=prompts[4])])[0].token_ids
    eng = Engine(model, tok, EngineConfig(max_num_seqs=2))
    seen = []
    for i in range(2):
        eng.add_request(Request(f"e{i}", ids, _greedy(4, 5), prefix_key="p4", soft_prompt=prompts[4],
                                on_output=seen.append))
    real = model.forward_step
    calls = []

    def broken(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(model, "forward_step", broken)
    eng.run(until=lambda: bool(calls) and not eng.scheduler.has_work())
    finals = [o for o in seen if o.finished]
    assert sorted(o.finish_reason for o in finals) == ["length", "length"]
    assert all(o.token_ids == alone for o in finals)
    assert eng.cache.num_free == 2 and not eng.requests
    assert eng.prefixes.stats()["entries"] == 1 and eng.prefixes.stats()["in_use"] == 0


def test_greedy_sampled_and_logprob_rows_in_one_step(setup):
    """One step holding plain greedy rows (fast greedy path), a greedy row with logprobs and
    a seeded sampled row (full logits): each gets what it gets alone."""
    base, model, tok, prompts = setup
    ids = tok.encode("Rows of every kind share this step")
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=7, ignore_eos=True)
    with_lp = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)

    def req(name, params, n=9):
        return Request(name, ids, params, prefix_key=f"p{n}", soft_prompt=prompts[n])

    eng = Engine(model, tok, EngineConfig(max_num_seqs=8))
    outs = eng.generate([req("g", _greedy(9, 8)), req("s", sampled), req("l", with_lp), req("g4", _greedy(4, 8), 4)])
    alone = Engine(model, tok, EngineConfig(max_num_seqs=8))
    assert outs[1].token_ids == alone.generate([req("s", sampled)])[0].token_ids
    ref = peft_greedy(peft_model(base, prompts[9]), ids, 8)
    assert outs[0].token_ids == outs[2].token_ids == ref
    assert outs[3].token_ids == peft_greedy(peft_model(base, prompts[4]), ids, 8)
    assert len(outs[2].logprobs) == 8 and outs[0].logprobs == []


def test_detokenizer_decodes_once_per_token(setup):
    """Streaming with stop strings asks for the text after every token (add + delta); the
    ids are decoded once per new token, not once per ask."""
    from server.engine.output import Detokenizer

    _, _, tok, _ = setup
    calls = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return tok.decode(ids)

    d = Detokenizer(Counting(), ("never appears",), eos_token_id=50256)
    ids = tok.encode("one two three four five six")
    streamed = ""
    for t in ids:
        assert not d.add(t)
        streamed += d.delta()
    streamed += d.delta(final=True)
    assert streamed == d.final_text() == tok.decode(ids)
    assert len(calls) == len(ids)


def test_repetition_penalty_matches_hf(setup):
    """`repetition_penalty` (over prompt + output ids, as HF's logits processor) gives PEFT's
    own greedy generate with the same penalty, and changes the output."""
    base, model, tok, prompts = setup
    ids = tok.encode("again and again and again")
    p = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5, ignore_eos=True)
    eng = Engine(model, tok, EngineConfig(max_num_seqs=2))
    got = eng.generate([Request("rp", ids, p, prefix_key="p9", soft_prompt=prompts[9])])[0].token_ids
    pm = peft_model(base, prompts[9])
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                          use_cache=False, repetition_penalty=1.5, pad_token_id=50256, eos_token_id=None)
    assert got == ref[0, len(ids):].tolist()
    assert got != peft_greedy(pm, ids, 12)


def test_kv_memory_order_does_not_change_bf16_tokens(tiny_model_dir):
    """bf16 on CPU defaults to the token-major KV cache; head-major gives the same tokens."""
    model = GPT2.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    soft = {n: torch.randn(n, model.spec.n_embd, generator=g) * 0.4 for n in (3, 11)}
    specs = [(n, torch.randint(0, 50257, (length,), generator=g).tolist()) for n, length in
             [(3, 9), (11, 21), (3, 4), (11, 13), (3, 30)]]
    outs = {}
    for token_major in (None, False):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=3, max_num_batched_tokens=24, kv_token_major=token_major))
        assert eng.cache.token_major == (token_major is None)
        reqs = [Request(f"r{i}", ids, _greedy(n, 12), prefix_key=f"p{n}", soft_prompt=soft[n])
                for i, (n, ids) in enumerate(specs)]
        outs[token_major] = [o.token_ids for o in eng.generate(reqs)]
    assert outs[None] == outs[False]
    assert len({tuple(o) for o in outs[None]}) > 1


def test_prefixes_of_one_batch_are_not_recomputed_when_the_cache_is_full(setup, monkeypatch):
    """Prefixes computed for a step's admissions are used even if a later insert of the
    same step evicted them (prefix cache smaller than the batch's prefixes)."""
    base, model, tok, prompts = setup
    one = model.prefix_kv(prompts[9]).nbytes
    eng = Engine(model, tok, EngineConfig(max_num_seqs=4, prefix_cache_bytes=one))  # room for ~one prefix
    calls = []
    real = model.prefix_kv
    monkeypatch.setattr(model, "prefix_kv", lambda sp: calls.append(sp.shape[0]) or real(sp))
    g = torch.Generator().manual_seed(8)
    specs = [(n, torch.randint(0, 50257, (6,), generator=g).tolist()) for n in (9, 17, 4)]
    reqs = [Request(f"r{i}", ids, _greedy(n, 5), prefix_key=f"k{n}", soft_prompt=prompts[n])
            for i, (n, ids) in enumerate(specs)]
    outs = eng.generate(reqs)
    assert calls == []  # every prefix came from the step's one batched computation
    assert eng.prefixes.stats()["evictions"] >= 1  # the cap did bite
    for (n, ids), out in zip(specs, outs):
        assert out.token_ids == peft_greedy(peft_model(base, prompts[n]), ids, 5)


@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_write_prefix_into_several_slots(token_major):
    from server.engine.kv_cache import KVCache

    c = KVCache(n_layer=2, n_head=3, head_dim=4, max_len=16, num_slots=4, device="cpu", dtype=torch.bfloat16,
                token_major=token_major)
    c._kv.zero_()
    p = torch.randn(2, 2, 3, 5, 4).to(torch.bfloat16)  # [L, 2, H, n, D]
    c.write_prefix([0, 2], p)
    for s in (0, 2):
        for layer in (0, 1):
            assert torch.equal(c.k[layer][s, :, :5], p[layer, 0]) and torch.equal(c.v[layer][s, :, :5], p[layer, 1])
    assert not c._kv[:, :, [1, 3]].any() and not c.k[0][0, :, 5:].any()


def test_a_kv_budget_smaller_than_the_batch_is_named(setup, caplog):
    """The KV-cache budget caps the running sequences; the engine says so instead of silently
    running fewer than --max-batch-size."""
    from server.engine.kv_cache import slot_bytes

    _, model, tok, _ = setup
    s = model.spec
    per_slot = slot_bytes(n_layer=s.n_layer, n_head=s.n_head, head_dim=s.head_dim, max_len=s.n_positions,
                          dtype=torch.float32)
    with caplog.at_level("WARNING", logger="polyprompt.engine"):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=8, kv_cache_bytes=3 * per_slot))
    assert eng.cache.num_slots == 3
    assert "fewer than the 8 sequences" in caplog.text and "--kv-cache-gb" in caplog.text
