"""The int8 KV cache (`--kv-cache-dtype int8`): its quantizer (native and torch, bit-equal),
native decode and prefill attention over it against float64 attention over the dequantized
cache, the engine on it, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernels
from server.engine.kv_cache import KVCache, quantize_kv, slot_bytes

LIB = cpu_kernels.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="SKIPPED LOUDLY: the native kernels cannot run here (no "
                                  "AVX-512 or no C compiler), so the int8 KV cache cannot either")


def _cache(*, heads=4, head_dim=64, max_len=96, slots=5, layers=1) -> KVCache:
    return KVCache(n_layer=layers, n_head=heads, head_dim=head_dim, max_len=max_len, num_slots=slots,
                   device="cpu", dtype=torch.bfloat16, quantized=True)


def _fill(cache: KVCache, g: torch.Generator, std: float = 2.0) -> None:
    """Every position of every slot written by the native quantizer from random keys/values."""
    n_slots, h, m, d = cache.k[0].shape
    slots = torch.arange(n_slots).repeat_interleave(m)
    pos = torch.arange(m).repeat(n_slots)
    for i in range(len(cache.kv)):
        src = torch.randn(len(slots), 2, h, d, generator=g) * std
        src[::7] *= 30  # some tokens far larger than the rest: their own scale
        src[5] = 0  # an all-zero token: scale 0, no NaN
        cpu_kernels.write_kv(LIB, cache.kv[i], src, slots, pos, scale=cache.scale[i])


def _dequant(cache: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    ks, vs = cache.scales(layer)
    return (cache.k[layer].double() * ks.double().unsqueeze(-1), cache.v[layer].double() * vs.double().unsqueeze(-1))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_quantizer_equals_quantize_kv(dtype):
    g = torch.Generator().manual_seed(0)
    cache = _cache(slots=7, max_len=64)
    n, h, d = 200, 4, 64
    flat = torch.randperm(7 * 64, generator=g)[:n]
    slots, pos = flat // 64, flat % 64
    qkv = (torch.randn(n, 3 * h * d, generator=g) * 3).to(dtype)  # K and V inside a wider row, as in a step
    qkv[3, h * d:] = 0
    src = qkv[:, h * d:].view(n, 2, h, d)
    cpu_kernels.write_kv(LIB, cache.kv[0], src, slots, pos, scale=cache.scale[0])
    q, scale = quantize_kv(src)  # [n, 2, H, D], [n, 2, H]
    got_q = cache.kv[0][:, slots, :, pos]  # [n, 2, H, D]
    got_s = cache.scale[0][:, slots, :, pos]  # [n, 2, H]
    assert torch.equal(got_q, q) and torch.equal(got_s, scale)
    assert got_s[3].eq(0).all() and got_q[3].eq(0).all()
    # the round trip is within half a step of each vector's own scale
    err = (q.double() * scale.double().unsqueeze(-1) - src.double()).abs()
    assert (err <= scale.double().unsqueeze(-1) * 0.5 + 1e-6).all()
    assert q.abs().max() == 127


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_over_int8_matches_dequantized(dtype):
    g = torch.Generator().manual_seed(1)
    cache = _cache(heads=3, max_len=96, slots=5, layers=2)
    _fill(cache, g)
    slots = torch.tensor([4, 0, 2, 1])
    lens = torch.tensor([1, 17, 96, 40])
    q = (torch.randn(4, 3, 3 * 64, generator=g) * 2).to(dtype)[:, :, 64:128]
    got = cpu_kernels.decode_attention(LIB, q, cache.k[1], cache.v[1], slots, lens, scales=cache.scales(1))
    assert got.dtype == dtype and got.shape == (4, 3, 64)
    k, v = _dequant(cache, 1)
    ref = torch.stack([F.scaled_dot_product_attention(q[b].double().unsqueeze(1), k[s, :, :n], v[s, :, :n]).squeeze(1)
                       for b, (s, n) in enumerate(zip(slots.tolist(), lens.tolist()))])
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() < tol


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_attention_over_int8_matches_dequantized(dtype):
    g = torch.Generator().manual_seed(2)
    cache = _cache(heads=2, max_len=80, slots=4)
    _fill(cache, g)
    slots, pasts, qlens = torch.tensor([3, 1]), torch.tensor([0, 21]), torch.tensor([9, 30])
    q = (torch.randn(39, 2, 64, generator=g) * 2).to(dtype)
    got = cpu_kernels.prefill_attention(LIB, q, cache.k[0], cache.v[0], slots, pasts, qlens,
                                        scales=cache.scales(0))
    k, v = _dequant(cache, 0)
    refs, start = [], 0
    for s, p, n in zip(slots.tolist(), pasts.tolist(), qlens.tolist()):
        mask = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]
        refs.append(F.scaled_dot_product_attention(q[start:start + n].double().transpose(0, 1), k[s, :, :p + n],
                                                   v[s, :, :p + n], attn_mask=mask).transpose(0, 1))
        start += n
    ref = torch.cat(refs)
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() < tol


@needs_kernel
def test_int8_cache_refuses_what_it_cannot_read():
    cache = _cache()
    q = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="int8"):  # int8 keys without their scales
        cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0], torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError):  # scales of the wrong shape
        ks, vs = cache.scales(0)
        cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0], torch.tensor([0]), torch.tensor([1]),
                                     scales=(ks[:, :2], vs[:, :2]))
    with pytest.raises(ValueError):  # an int8 write needs the scales
        cpu_kernels.write_kv(LIB, cache.kv[0], torch.zeros(1, 2, 4, 64), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="CPU"):
        KVCache(n_layer=1, n_head=4, head_dim=64, max_len=8, num_slots=1, device="meta", dtype=torch.float32,
                quantized=True)


def test_int8_slot_holds_about_half_a_bf16_slot():
    kw = dict(n_layer=12, n_head=12, head_dim=64, max_len=1024)
    assert slot_bytes(**kw, dtype=torch.int8) == 2 * 12 * 12 * 1024 * (64 + 4)
    assert slot_bytes(**kw, dtype=torch.int8) / slot_bytes(**kw, dtype=torch.bfloat16) == pytest.approx(68 / 128)
    cache = _cache(layers=2)
    assert cache.nbytes == 2 * 2 * 6 * 96 * 4 * (64 + 4)  # the spare slot included


@needs_kernel
def test_write_prefix_quantizes_like_the_step_write():
    g = torch.Generator().manual_seed(3)
    a, b, c = _cache(layers=2, slots=3), _cache(layers=2, slots=3), _cache(layers=2, slots=3)
    prefix = torch.randn(2, 2, 4, 11, 64, generator=g).to(torch.bfloat16)  # [L, 2, H, n, D]
    a.write_prefix([0, 2], prefix)
    kept = c.prefix_form(prefix)  # what the prefix cache keeps for an int8 cache: quantized once
    assert kept.q.dtype == torch.int8 and kept.shape == prefix.shape and kept.nbytes == prefix.nbytes * 68 // 128
    c.write_prefix([0, 2], kept)
    for i in range(2):
        src = prefix[i].permute(2, 0, 1, 3)  # [n, 2, H, D]
        for slot in (0, 2):
            cpu_kernels.write_kv(LIB, b.kv[i], src, torch.full((11,), slot), torch.arange(11), scale=b.scale[i])
    for i in range(2):
        for slot in (0, 2):
            for x in (a, c):
                assert torch.equal(x.kv[i][:, slot, :, :11], b.kv[i][:, slot, :, :11])
                assert torch.equal(x.scale[i][:, slot, :, :11], b.scale[i][:, slot, :, :11])


def _engine_run(model, tok, specs, souls, **config):
    from server.engine.engine import Engine, EngineConfig, Request
    from server.engine.sampler import SamplingParams

    eng = Engine(model, tok, EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, **config))
    reqs = [Request(f"r{i}", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0),
                    prefix_key=f"p{n}", soft_prompt=souls[n]) for i, (n, ids) in enumerate(specs)]
    return eng, eng.generate(reqs)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_on_the_int8_cache_is_close_to_the_float_one(tiny_model_dir, dtype):
    """Mixed tasks with soft prompts (their prefixes quantized into the slots), chunked
    prefill and decode on the int8 cache: prompt log-probs within a few hundredths of the
    float cache's and most greedy tokens the same; a row's answer does not depend on its
    batch (each token's K/V is quantized alone)."""
    from transformers import AutoTokenizer

    from server.model import GPT2

    model = GPT2.from_pretrained(str(tiny_model_dir), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(4)
    souls = {n: torch.randn(n, model.spec.n_embd, generator=g) * 0.4 for n in (3, 9)}
    specs = [(n, torch.randint(0, 50257, (length,), generator=g).tolist()) for n, length in
             [(9, 20), (3, 9), (9, 31), (3, 5)]]
    _, ref = _engine_run(model, tok, specs, souls)
    eng, got = _engine_run(model, tok, specs, souls, kv_cache_dtype="int8")
    assert eng.cache.quantized and eng.cache.k[0].dtype == torch.int8
    assert eng.memory_report()["kv_cache_dtype"] == "int8" and eng.describe_cache().startswith("int8")
    assert eng.prefixes.stats()["bytes"] < sum(2 * 2 * n * model.spec.n_embd * model.spec.n_layer for n in souls)
    diffs = [abs(a.logprob - b.logprob) for o, r in zip(got, ref)
             for a, b in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:])]
    assert len(diffs) == sum(len(ids) - 1 for _, ids in specs) and max(diffs) < 0.15, max(diffs)
    same = sum(a == b for o, r in zip(got, ref) for a, b in zip(o.token_ids, r.token_ids))
    assert same >= 0.75 * 12 * len(specs), same
    _, alone = _engine_run(model, tok, specs[2:3], souls, kv_cache_dtype="int8")
    assert list(alone[0].token_ids) == list(got[2].token_ids)


def test_kv_cache_dtype_is_checked(tiny_model_dir):
    from transformers import AutoTokenizer

    from server.engine.engine import Engine, EngineConfig
    from server.model import GPT2

    model = GPT2.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        Engine(model, tok, EngineConfig(max_num_seqs=2, kv_cache_dtype="fp8"))
    model.set_native_kernels(False)
    with pytest.raises(ValueError, match="native CPU kernels"):
        Engine(model, tok, EngineConfig(max_num_seqs=2, kv_cache_dtype="int8"))


@needs_kernel
def test_server_with_an_int8_kv_cache(tiny_model_dir, tmp_path):
    import httpx

    from tests.serverutil import running_server

    with running_server(tiny_model_dir, tmp_path / "data", "--kv-cache-dtype", "int8") as url:
        health = httpx.get(f"{url}/health").json()
        assert health["kv_cache_dtype"] == "int8" and health["paths"]["kv-cache"].startswith("int8")
        assert health["memory"]["kv_cache_dtype"] == "int8"
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": [464, 3290, 318],
                                                     "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
