"""Wrappers of the native matmul kernels in `csrc/kernels.c` (the library `cpu_kernels.load()`
builds): where the compiler and CPU have AMX-BF16, the bf16 matmul of decode-sized steps
(`linear_amx`, on weights packed by `pack_amx`; README, CPU speed, has why); on CPUs with
AVX512-BF16 but no AMX (AMD Zen 4/5) the same on `vdpbf16ps` (`linear_bf16`, `pack_bf16`);
fp32 matmuls on AVX-512 FMA (`linear_f32`, `pack_f32`, any AVX-512 CPU);
and the int8 matmul of `--quantize int8` (`linear_int8`, `pack_int8`: AVX512-VNNI, or
AMX-INT8 tiles where the CPU has them, with the same bits). Each packs its weight once, at
load, in the order its kernel reads it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass

import torch

from server.cpu_kernels import _switched_off

log = logging.getLogger("polyprompt.kernels")

_lock = threading.Lock()
_amx: bool | None = None
_amx_int8: bool | None = None


def amx(lib: ctypes.CDLL | None) -> bool:
    """Whether `linear_amx` can run: the library was built with AMX, this CPU and kernel
    let the process use AMX tiles (asked once, on first call), and `POLYPROMPT_CPU_AMX` is
    not 0 (it turns off this kernel only; oneDNN then runs every bf16 matmul)."""
    global _amx
    if lib is None or not hasattr(lib, "linear_amx_bf16") or _switched_off("POLYPROMPT_CPU_AMX"):
        return False
    with _lock:
        if _amx is None:
            _amx = bool(lib.amx_init())
            log.info("AMX bf16 linear kernel: %s", "on" if _amx else "unavailable on this CPU")
        return _amx


def pack_amx(w: torch.Tensor) -> torch.Tensor:
    """A linear weight `[N, K]` (bf16, K % 32 == 0) in `linear_amx`'s layout: 1 KB tiles
    `[ceil(N/16), K/32, 16, 16, 2]`, tile (nb, kb) row r holding the pairs
    `W[16 nb + n, 32 kb + 2r + (0, 1)]` for n = 0..15 (zero rows past N)."""
    n, k = w.shape
    if w.dtype != torch.bfloat16 or k % 32:
        raise ValueError("pack_amx needs a bf16 [N, K] weight with K a multiple of 32")
    n16 = -(-n // 16) * 16
    w = torch.cat([w, w.new_zeros(n16 - n, k)]) if n16 != n else w
    return w.reshape(n16 // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def linear_amx(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, n: int,
               bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, W, bias)` (then tanh-GELU if `gelu`) for bf16 rows `x` `[M, K]`, W given
    as `pack_amx(W)` with `n` outputs; float32 accumulation, one rounding to bf16 at the end.
    Returns `[M, n]` bf16."""
    if x.dim() != 2 or packed.dim() != 5 or packed.shape[2:] != (16, 16, 2) or not packed.is_contiguous():
        raise ValueError("linear_amx: x must be [M, K] and the weight as pack_amx returns it (contiguous tiles)")
    m, k = x.shape
    if x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or packed.shape[1] * 32 != k or \
            packed.shape[0] * 16 < n or (bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (n,))):
        raise ValueError("linear_amx: x, the packed weight and the bias do not match")
    if not (x.device.type == packed.device.type == "cpu") or (bias is not None and bias.device.type != "cpu"):
        raise ValueError("linear_amx runs on CPU tensors")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((m, n), dtype=torch.bfloat16)
    if lib.linear_amx_bf16(x.data_ptr(), m, k, packed.data_ptr(), n, None if bias is None else bias.data_ptr(),
                           y.data_ptr(), int(gelu), torch.get_num_threads()):
        raise MemoryError("linear_amx: no memory for its row padding")
    return y


def int8(lib: ctypes.CDLL | None) -> bool:
    """Whether `linear_int8` can run: built in, and this CPU has AVX512-VNNI."""
    return lib is not None and hasattr(lib, "linear_int8") and bool(lib.i8_available())


def amx_int8(lib: ctypes.CDLL | None) -> bool:
    """Whether `linear_int8` runs on AMX-INT8 tiles where K % 64 == 0: built in, this CPU has
    AMX-INT8 and granted the tile state, and `POLYPROMPT_CPU_AMX` is not 0."""
    global _amx_int8
    if lib is None or not hasattr(lib, "linear_int8_amx"):
        return False
    if _amx_int8 is None:  # asked once: CPUID exits to the hypervisor on a VM, and this runs per matmul
        with _lock:
            if _amx_int8 is None:
                _amx_int8 = int8(lib) and bool(lib.amx_int8_available()) and not _switched_off("POLYPROMPT_CPU_AMX")
    return _amx_int8


@dataclass(frozen=True)
class Int8Weight:
    """A linear weight `[N, K]` quantized for `linear_int8`: per output channel symmetric
    int8 (`scale[n] = max |W[n, :]| / 127`), packed in panels of 64 outputs
    `[ceil(N/64), K/4, 64, 4]` (zero rows past N); `wsum` = 128 x each output's int8 sum
    (the correction for the kernel's unsigned activations); `bias` float32 or None."""
    packed: torch.Tensor
    scale: torch.Tensor
    wsum: torch.Tensor
    bias: torch.Tensor | None
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.wsum))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of a `[N, K]` weight: (q int8 `[N, K]`, scale float32 `[N]`),
    `w ~= q * scale[:, None]`."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Weight:
    """`w` `[N, K]` (any float dtype, K % 4 == 0) quantized and packed for `linear_int8`."""
    n, k = w.shape
    if k % 4:
        raise ValueError("pack_int8 needs a [N, K] weight with K a multiple of 4")
    q, scale = quantize_int8(w)
    n64 = -(-n // 64) * 64
    qp = torch.cat([q, q.new_zeros(n64 - n, k)]) if n64 != n else q
    packed = qp.reshape(n64 // 64, 64, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    wsum = (q.to(torch.int32).sum(dim=1) * 128).to(torch.int32).contiguous()
    return Int8Weight(packed, scale.contiguous(), wsum,
                      None if bias is None else bias.detach().float().contiguous(), n, k)


def linear_int8(lib: ctypes.CDLL, x: torch.Tensor, w: Int8Weight, gelu: bool = False,
                amx: bool | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` (then tanh-GELU if `gelu`) with W as `pack_int8` made it, for
    float32 or bf16 rows `x` `[M, K]`: each row quantized to int8 on the fly (per-row
    symmetric), int32 accumulation, the result in x's dtype `[M, N]`. On AMX-INT8 tiles
    when `amx` (default: where `amx_int8(lib)` and K % 64 == 0), else on AVX512-VNNI; the
    two give the same bits (exact int32 sums, the same float epilogue)."""
    if x.dim() != 2 or x.shape[1] != w.k or x.dtype not in (torch.float32, torch.bfloat16) or \
            x.device.type != "cpu":
        raise ValueError(f"linear_int8: x must be float32/bf16 [M, {w.k}] on CPU, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, w.n), dtype=x.dtype)
    if amx is None:
        amx = w.k % 64 == 0 and amx_int8(lib)
    elif amx and (w.k % 64 or not amx_int8(lib)):
        raise ValueError("linear_int8: the AMX-INT8 path needs AMX-INT8 and K a multiple of 64")
    fn = lib.linear_int8_amx if amx else lib.linear_int8
    if m and fn(x.data_ptr(), int(x.dtype == torch.bfloat16), m, w.k, w.packed.data_ptr(),
                             w.scale.data_ptr(), w.wsum.data_ptr(), w.n,
                             None if w.bias is None else w.bias.data_ptr(), y.data_ptr(), int(gelu),
                             torch.get_num_threads()):
        raise MemoryError("linear_int8: no memory for the quantized rows")
    return y


def bf16(lib: ctypes.CDLL | None) -> bool:
    """Whether `linear_bf16` can run: built in, and this CPU has AVX512-BF16."""
    return lib is not None and hasattr(lib, "linear_bf16") and bool(lib.bf16_available())


@dataclass(frozen=True)
class PanelWeight:
    """A linear weight `[N, K]` in panels of 64 outputs (zero rows past N): bf16 for
    `linear_bf16` `[ceil(N/64), K/2, 64, 2]`, float32 for `linear_f32` `[ceil(N/64), K, 64]`;
    `bias` float32 or None."""
    packed: torch.Tensor
    bias: torch.Tensor | None
    n: int
    k: int


def _pack_panels(w: torch.Tensor, bias: torch.Tensor | None, pair: int) -> PanelWeight:
    """`w` `[N, K]` as panels of 64 outputs `[ceil(N/64), K/pair, 64, pair]` (zero rows past N)."""
    n, k = w.shape
    n64 = -(-n // 64) * 64
    w = w.detach()
    wp = torch.cat([w, w.new_zeros(n64 - n, k)]) if n64 != n else w
    packed = wp.reshape(n64 // 64, 64, k // pair, pair).permute(0, 2, 1, 3).contiguous()
    if pair == 1:
        packed = packed.view(n64 // 64, k, 64)
    return PanelWeight(packed, None if bias is None else bias.detach().float().contiguous(), n, k)


def _run_panels(fn, name: str, x: torch.Tensor, w: PanelWeight, dtype: torch.dtype, gelu: bool) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != w.k or x.dtype != dtype or x.device.type != "cpu":
        raise ValueError(f"{name}: x must be {dtype} [M, {w.k}] on CPU, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty((x.shape[0], w.n), dtype=dtype)
    if x.shape[0]:
        fn(x.data_ptr(), x.shape[0], w.k, w.packed.data_ptr(), w.n, None if w.bias is None else w.bias.data_ptr(),
           y.data_ptr(), int(gelu), torch.get_num_threads())
    return y


def pack_bf16(w: torch.Tensor, bias: torch.Tensor | None = None) -> PanelWeight:
    """`w` `[N, K]` (bf16, K % 2 == 0) packed for `linear_bf16`."""
    if w.dtype != torch.bfloat16 or w.dim() != 2 or w.shape[1] % 2:
        raise ValueError("pack_bf16 needs a bf16 [N, K] weight with K even")
    return _pack_panels(w, bias, 2)


def linear_bf16(lib: ctypes.CDLL, x: torch.Tensor, w: PanelWeight, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, W, bias)` (then tanh-GELU if `gelu`) for bf16 rows `x` `[M, K]` with W as
    `pack_bf16` made it; float32 sums, one rounding to bf16. Returns `[M, N]` bf16."""
    return _run_panels(lib.linear_bf16, "linear_bf16", x, w, torch.bfloat16, gelu)


def pack_f32(w: torch.Tensor, bias: torch.Tensor | None = None) -> PanelWeight:
    """`w` `[N, K]` (float32) packed for `linear_f32`."""
    if w.dtype != torch.float32 or w.dim() != 2:
        raise ValueError("pack_f32 needs a float32 [N, K] weight")
    return _pack_panels(w, bias, 1)


def linear_f32(lib: ctypes.CDLL, x: torch.Tensor, w: PanelWeight, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, W, bias)` (then tanh-GELU if `gelu`) for float32 rows `x` `[M, K]` with W as
    `pack_f32` made it: each output one sequential float32 sum over k (the same whatever M is).
    Returns `[M, N]` float32."""
    return _run_panels(lib.linear_f32, "linear_f32", x, w, torch.float32, gelu)
