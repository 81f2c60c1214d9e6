"""The native CPU decode-attention kernel (`server.cpu_kernels`) against SDPA, and its fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernels, cpu_matmul
from server.engine.kv_cache import KVCache

LIB = cpu_kernels.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="the native kernel cannot run here (no AVX-512 or no C compiler)")


def _random_cache(dtype, token_major, *, seed, heads, head_dim, max_len, slots, layers=1, std=1.0):
    """A KV cache full of random values, and the generator (to draw the queries from)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(n_layer=layers, n_head=heads, head_dim=head_dim, max_len=max_len, num_slots=slots,
                    device="cpu", dtype=dtype, token_major=token_major)
    cache._kv.copy_(torch.randn(cache._kv.shape, generator=g) * std)
    return cache, g


def _reference(q, cache, layer, slots, lens):
    """Per row: float64 SDPA over its own slot's first `len` positions."""
    out = []
    for b, (slot, n) in enumerate(zip(slots.tolist(), lens.tolist())):
        k = cache.k[layer][slot, :, :n].double()  # [H, n, D]
        v = cache.v[layer][slot, :, :n].double()
        out.append(F.scaled_dot_product_attention(q[b].double().unsqueeze(1), k, v).squeeze(1))
    return torch.stack(out)  # [B, H, D]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
@pytest.mark.parametrize("h, d", [(4, 64), (3, 32)], ids=["D64", "D32"])  # the D = 64 body and the generic one
def test_decode_attention_matches_sdpa(dtype, token_major, h, d):
    cache, g = _random_cache(dtype, token_major, seed=0, heads=h, head_dim=d, max_len=300, slots=6, layers=2, std=2)
    # rows out of slot order, lengths 1, shorter than the prefetch distance, not multiples
    # of 16, and the whole slot; nothing past a row's length may be read: fill the rest of
    # its slot with NaN
    slots = torch.tensor([4, 0, 2, 5, 1, 3])
    lens = torch.tensor([1, 17, 40, 300, 129, 3])
    for slot, n in zip(slots.tolist(), lens.tolist()):
        cache._kv[:, :, slot, :, n:] = float("nan")
    q = (torch.randn(len(slots), h, 3 * d, generator=g) * 2).to(dtype)[:, :, d:2 * d]  # strided, as in a step
    layer = 1
    got = cpu_kernels.decode_attention(LIB, q, cache.k[layer], cache.v[layer], slots, lens)
    assert got.dtype == dtype and got.shape == (len(slots), h, d)
    ref = _reference(q, cache, layer, slots, lens)
    err = (got.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-5
    else:  # as close as SDPA's own bf16 kernel gets (its output is rounded to bf16 too)
        sdpa = torch.stack([F.scaled_dot_product_attention(
            q[b].unsqueeze(1), cache.k[layer][s, :, :n], cache.v[layer][s, :, :n]).squeeze(1)
            for b, (s, n) in enumerate(zip(slots.tolist(), lens.tolist()))])
        assert err <= 1.5 * (sdpa.double() - ref).abs().max().item() + 1e-6
    assert torch.isfinite(got).all()


@needs_kernel
def test_decode_attention_rejects_mismatched_layouts():
    cache = KVCache(n_layer=1, n_head=2, head_dim=16, max_len=8, num_slots=2, device="cpu", dtype=torch.float32)
    q = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError):
        cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0].transpose(1, 2).contiguous().transpose(1, 2),
                                     torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError):
        cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0], torch.tensor([0], dtype=torch.int32),
                                     torch.tensor([1]))


def _load_in_subprocess(tmp_path, code="from server import cpu_kernels; print(cpu_kernels.load() is not None)",
                        **env) -> str:
    run_env = {**os.environ, "POLYPROMPT_KERNEL_CACHE": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kernels_can_be_switched_off(tmp_path):
    assert _load_in_subprocess(tmp_path, POLYPROMPT_CPU_KERNELS="0") == "False"


def test_a_failing_compiler_falls_back_to_sdpa(tmp_path):
    """No usable compiler: load() says None (the model keeps SDPA) instead of failing."""
    assert _load_in_subprocess(tmp_path, CC="/bin/false") == "False"
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_build_is_cached_by_source_and_flags(tmp_path):
    assert _load_in_subprocess(tmp_path) == "True"
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert _load_in_subprocess(tmp_path) == "True"  # second process: loads the cached build
    assert built[0].stat().st_mtime_ns == mtime and len(list(tmp_path.rglob("*.so"))) == 1


@needs_kernel
@pytest.mark.parametrize("vocab", [5, 16, 50257])
def test_argmax_rows_is_torch_argmax(vocab):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(9, vocab + 3, generator=g) * 3).to(torch.bfloat16)[:, :vocab]  # strided rows
    x[1] = x[1].round()  # many ties: the first maximum wins
    x[2] = float("-inf")
    x[3, vocab // 2] = float("nan")  # torch: a NaN is the maximum
    x[3, vocab - 1] = float("nan")
    x[4, -1] = 100.0  # in the tail past the last whole group of 16
    x[5, 0] = 100.0
    x[6] = 7.0  # all equal
    x[7, vocab // 3] = float("inf")
    assert cpu_kernels.argmax_rows(LIB, x) == x.argmax(-1).tolist()
    with pytest.raises(ValueError):
        cpu_kernels.argmax_rows(LIB, x.float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_write_kv_is_index_put(dtype, token_major):
    g = torch.Generator().manual_seed(2)
    h, d = 4, 32
    caches = [KVCache(n_layer=1, n_head=h, head_dim=d, max_len=64, num_slots=7, device="cpu", dtype=dtype,
                      token_major=token_major) for _ in range(2)]
    for c in caches:
        c._kv.zero_()
    n = 300  # past the kernel's threading threshold
    flat = torch.randperm(8 * 64, generator=g)[:n]  # distinct (slot, position) pairs, spare slot too
    slots, pos = flat // 64, flat % 64
    qkv = torch.randn(n, 3 * h * d, generator=g).to(dtype)  # K and V inside a wider row, as in a step
    src = qkv[:, h * d:].view(n, 2, h, d)
    caches[0].kv[0][:, slots, :, pos] = src
    cpu_kernels.write_kv(LIB, caches[1].kv[0], src, slots, pos)
    assert torch.equal(caches[0]._kv, caches[1]._kv)


def test_out_of_range_positions_are_refused_before_any_write(tiny_model_dir):
    from server.model import GPT2, StepMeta

    m = GPT2.from_pretrained(str(tiny_model_dir))
    cache = KVCache(n_layer=m.spec.n_layer, n_head=m.spec.n_head, head_dim=m.spec.head_dim, max_len=16,
                    num_slots=2, device="cpu", dtype=torch.float32)
    cache._kv.zero_()
    meta = StepMeta(slot=torch.tensor([0, 1]), n_decode=0, prefill_slots=torch.tensor([0, 1]), prefill_q=1,
                    prefill_len=17, prefill_dest=torch.tensor([0, 1]),
                    prefill_mask=torch.zeros(2, 1, 1, 17))
    with torch.inference_mode(), pytest.raises(IndexError):
        m.forward_step(torch.tensor([1, 2]), torch.tensor([3, 16]), meta, cache)
    assert not cache._kv.any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_prefill_attention_matches_causal_sdpa(dtype, token_major):
    h, d = 3, 32
    cache, g = _random_cache(dtype, token_major, seed=3, heads=h, head_dim=d, max_len=200, slots=5)
    # (slot, past, qlen): a fresh prompt, chunks continuing earlier ones, one token, a long one
    rows = [(3, 0, 7), (0, 20, 33), (4, 5, 1), (1, 0, 150), (2, 180, 20)]
    for slot, past, n in rows:
        cache._kv[:, :, slot, :, past + n:] = float("nan")  # never read past a row's last query
    total = sum(n for _, _, n in rows)
    q = (torch.randn(total, h, 3 * d, generator=g)).to(dtype)[:, :, :d]
    slots, pasts, qlens = (torch.tensor(c) for c in zip(*rows))
    got = cpu_kernels.prefill_attention(LIB, q, cache.k[0], cache.v[0], slots, pasts, qlens)
    start, worst, worst_sdpa = 0, 0.0, 0.0
    for slot, past, n in rows:
        k = cache.k[0][slot, :, :past + n]
        v = cache.v[0][slot, :, :past + n]
        qr = q[start:start + n].transpose(0, 1)  # [H, n, D]
        allowed = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]
        ref = F.scaled_dot_product_attention(qr.double(), k.double(), v.double(), attn_mask=allowed)
        sdpa = F.scaled_dot_product_attention(qr, k, v, attn_mask=allowed)
        worst = max(worst, (got[start:start + n].transpose(0, 1).double() - ref).abs().max().item())
        worst_sdpa = max(worst_sdpa, (sdpa.double() - ref).abs().max().item())
        start += n
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert worst < 1e-5
    else:
        assert worst <= 1.5 * worst_sdpa + 1e-6


@needs_kernel
def test_attention_wrappers_refuse_what_the_c_code_cannot_check():
    cache = KVCache(n_layer=1, n_head=2, head_dim=16, max_len=8, num_slots=2, device="cpu", dtype=torch.float32)
    cache._kv.zero_()
    one = torch.tensor([0])
    for q in (torch.zeros(1, 2, 16, dtype=torch.float16),  # a dtype the kernels do not have
              torch.zeros(1, 2, 16, dtype=torch.bfloat16),  # not the cache's dtype
              torch.zeros(1, 3, 16),  # more heads than the cache
              torch.zeros(1, 2, 32)):  # another head size
        with pytest.raises(ValueError):
            cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0], one, torch.tensor([1]))
        with pytest.raises(ValueError):
            cpu_kernels.prefill_attention(LIB, q, cache.k[0], cache.v[0], one, torch.tensor([0]), torch.tensor([1]))
    assert len(cpu_kernels._openmp_runtimes()) == 1  # loaded into torch's own OpenMP runtime


@needs_kernel
def test_more_heads_than_the_decode_kernel_holds_are_refused():
    # the decode kernel keeps one float per head on its stack (MAX_HEADS)
    assert cpu_kernels.supports(torch.float32, 16, 8, cpu_kernels.MAX_HEADS)
    assert not cpu_kernels.supports(torch.float32, 16, 8, cpu_kernels.MAX_HEADS + 1)
    h = cpu_kernels.MAX_HEADS + 1
    cache = KVCache(n_layer=1, n_head=h, head_dim=16, max_len=2, num_slots=1, device="cpu", dtype=torch.float32)
    cache._kv.zero_()
    with pytest.raises(ValueError):
        cpu_kernels.decode_attention(LIB, torch.zeros(1, h, 16), cache.k[0], cache.v[0], torch.tensor([0]),
                                     torch.tensor([1]))


def test_prefill_rows_that_do_not_match_the_step_are_refused(tiny_model_dir):
    from server.model import GPT2, StepMeta

    m = GPT2.from_pretrained(str(tiny_model_dir))
    if not m.native_kernels:
        pytest.skip("the native kernels cannot run here")
    cache = KVCache(n_layer=m.spec.n_layer, n_head=m.spec.n_head, head_dim=m.spec.head_dim, max_len=16,
                    num_slots=2, device="cpu", dtype=torch.float32)
    cache._kv.zero_()
    for pasts, qlens in (([0, 0], [1, 2]),  # 3 prefill tokens for a 2-token step
                         ([0, 16], [1, 1])):  # the second row runs past the cache
        meta = StepMeta(slot=torch.tensor([0, 1]), n_decode=0, prefill_slots=torch.tensor([0, 1]), prefill_q=2,
                        prefill_len=16, prefill_dest=torch.tensor([0, 2]), prefill_mask=torch.zeros(2, 1, 2, 16),
                        prefill_pasts=torch.tensor(pasts), prefill_qlens=torch.tensor(qlens))
        with torch.inference_mode(), pytest.raises(IndexError):
            m.forward_step(torch.tensor([1, 2]), torch.tensor([0, 15]), meta, cache)
    assert not cache._kv.any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nan_key_within_the_row_gives_nan_not_a_silent_average(dtype):
    cache, g = _random_cache(dtype, False, seed=5, heads=2, head_dim=16, max_len=40, slots=2)
    cache.k[0][1, 0, 7] = float("nan")  # slot 1, head 0, position 7
    q = torch.randn(1, 2, 16, generator=g).to(dtype)
    got = cpu_kernels.decode_attention(LIB, q, cache.k[0], cache.v[0], torch.tensor([1]), torch.tensor([20]))
    assert got[0, 0].isnan().all() and torch.isfinite(got[0, 1]).all()
    pre = cpu_kernels.prefill_attention(LIB, q, cache.k[0], cache.v[0], torch.tensor([1]), torch.tensor([19]),
                                        torch.tensor([1]))
    assert pre[0, 0].isnan().all() and torch.isfinite(pre[0, 1]).all()


def test_load_refuses_a_second_openmp_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYPROMPT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_openmp_runtimes", lambda: {"/a/libgomp.so.1", "/b/libgomp-1a2b.so.1"})
    assert cpu_kernels.load() is None


def test_masks_are_built_only_by_the_sdpa_path(tiny_model_dir, monkeypatch):
    """Steps carry key lengths, not masks: SDPA builds its masks once a step, the native
    kernels never (a 64-row prefill mask costs ~1 ms to build)."""
    from transformers import AutoTokenizer

    from server.engine.engine import Engine, EngineConfig, Request
    from server.engine.sampler import SamplingParams
    from server.model import GPT2

    m = GPT2.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    metas = []
    real = m.forward_step
    monkeypatch.setattr(m, "forward_step",
                        lambda ids, pos, meta, cache: (metas.append(meta), real(ids, pos, meta, cache))[1])
    for native in ([True, False] if m.native_kernels else [False]):
        m.set_native_kernels(native)
        metas.clear()
        Engine(m, tok, EngineConfig(max_num_seqs=2)).generate(
            [Request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
             for i in range(2)])
        assert any(x.n_decode for x in metas) and any(x.prefill_pasts is not None for x in metas)
        built = [x.decode_mask is not None for x in metas if x.n_decode] + \
            [x.prefill_mask is not None for x in metas if x.prefill_pasts is not None]
        assert all(built) if not native else not any(built)


AMX = cpu_matmul.amx(LIB)
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX-BF16 here (or the kernels were built without it)")


@needs_amx
@pytest.mark.parametrize("n,k", [(384, 128), (50257, 64), (40, 96)], ids=["blocks", "vocab-tail", "small"])
@pytest.mark.parametrize("m", [1, 13, 16, 64, 67, 130])
def test_linear_amx_is_the_rounded_exact_matmul(n, k, m):
    """bf16 x . W^T + b (and its tanh-GELU) against float64: within one rounding to bf16 of
    the exact value (half a bf16 ulp, plus float32 accumulation); row counts that are not a
    multiple of 16 or span several 64-row groups, output counts that are not a multiple of
    16 (GPT-2's vocabulary)."""
    g = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    packed = cpu_matmul.pack_amx(w)
    for bias in (b, None):
        exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        for gelu in (False, True):
            ref = F.gelu(exact, approximate="tanh") if gelu else exact
            got = cpu_matmul.linear_amx(LIB, x, packed, n, bias, gelu)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 * 1.01 + 1e-5 * k).all()
            # nearly always exactly the correctly rounded value
            assert (got == ref.to(torch.bfloat16)).double().mean() > 0.75


@needs_amx
def test_linear_amx_refuses_what_the_c_code_cannot_check():
    w = torch.randn(48, 64).to(torch.bfloat16)
    with pytest.raises(ValueError):
        cpu_matmul.pack_amx(torch.randn(48, 40).to(torch.bfloat16))  # inputs not a multiple of 32
    with pytest.raises(ValueError):
        cpu_matmul.pack_amx(torch.randn(48, 64))  # float32
    packed = cpu_matmul.pack_amx(w)
    x = torch.randn(3, 64).to(torch.bfloat16)
    for bad in (dict(x=torch.randn(3, 64)), dict(x=torch.randn(3, 96).to(torch.bfloat16)),
                dict(n=49), dict(bias=torch.zeros(47, dtype=torch.bfloat16)), dict(bias=torch.zeros(48))):
        args = {"x": x, "n": 48, "bias": None, **bad}
        with pytest.raises(ValueError):
            cpu_matmul.linear_amx(LIB, args["x"], packed, args["n"], args["bias"])


@needs_amx
def test_bf16_model_runs_decode_sized_matmuls_on_amx(tiny_model_dir, monkeypatch):
    """A bf16 model's matmuls of up to AMX_MAX_ROWS rows go to the AMX kernel (the blocks,
    the LM head), larger ones to oneDNN; switching it off and on gives the same numbers as
    oneDNN up to bf16 rounding, and an fp32 model keeps AMX for its bf16 screen (where it has one) only."""
    from server.model import GPT2, Linear

    model = GPT2.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.amx_kernels and all(m.amx is not None for m in model.backend.linears(model))
    calls = []
    real = cpu_matmul.linear_amx
    monkeypatch.setattr(cpu_matmul, "linear_amx", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    blk = model.h[0]
    g = torch.Generator().manual_seed(0)
    for rows in (5, Linear.AMX_MAX_ROWS, Linear.AMX_MAX_ROWS + 1):
        x = (torch.randn(rows, model.spec.n_embd, generator=g)).to(torch.bfloat16)
        calls.clear()
        on = blk.mlp.c_fc(x, gelu=True)
        assert calls == ([rows] if rows <= Linear.AMX_MAX_ROWS else [])
        model.set_native_kernels(True, amx=False)
        assert not model.amx_kernels
        off = blk.mlp.c_fc(x, gelu=True)
        model.set_native_kernels(True)
        assert ((on.float() - off.float()).abs() <= off.float().abs() * 2**-7 + 2e-2).all()
    h = torch.randn(9, model.spec.n_embd, generator=g).to(torch.bfloat16)
    calls.clear()
    model.logits(h)
    assert calls == [16]  # the head, rows padded to the bucket size
    f32 = GPT2.from_pretrained(str(tiny_model_dir))
    f32.enable_greedy_screen(kind="bf16")  # an fp32 model's screen where there is no VNNI for the int8 one
    f32.set_native_kernels(True)
    layers = f32.backend.linears(f32)
    assert [m.amx is not None for m in layers] == [False] * (len(layers) - 1) + [True]


BF16 = cpu_matmul.bf16(LIB)
needs_bf16 = pytest.mark.skipif(not BF16, reason="no AVX512-BF16 here (or the kernels were built without it)")


@needs_bf16
@pytest.mark.parametrize("n,k", [(384, 128), (50257, 64), (40, 96), (130, 2)], ids=["blocks", "vocab-tail", "small",
                                                                                  "one-pair"])
@pytest.mark.parametrize("m", [1, 7, 13, 64, 97, 130])
def test_linear_bf16_is_the_rounded_exact_matmul(n, k, m):
    """The AVX512-BF16 kernel of CPUs without AMX, against float64 as the AMX kernel is:
    within one rounding to bf16 of the exact value, any row count (6-row tiles, 96-row
    blocks), output counts that are not a multiple of 64."""
    g = torch.Generator().manual_seed(m * 11 + n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    for bias in (b, None):
        packed = cpu_matmul.pack_bf16(w, bias)
        exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        for gelu in (False, True):
            ref = F.gelu(exact, approximate="tanh") if gelu else exact
            got = cpu_matmul.linear_bf16(LIB, x, packed, gelu)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 * 1.01 + 1e-5 * k).all()
            assert (got == ref.to(torch.bfloat16)).double().mean() > 0.75


@needs_bf16
def test_linear_bf16_refuses_what_the_c_code_cannot_check():
    with pytest.raises(ValueError):
        cpu_matmul.pack_bf16(torch.randn(48, 63).to(torch.bfloat16))  # odd inputs
    with pytest.raises(ValueError):
        cpu_matmul.pack_bf16(torch.randn(48, 64))  # float32
    packed = cpu_matmul.pack_bf16(torch.randn(48, 64).to(torch.bfloat16))
    for bad in (torch.randn(3, 64), torch.randn(3, 96).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16)):
        with pytest.raises(ValueError):
            cpu_matmul.linear_bf16(LIB, bad, packed)


@pytest.mark.skipif(not BF16 or AMX, reason="AVX512-BF16 without AMX only (with AMX the AMX kernel runs)")
def test_bf16_model_runs_decode_sized_matmuls_on_avx512_bf16(tiny_model_dir, monkeypatch):
    """Without AMX, a bf16 model's matmuls of up to BF16_MAX_ROWS rows go to the AVX512-BF16
    kernel (blocks and LM head), larger ones to oneDNN; off and on agree up to bf16 rounding;
    an fp32 model uses it for its bf16 greedy screen (where it has one) only; POLYPROMPT_CPU_BF16=0
    turns it off."""
    from server.model import GPT2, Linear

    model = GPT2.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    assert all(m.bf16 is not None for m in model.backend.linears(model))
    assert "AVX512-BF16 kernel" in model.backend.describe(model)["matmuls"]
    calls = []
    real = cpu_matmul.linear_bf16
    monkeypatch.setattr(cpu_matmul, "linear_bf16", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    blk = model.h[0]
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(Linear, "BF16_MAX_ROWS", 200)
    for rows in (5, 200, 201):
        x = (torch.randn(rows, model.spec.n_embd, generator=g)).to(torch.bfloat16)
        calls.clear()
        on = blk.mlp.c_fc(x, gelu=True)
        assert calls == ([rows] if rows <= 200 else [])
        model.set_native_kernels(True, amx=False)
        assert not any(m.bf16 is not None for m in model.backend.linears(model))
        off = blk.mlp.c_fc(x, gelu=True)
        model.set_native_kernels(True)
        assert ((on.float() - off.float()).abs() <= off.float().abs() * 2**-7 + 2e-2).all()
    f32 = GPT2.from_pretrained(str(tiny_model_dir))
    f32.enable_greedy_screen(kind="bf16")  # an fp32 model's screen where there is no VNNI for the int8 one
    f32.set_native_kernels(True)
    layers = f32.backend.linears(f32)
    assert [m.bf16 is not None for m in layers] == [False] * (len(layers) - 1) + [True]
    monkeypatch.setenv("POLYPROMPT_CPU_BF16", "0")
    model.set_native_kernels(True)
    assert not any(m.bf16 is not None for m in model.backend.linears(model))


def test_kernels_build_without_amx(tmp_path, monkeypatch):
    """A compiler without AMX support still builds every other kernel."""
    monkeypatch.setenv("POLYPROMPT_KERNEL_CACHE", str(tmp_path))
    if LIB is None:
        pytest.skip("the native kernels cannot run here")
    import ctypes
    import shutil

    lib = ctypes.CDLL(str(cpu_kernels._build(shutil.which("cc") or shutil.which("gcc"), cpu_kernels.FLAGS)))
    assert hasattr(lib, "decode_attention_bf16") and not hasattr(lib, "linear_amx_bf16")
    assert not cpu_matmul.amx(lib)


@needs_amx
def test_amx_kernel_can_be_switched_off_alone(tmp_path):
    """POLYPROMPT_CPU_AMX=0: the other native kernels stay on, bf16 matmuls go to oneDNN."""
    code = ("from server import cpu_kernels, cpu_matmul; lib = cpu_kernels.load(); "
            "print(lib is not None, cpu_matmul.amx(lib))")
    for value, want in (("0", "True False"), ("1", "True True")):
        assert _load_in_subprocess(tmp_path, code, POLYPROMPT_CPU_AMX=value) == want


def test_a_compiler_without_amx_is_asked_once(tmp_path):
    """A compiler that rejects the AMX flags: the kernels are built without them, and the
    next process neither retries the AMX build nor rebuilds the rest."""
    if LIB is None:
        pytest.skip("the native kernels cannot run here")
    import shutil

    real = shutil.which("cc") or shutil.which("gcc")
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "cc-no-amx"
    wrapper.write_text(f"""#!/bin/sh
echo "$@" >> {log}
for a in "$@"; do case "$a" in -mamx*) echo "unknown option $a" >&2; exit 1;; esac; done
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    cache = tmp_path / "cache"
    assert _load_in_subprocess(cache, CC=str(wrapper)) == "True"
    builds = [line for line in log.read_text().splitlines() if "kernels.c" in line]
    assert len(builds) == 2 and "-mamx-tile" in builds[0] and "-mamx-tile" not in builds[1]
    assert len(list(cache.rglob("*.failed"))) == 1 and len(list(cache.rglob("*.so"))) == 1
    assert _load_in_subprocess(cache, CC=str(wrapper)) == "True"
    assert len([line for line in log.read_text().splitlines() if "kernels.c" in line]) == 2  # nothing compiled
