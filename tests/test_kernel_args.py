"""The native-kernel wrappers in `server.cpu_kernels` and `server.cpu_matmul` refuse bad arguments themselves.

The C code trusts every pointer, stride, index and length it is given: a slot index past
the cache or a length past `max_len` is a read or write outside the tensor, not an error.
So each public wrapper must refuse what does not fit *before* it touches the library. These
tests call every wrapper with arguments that pass all its checks but one, through a stand-in
library that fails the test if any native function is as much as looked up: a refusal has
to come from the wrapper, as a ValueError or RuntimeError, and nothing here can crash the
test process. A baseline of valid arguments per wrapper shows the stand-in is reached when
nothing is wrong, and, where the kernels build, that the baseline computes what torch does.

The model's own step checks its indices once for all layers and calls the kernels with
`prechecked=True` (`server.model.attention.native_step`); every other caller gets the checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import cpu_kernels, cpu_matmul

S, H, L, D = 3, 2, 16, 16  # cache slots, heads, max_len, head_dim


class NativeReached(AssertionError):
    """A wrapper handed its arguments on to the native library."""


class NoNative:
    """Stands in for the loaded library: any attribute of it is a native entry point."""

    def __getattr__(self, name: str):
        raise NativeReached(f"the wrapper reached the native {name} with arguments it should refuse")


class Recorder:
    """Stands in for the library and records which entry points were called (returning 0, success)."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        def call(*_args):
            self.calls.append(name)
            return 0
        return call


# ------------------------------------------------------------------ valid arguments, one per wrapper

def _cache(dtype=torch.float32, slots=S, max_len=L, head_dim=D, heads=H, kv=2) -> torch.Tensor:
    return torch.zeros(kv, slots, heads, max_len, head_dim, dtype=dtype)


def decode_args(**bad) -> dict:
    kv = _cache()
    args = dict(q=torch.zeros(2, H, D), k=kv[0], v=kv[1], slots=torch.tensor([0, 2]), lens=torch.tensor([1, L]))
    return {**args, **bad}


def prefill_args(**bad) -> dict:
    kv = _cache()  # rows (slot, past, qlen): (0, 0, 3) and (2, 14, 2), 5 queries
    args = dict(q=torch.zeros(5, H, D), k=kv[0], v=kv[1], slots=torch.tensor([0, 2]), pasts=torch.tensor([0, 14]),
                qlens=torch.tensor([3, 2]))
    return {**args, **bad}


def argmax_args(**bad) -> dict:
    return {"logits": torch.zeros(3, 50, dtype=torch.bfloat16), **bad}


def write_kv_args(**bad) -> dict:
    args = dict(kv=_cache(), src=torch.zeros(2, 2, H, D), slots=torch.tensor([0, 2]), pos=torch.tensor([0, L - 1]))
    return {**args, **bad}


def linear_args(**bad) -> dict:
    w = torch.zeros(48, 64, dtype=torch.bfloat16)
    args = dict(x=torch.zeros(3, 64, dtype=torch.bfloat16), packed=cpu_matmul.pack_amx(w), n=48, bias=None)
    return {**args, **bad}


CALLS = {
    "decode_attention": (decode_args, lambda lib, a: cpu_kernels.decode_attention(
        lib, a["q"], a["k"], a["v"], a["slots"], a["lens"])),
    "prefill_attention": (prefill_args, lambda lib, a: cpu_kernels.prefill_attention(
        lib, a["q"], a["k"], a["v"], a["slots"], a["pasts"], a["qlens"])),
    "argmax_rows": (argmax_args, lambda lib, a: cpu_kernels.argmax_rows(lib, a["logits"])),
    "write_kv": (write_kv_args, lambda lib, a: cpu_kernels.write_kv(lib, a["kv"], a["src"], a["slots"], a["pos"])),
    "linear_amx": (linear_args, lambda lib, a: cpu_matmul.linear_amx(lib, a["x"], a["packed"], a["n"], a["bias"])),
}
NATIVE = {"decode_attention": "decode_attention_f32", "prefill_attention": "prefill_attention_f32",
          "argmax_rows": "argmax_rows_bf16", "write_kv": "write_kv", "linear_amx": "linear_amx_bf16"}


@pytest.mark.parametrize("wrapper", sorted(CALLS))
def test_valid_arguments_reach_the_native_code(wrapper):
    """Each baseline passes every check, so each bad case below differs from a valid call in
    exactly the one argument it changes."""
    build, call = CALLS[wrapper]
    lib = Recorder()
    call(lib, build())
    assert lib.calls == [NATIVE[wrapper]]


# ------------------------------------------------------------------ one bad argument each

M = torch.device("meta")  # not a CPU tensor, and no GPU needed to make one

CASES = [
    # decode_attention
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, D, dtype=torch.float16)), id="decode-fp16"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, D, dtype=torch.bfloat16)), id="decode-q-not-cache-dtype"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, D, device=M)), id="decode-not-cpu"),
    pytest.param("decode_attention", dict(v=_cache()[1].transpose(1, 2).contiguous().transpose(1, 2)),
                 id="decode-k-v-layouts-differ"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, 2 * D)[:, :, ::2]), id="decode-q-strided-in-d"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H + 1, D)), id="decode-more-heads-than-cache"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, 2 * D)), id="decode-other-head-size"),
    pytest.param("decode_attention", dict(q=torch.zeros(2, H, 8), k=_cache(head_dim=8)[0], v=_cache(head_dim=8)[1]),
                 id="decode-head-size-not-16x"),
    pytest.param("decode_attention", dict(k=_cache(max_len=cpu_kernels.MAX_LEN + 1)[0],
                                          v=_cache(max_len=cpu_kernels.MAX_LEN + 1)[1]),
                 id="decode-cache-over-max-len"),
    pytest.param("decode_attention", dict(slots=torch.tensor([0, 2], dtype=torch.int32)), id="decode-int32-slots"),
    pytest.param("decode_attention", dict(lens=torch.tensor([1, 2], dtype=torch.int32)), id="decode-int32-lens"),
    pytest.param("decode_attention", dict(slots=torch.tensor([0, 9, 2])[::2]), id="decode-noncontiguous-slots"),
    pytest.param("decode_attention", dict(slots=torch.tensor([0, S])), id="decode-slot-past-cache"),
    pytest.param("decode_attention", dict(slots=torch.tensor([-1, 0])), id="decode-negative-slot"),
    pytest.param("decode_attention", dict(lens=torch.tensor([1, L + 1])), id="decode-len-past-max-len"),
    pytest.param("decode_attention", dict(lens=torch.tensor([0, 1])), id="decode-len-zero"),
    pytest.param("decode_attention", dict(slots=torch.tensor([0])), id="decode-fewer-slots-than-rows"),
    pytest.param("decode_attention", dict(lens=torch.tensor([1])), id="decode-fewer-lens-than-rows"),
    pytest.param("decode_attention", dict(k=_cache()[0][0], v=_cache()[1][0]), id="decode-3d-cache"),
    # prefill_attention
    pytest.param("prefill_attention", dict(q=torch.zeros(5, H, D, dtype=torch.float16)), id="prefill-fp16"),
    pytest.param("prefill_attention", dict(q=torch.zeros(5, H, D, device=M)), id="prefill-not-cpu"),
    pytest.param("prefill_attention", dict(q=torch.zeros(5, H + 1, D)), id="prefill-more-heads-than-cache"),
    pytest.param("prefill_attention", dict(pasts=torch.tensor([0, 14], dtype=torch.int32)), id="prefill-int32-pasts"),
    pytest.param("prefill_attention", dict(qlens=torch.tensor([3, 9, 2])[::2]), id="prefill-noncontiguous-qlens"),
    pytest.param("prefill_attention", dict(slots=torch.tensor([0, S])), id="prefill-slot-past-cache"),
    pytest.param("prefill_attention", dict(pasts=torch.tensor([0, 15])), id="prefill-row-past-max-len"),
    pytest.param("prefill_attention", dict(pasts=torch.tensor([-2, 14])), id="prefill-negative-past"),
    pytest.param("prefill_attention", dict(qlens=torch.tensor([3, 3])), id="prefill-qlens-sum-not-rows"),
    pytest.param("prefill_attention", dict(pasts=torch.tensor([0])), id="prefill-index-lengths-differ"),
    # argmax_rows
    pytest.param("argmax_rows", dict(logits=torch.zeros(3, 50)), id="argmax-fp32"),
    pytest.param("argmax_rows", dict(logits=torch.zeros(50, dtype=torch.bfloat16)), id="argmax-1d"),
    pytest.param("argmax_rows", dict(logits=torch.zeros(3, 100, dtype=torch.bfloat16)[:, ::2]), id="argmax-strided"),
    pytest.param("argmax_rows", dict(logits=torch.zeros(3, 50, dtype=torch.bfloat16, device=M)), id="argmax-not-cpu"),
    pytest.param("argmax_rows", dict(logits=torch.zeros(3, 0, dtype=torch.bfloat16)), id="argmax-empty-vocab"),
    # write_kv
    pytest.param("write_kv", dict(src=torch.zeros(2, 2, H, D, dtype=torch.bfloat16)), id="write-dtype-mismatch"),
    pytest.param("write_kv", dict(src=torch.zeros(2, 2, H, 2 * D)[..., ::2]), id="write-src-strided-in-d"),
    pytest.param("write_kv", dict(src=torch.zeros(2, 2, H + 1, D)), id="write-heads-mismatch"),
    pytest.param("write_kv", dict(src=torch.zeros(2, 2, H, 2 * D)), id="write-head-size-mismatch"),
    pytest.param("write_kv", dict(pos=torch.tensor([0, 1], dtype=torch.int32)), id="write-int32-pos"),
    pytest.param("write_kv", dict(slots=torch.tensor([0, 9, 2])[::2]), id="write-noncontiguous-slots"),
    pytest.param("write_kv", dict(slots=torch.tensor([0, S])), id="write-slot-past-cache"),
    pytest.param("write_kv", dict(pos=torch.tensor([0, L])), id="write-pos-past-max-len"),
    pytest.param("write_kv", dict(pos=torch.tensor([-1, 0])), id="write-negative-pos"),
    pytest.param("write_kv", dict(slots=torch.tensor([0])), id="write-fewer-slots-than-tokens"),
    pytest.param("write_kv", dict(src=torch.zeros(2, 1, H, D)), id="write-src-without-v"),
    pytest.param("write_kv", dict(kv=_cache(kv=1)), id="write-cache-without-v"),
    pytest.param("write_kv", dict(kv=_cache().to(M), src=torch.zeros(2, 2, H, D, device=M)), id="write-not-cpu"),
    # linear_amx (needs no AMX: the stand-in library is never an AMX one)
    pytest.param("linear_amx", dict(x=torch.zeros(3, 64)), id="linear-x-fp32"),
    pytest.param("linear_amx", dict(x=torch.zeros(3, 96, dtype=torch.bfloat16)), id="linear-k-mismatch"),
    pytest.param("linear_amx", dict(n=49), id="linear-n-past-tiles"),
    pytest.param("linear_amx", dict(bias=torch.zeros(47, dtype=torch.bfloat16)), id="linear-bias-shape"),
    pytest.param("linear_amx", dict(bias=torch.zeros(48)), id="linear-bias-fp32"),
    pytest.param("linear_amx", dict(packed=cpu_matmul.pack_amx(torch.zeros(48, 64, dtype=torch.bfloat16)).float()),
                 id="linear-packed-fp32"),
    pytest.param("linear_amx", dict(packed=torch.zeros(3, 2, dtype=torch.bfloat16)), id="linear-packed-too-small"),
    pytest.param("linear_amx", dict(packed=cpu_matmul.pack_amx(torch.zeros(48, 64, dtype=torch.bfloat16))
                                    .transpose(2, 3)), id="linear-packed-not-contiguous"),
    pytest.param("linear_amx", dict(x=torch.zeros(3, 64, dtype=torch.bfloat16, device=M)), id="linear-not-cpu"),
]


@pytest.mark.parametrize("wrapper, bad", CASES)
def test_bad_argument_is_refused_before_the_native_code(wrapper, bad):
    build, call = CALLS[wrapper]
    with pytest.raises((ValueError, RuntimeError)):
        call(NoNative(), build(**bad))


@pytest.mark.parametrize("w", [torch.zeros(48, 40, dtype=torch.bfloat16), torch.zeros(48, 64)],
                         ids=["k-not-32x", "fp32"])
def test_pack_amx_refuses_what_linear_amx_cannot_read(w):
    with pytest.raises(ValueError):
        cpu_matmul.pack_amx(w)


# ------------------------------------------------------------------ the baselines on the real kernels

LIB = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(
    LIB is None, reason="NATIVE KERNELS NOT BUILT HERE (no Linux/AVX-512, no C compiler, or POLYPROMPT_CPU_KERNELS=0):"
                        " the baselines cannot be run natively; the refusal tests above still ran")


@needs_kernels
def test_baselines_compute_what_torch_does():
    """The valid arguments above are valid for the C code too, not only for the wrappers."""
    g = torch.Generator().manual_seed(0)
    a = decode_args()
    a["k"].copy_(torch.randn(a["k"].shape, generator=g))
    a["v"].copy_(torch.randn(a["v"].shape, generator=g))
    a["q"] = torch.randn(a["q"].shape, generator=g)
    got = cpu_kernels.decode_attention(LIB, a["q"], a["k"], a["v"], a["slots"], a["lens"])
    for b, (slot, n) in enumerate(zip(a["slots"].tolist(), a["lens"].tolist())):
        ref = F.scaled_dot_product_attention(a["q"][b].unsqueeze(1), a["k"][slot, :, :n], a["v"][slot, :, :n])
        torch.testing.assert_close(got[b], ref.squeeze(1), atol=1e-5, rtol=1e-5)

    p = prefill_args(k=a["k"], v=a["v"])
    p["q"] = torch.randn(p["q"].shape, generator=g)
    got = cpu_kernels.prefill_attention(LIB, p["q"], p["k"], p["v"], p["slots"], p["pasts"], p["qlens"])
    start = 0
    for slot, past, n in zip(p["slots"].tolist(), p["pasts"].tolist(), p["qlens"].tolist()):
        allowed = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]
        ref = F.scaled_dot_product_attention(p["q"][start:start + n].transpose(0, 1), p["k"][slot, :, :past + n],
                                             p["v"][slot, :, :past + n], attn_mask=allowed)
        torch.testing.assert_close(got[start:start + n], ref.transpose(0, 1), atol=1e-5, rtol=1e-5)
        start += n

    logits = torch.randn(3, 50, generator=g).to(torch.bfloat16)
    assert cpu_kernels.argmax_rows(LIB, logits) == logits.argmax(-1).tolist()

    w = write_kv_args()
    w["src"] = torch.randn(w["src"].shape, generator=g)
    want = w["kv"].clone()
    want[:, w["slots"], :, w["pos"]] = w["src"]
    cpu_kernels.write_kv(LIB, w["kv"], w["src"], w["slots"], w["pos"])
    assert torch.equal(w["kv"], want)
