"""`--quantize int8`: the VNNI kernel against exact integer arithmetic, the model and engine on
it (close to float32, and a row's answer independent of what it is batched with), and the
server flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from server import cpu_kernels, cpu_matmul
from server.engine.engine import Engine, EngineConfig, Request
from server.engine.sampler import SamplingParams
from server.model import GPT2

LIB = cpu_kernels.load()
INT8 = cpu_matmul.int8(LIB)
needs_int8 = pytest.mark.skipif(not INT8, reason="SKIPPED LOUDLY: no AVX512-VNNI int8 kernel here (CPU or compiler "
                                "lacks it), so --quantize int8 cannot run on this machine")
needs_amx_int8 = pytest.mark.skipif(not cpu_matmul.amx_int8(LIB), reason="SKIPPED LOUDLY: no AMX-INT8 here (CPU, "
                                    "compiler or kernel), so the AMX path of --quantize int8 is untested on this machine")


def _reference(x: torch.Tensor, w: torch.Tensor, bias, gelu: bool) -> torch.Tensor:
    """The kernel's arithmetic in float64: per-row symmetric int8 activations (round half to
    even), per-channel int8 weights, exact integer sums, one scale per output."""
    xf = x.float()
    sa = xf.abs().amax(1) / 127
    inv = torch.where(sa > 0, 1 / sa, torch.zeros_like(sa))
    qa = torch.round(xf * inv[:, None]).clamp(-127, 127).double()
    q, scale = cpu_matmul.quantize_int8(w)
    y = (qa @ q.double().T) * (sa[:, None].double() * scale[None].double())
    if bias is not None:
        y = y + bias.double()
    y = y.float()
    return (F.gelu(y, approximate="tanh") if gelu else y).to(x.dtype)


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (5, 128, 100), (13, 256, 300), (97, 128, 64), (200, 64, 130)])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_kernel_matches_integer_arithmetic(dtype, m, k, n, gelu):
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=g) * 0.1
    bias = torch.randn(n, generator=g) if n != 64 else None
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, :3] = torch.tensor([40.0, -40.0, 0.0])  # an outlier sets the row's scale
    y = cpu_matmul.linear_int8(LIB, x, cpu_matmul.pack_int8(w, bias), gelu)
    ref = _reference(x, w, bias, gelu)
    assert y.shape == (m, n) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: at most one rounding apart
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    # and it is a fair approximation of the float matmul
    exact = F.linear(x.float(), w, bias)
    exact = F.gelu(exact, approximate="tanh") if gelu else exact
    assert (y.float() - exact).norm() / exact.norm() < 0.05


@needs_amx_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (7, 128, 100), (64, 768, 2304), (65, 192, 64), (300, 128, 200),
                                   (530, 64, 77)])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_amx_int8_gives_the_vnni_bits(dtype, m, k, n, gelu):
    """AMX-INT8 tiles and AVX512-VNNI sum the same int8 products exactly: the same bits, for
    partial row tiles, several row blocks (> 256 rows) and partial output tiles."""
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=g) * 0.1
    w8 = cpu_matmul.pack_int8(w, torch.randn(n, generator=g))
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    x[-1] = 0  # a zero row (scale 0) in the last, padded tile
    amx = cpu_matmul.linear_int8(LIB, x, w8, gelu, amx=True)
    assert torch.equal(amx, cpu_matmul.linear_int8(LIB, x, w8, gelu, amx=False))
    torch.testing.assert_close(amx.float(), _reference(x, w, w8.bias, gelu).float(),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="AMX-INT8"):  # K % 64 != 0: only VNNI takes it
        cpu_matmul.linear_int8(LIB, torch.zeros(2, 96), cpu_matmul.pack_int8(torch.randn(8, 96)), amx=True)


@needs_int8
def test_zero_rows_and_bad_shapes():
    w8 = cpu_matmul.pack_int8(torch.randn(70, 64), torch.ones(70))
    y = cpu_matmul.linear_int8(LIB, torch.zeros(3, 64), w8)
    assert torch.equal(y, torch.ones(3, 70))  # a zero row quantizes to zeros, not NaN
    assert cpu_matmul.linear_int8(LIB, torch.zeros(0, 64), w8).shape == (0, 70)
    with pytest.raises(ValueError):
        cpu_matmul.linear_int8(LIB, torch.zeros(3, 65), w8)
    with pytest.raises(ValueError):
        cpu_matmul.linear_int8(LIB, torch.zeros(3, 64, dtype=torch.float16), w8)
    with pytest.raises(ValueError):
        cpu_matmul.pack_int8(torch.randn(8, 66))


def test_weight_quantization_round_trip():
    w = torch.randn(40, 96)
    w[3] = 0  # an all-zero output channel keeps a usable scale
    q, scale = cpu_matmul.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and torch.all(scale > 0)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)
    p = cpu_matmul.pack_int8(w)
    assert p.packed.shape == (1, 24, 64, 4)  # [ceil(40/64), K/4, 64, 4]
    assert torch.equal(p.packed[0, 5, 7], q[7, 20:24])  # W[64 p + c, 4 g + j]
    assert torch.equal(p.wsum, q.int().sum(1) * 128)


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_on_int8_is_close_to_float32(tiny_model_dir, dtype):
    ref = GPT2.from_pretrained(str(tiny_model_dir), dtype=dtype)
    q8 = GPT2.from_pretrained(str(tiny_model_dir), dtype=dtype, quantize="int8")
    assert "int8" in q8.backend.describe(q8)["matmuls"] and q8.backend.quantize == "int8"
    assert all(m.int8 is not None for m in q8.backend.linears(q8))
    assert not q8.has_greedy_screen  # the head is int8 too: no bf16 screen to run
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        outs = []
        for model in (ref, q8):
            h, _ = model.forward_dense(model.wte(ids), torch.arange(40).expand(2, 40))
            outs.append(model.logits(h).float())
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert rel < 0.08, rel
    agree = (outs[1].argmax(-1) == outs[0].argmax(-1)).float().mean()
    assert agree > 0.7, agree


@needs_int8
def test_engine_rows_do_not_depend_on_their_batch(tiny_model_dir):
    """Each row is quantized by itself and summed exactly in int32, so a request's greedy
    tokens are the same alone and in a mixed-task batch (as in float32)."""
    model = GPT2.from_pretrained(str(tiny_model_dir), quantize="int8")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    souls = {n: torch.randn(n, model.spec.n_embd, generator=g) * 0.4 for n in (2, 7, 12)}
    specs = [(n, torch.randint(0, 50257, (length,), generator=g).tolist()) for n, length in
             [(7, 20), (2, 9), (12, 31), (7, 4), (2, 17)]]

    def run(which):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=8, max_num_batched_tokens=512))
        reqs = [Request(f"r{i}", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                        prefix_key=f"p{n}", soft_prompt=souls[n]) for i, (n, ids) in enumerate(specs) if i in which]
        return {o.req_id: list(o.token_ids) for o in eng.generate(reqs)}

    together = run(range(len(specs)))
    for i in range(len(specs)):
        assert run([i]) == {f"r{i}": together[f"r{i}"]}


def test_quantize_setting_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="--quantize must be one of"):
        GPT2.from_pretrained(str(tiny_model_dir), quantize="int4")


@needs_int8
def test_server_with_quantize_int8(tiny_model_dir, tmp_path):
    import httpx

    from tests.serverutil import running_server

    with running_server(tiny_model_dir, tmp_path / "data", "--quantize", "int8") as url:
        health = httpx.get(f"{url}/health").json()
        assert health["quantize"] == "int8"
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": [464, 3290, 318],
                                                     "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
