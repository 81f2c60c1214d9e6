"""The native fp32 matmul (`cpu_matmul.linear_f32`) against float64, and the fp32 model on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernels, cpu_matmul

LIB = cpu_kernels.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="the native kernels cannot run here (no AVX-512 or no C "
                                  "compiler)")


@needs_kernel
@pytest.mark.parametrize("n,k", [(384, 128), (50257, 64), (40, 96), (130, 3), (96, 600)],
                         ids=["blocks", "vocab-tail", "small", "odd-inputs", "three-chunks"])
@pytest.mark.parametrize("m", [1, 7, 13, 64, 97, 200])
def test_linear_f32_is_the_float32_matmul(n, k, m):
    """Within float32 rounding of the float64 result (bias, tanh-GELU, any row count: 6-row
    tiles, 96-row blocks; output counts that are not a multiple of 64; inputs that are not
    a multiple of the 256-input chunks, whose partial sums go through the output)."""
    g = torch.Generator().manual_seed(m * 11 + n + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    scale = x.double().abs() @ w.double().abs().t() + 1  # the size of the sum's rounding errors
    for bias in (b, None):
        packed = cpu_matmul.pack_f32(w, bias)
        exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        for gelu in (False, True):
            ref = F.gelu(exact, approximate="tanh") if gelu else exact
            got = cpu_matmul.linear_f32(LIB, x, packed, gelu)
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert ((got.double() - ref).abs() <= scale * k * 2**-24 + 1e-6).all()


@needs_kernel
def test_linear_f32_rows_do_not_depend_on_each_other():
    """A row's outputs are the same bits whatever else is in the step (one sequential sum
    over k per output): what lets the engine batch any rows without changing a greedy token."""
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(200, 600, generator=g), torch.randn(200, generator=g), torch.randn(130, 600, generator=g)
    packed = cpu_matmul.pack_f32(w, b)
    full = cpu_matmul.linear_f32(LIB, x, packed, True)
    for lo, hi in ((0, 1), (5, 6), (7, 20), (0, 64), (97, 130)):
        assert torch.equal(full[lo:hi], cpu_matmul.linear_f32(LIB, x[lo:hi], packed, True))
    assert cpu_matmul.linear_f32(LIB, x[:0], packed).shape == (0, 200)


@needs_kernel
def test_linear_f32_refuses_what_the_c_code_cannot_check():
    with pytest.raises(ValueError):
        cpu_matmul.pack_f32(torch.randn(48, 64).to(torch.bfloat16))
    packed = cpu_matmul.pack_f32(torch.randn(48, 64))
    for bad in (torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 96), torch.randn(64)):
        with pytest.raises(ValueError):
            cpu_matmul.linear_f32(LIB, bad, packed)


@needs_kernel
def test_fp32_model_runs_its_matmuls_on_the_fp32_kernel(tiny_model_dir, monkeypatch):
    """An fp32 model's matmuls of up to F32_MAX_ROWS rows (blocks and LM head) go to the fp32
    kernel, larger ones to oneDNN; off and on agree to float32 rounding; the startup log says
    so; POLYPROMPT_CPU_F32=0 (or the native matmuls off) leaves them to oneDNN."""
    from server.model import GPT2, Linear

    model = GPT2.from_pretrained(str(tiny_model_dir))
    layers = model.backend.linears(model)
    assert all(m.f32 is not None for m in layers if m.weight.dtype == torch.float32)
    assert "fp32 kernel" in model.backend.describe(model)["matmuls"]
    assert all(m.packed is None for m in layers)  # no oneDNN copy of the weights beside the kernel's
    calls = []
    real = cpu_matmul.linear_f32
    monkeypatch.setattr(cpu_matmul, "linear_f32", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    monkeypatch.setattr(Linear, "F32_MAX_ROWS", 200)
    blk = model.h[0]
    g = torch.Generator().manual_seed(0)
    for rows in (5, 200, 201):
        x = torch.randn(rows, model.spec.n_embd, generator=g)
        calls.clear()
        on = blk.mlp.c_fc(x, gelu=True)
        assert calls == ([rows] if rows <= 200 else [])
        model.set_native_kernels(True, amx=False)
        assert not any(m.f32 is not None for m in model.backend.linears(model))
        assert all(m.packed is not None for m in model.backend.linears(model))  # oneDNN's again
        off = blk.mlp.c_fc(x, gelu=True)
        model.set_native_kernels(True)
        assert torch.allclose(on, off, rtol=1e-5, atol=1e-5)
    calls.clear()
    x3 = torch.randn(3, 5, model.spec.n_embd, generator=g)  # a batch of prefixes is 3-D
    y3 = blk.mlp.c_fc(x3, gelu=True)
    assert calls == [15] and y3.shape == (3, 5, 4 * model.spec.n_embd)
    assert torch.equal(y3[1], blk.mlp.c_fc(x3[1], gelu=True))
    monkeypatch.setenv("POLYPROMPT_CPU_F32", "0")
    model.set_native_kernels(True)
    assert not any(m.f32 is not None for m in model.backend.linears(model))
    assert "fp32 kernel" not in model.backend.describe(model)["matmuls"]
    bf = GPT2.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    assert not any(m.f32 is not None for m in bf.backend.linears(bf))  # bf16 weights: not this kernel


@needs_kernel
def test_linear_f32_chunk_does_not_change_a_bit():
    """The input chunk is chosen per CPU (`cpu_kernels.f32_chunk`); each output is one
    sequential float32 sum over k whatever the chunk, so every chunk gives the same bits."""
    g = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(200, 600, generator=g), torch.randn(200, generator=g), torch.randn(70, 600, generator=g)
    packed = cpu_matmul.pack_f32(w, b)  # 70 rows: one block, so the chunk set applies
    try:
        outs = []
        for kc in (256, 128, 64, 37, 600, 1):
            assert LIB.set_f32_chunk(kc) == 1
            outs.append(cpu_matmul.linear_f32(LIB, x, packed, True))
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        assert LIB.set_f32_chunk(0) == 0 and LIB.set_f32_chunk(-5) == 0
    finally:
        LIB.set_f32_chunk(cpu_kernels.f32_chunk())
    assert cpu_kernels.f32_chunk() in (128, 256)
