"""The AMX-BF16 decode matmul (`cpu_matmul.linear_amx`) against float64, on CPUs with AMX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernels, cpu_matmul

LIB = cpu_kernels.load()
pytestmark = pytest.mark.skipif(not cpu_matmul.amx(LIB), reason="SKIPPED LOUDLY: no AMX-BF16 here (CPU, kernel "
                                "or compiler): the AMX bf16 matmul is not tested on this machine")


@pytest.mark.parametrize("m", [1, 7, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (100, 96), (2304, 768)],
                         ids=["one-block", "odd-pairs", "partial-block", "qkv"])
def test_linear_amx_is_the_bf16_matmul(m, n, k):
    """Within bf16 rounding of the float64 result (float32 sums, one rounding at the end):
    partial row tiles, a lone last output block of a pair, a partial last block, bias, GELU."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    packed = cpu_matmul.pack_amx(w)
    exact = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t() + 1
    for bias in (b, None):
        for gelu in (False, True):
            ref = exact + (0 if bias is None else bias.double())
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            got = cpu_matmul.linear_amx(LIB, x, packed, n, bias, gelu)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            err = (got.double() - ref).abs()
            assert (err <= ref.abs() * 2**-8 + scale * k * 2**-24 + 1e-3).all()


def test_linear_amx_rows_do_not_depend_on_each_other():
    """A row's outputs are the same bits whatever else is in the step: batching rows of
    different requests together does not change any one's answer."""
    g = torch.Generator().manual_seed(11)
    w, b = (torch.randn(200, 256, generator=g) * 0.1).bfloat16(), torch.randn(200, generator=g).bfloat16()
    x = torch.randn(64, 256, generator=g).bfloat16()
    packed = cpu_matmul.pack_amx(w)
    full = cpu_matmul.linear_amx(LIB, x, packed, 200, b, True)
    for lo, hi in ((0, 1), (5, 6), (7, 20), (16, 48), (33, 64)):
        assert torch.equal(full[lo:hi], cpu_matmul.linear_amx(LIB, x[lo:hi], packed, 200, b, True))
