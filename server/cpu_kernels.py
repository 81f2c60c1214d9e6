"""Native CPU kernels, compiled on first use with the machine's C compiler.

In `csrc/kernels.c`: decode and prefill attention (`decode_attention`,
`prefill_attention`), the argmax of bf16 logits (`argmax_rows`), the KV-cache write
of a step (`write_kv`), and the matmuls, whose wrappers are in `server/cpu_matmul.py`.
This module builds and loads the library and wraps the rest. SDPA's CPU kernel pads every row of a
decode step to the step's longest and masks it; the native kernel reads each row's own
keys only, straight from the cache, all heads of a position together with software
prefetch. The argmax replaces block-wise reductions
with one pass; the cache write is a row copy per token instead of an advanced-indexing
`index_put_`; prefill attention reads each row's keys once, unpadded, with no mask or
gather. What each saves, measured in-process and inside a server: bench/results/HISTORY.md.

The library is built with `cc` and `FLAGS` + `AMX_FLAGS` (~1 s; with `FLAGS` alone where
the compiler refuses the AMX flags, which is then remembered) into a cache folder keyed by
the source, the flags and the compiler's version, and loaded with ctypes (no torch
headers, no build step at install). Where there is no compiler, no AVX-512, or
`POLYPROMPT_CPU_KERNELS=0`, `load()` returns None and the model keeps using SDPA: the
kernel is a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("polyprompt.kernels")

SOURCE = Path(__file__).resolve().parent / "csrc" / "kernels.c"
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma",
         "-shared", "-fPIC"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]  # tried first; a compiler without them builds the rest
MAX_HEAD_DIM = 256  # these three as in the C source
MAX_HEADS = 256
MAX_LEN = 8192
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpuinfo() -> tuple[str, set[str]]:
    """The first CPU's model name and instruction-set flags from /proc/cpuinfo."""
    name, have = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return name, have


def _cpu_has_flags() -> bool:
    have = _cpuinfo()[1]
    return all(f in have for f in CPU_FLAGS)


def cpu_summary() -> str:
    """The CPU's name and the instruction sets the fast paths depend on (the startup log)."""
    name, have = _cpuinfo()
    isa = [f"{label} {'yes' if flag in have else 'no'}" for label, flag in
           (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AVX512-VNNI", "avx512_vnni"),
            ("AMX-BF16", "amx_bf16"), ("AMX-INT8", "amx_int8"))]
    return f"{name} ({os.cpu_count()} CPUs; {', '.join(isa)})"


def f32_chunk() -> int:
    """Inputs per chunk of the native fp32 matmul (`linear_f32`) in decode-sized calls on this
    CPU: measured best 128 on a Sapphire Rapids (AMX; the chunk of a 64-output panel then fits
    L1) and 256 on an AMD Zen 5 (kernels.c has the figures). The same bits either way."""
    return 128 if "amx_bf16" in _cpuinfo()[1] else 256


def _switched_off(var: str) -> bool:
    return os.environ.get(var, "1").lower() in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("POLYPROMPT_KERNEL_CACHE") or os.environ.get("XDG_CACHE_HOME") or \
        str(Path.home() / ".cache")
    return Path(root) / "polyprompt" / "kernels"


def _build(compiler: str, flags: list[str], remember_failure: bool = False) -> Path:
    """The library built from SOURCE with `flags`, cached by source, flags and compiler.
    `remember_failure`: a compiler error (not a timeout) is recorded beside the cache, and
    the same build is not tried again (the optional AMX build, on compilers without AMX:
    otherwise every process start would pay for the failing compile)."""
    src = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"kernels-{key}.so"
    failed = out.with_suffix(".failed")
    if out.exists():
        return out
    if remember_failure and failed.exists():
        raise RuntimeError(f"{compiler} failed before (see {failed})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp_out)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            if remember_failure:
                failed.write_text(proc.stderr[-4000:])
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders agree on the file
    return out


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines()
            if "libgomp" in line.rsplit("/", 1)[-1] or "libiomp" in line.rsplit("/", 1)[-1]}


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot run here (logged once)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if _switched_off("POLYPROMPT_CPU_KERNELS"):
            log.info("native CPU kernels disabled (POLYPROMPT_CPU_KERNELS=0)")
            return None
        if sys.platform != "linux" or not _cpu_has_flags():
            log.info("native CPU kernels need Linux and AVX-512; using SDPA")
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler found: decode attention uses SDPA (slower)")
            return None
        lib = None
        for flags, optional in ((FLAGS + AMX_FLAGS, True), (FLAGS, False)):
            try:
                lib = ctypes.CDLL(str(_build(compiler, flags, remember_failure=optional)))
                break
            except Exception as e:  # noqa: BLE001 - any failure means: fall back
                log.info("building the native CPU kernels with %s failed: %s", " ".join(flags), e)
        if lib is None:
            log.warning("could not build the native CPU kernels; using SDPA")
            return None
        if len(runtimes := _openmp_runtimes()) > 1:
            # torch bundles its libgomp under another name (some wheels do): ours pulled in a
            # second runtime, whose threads would spin against torch's
            log.warning("native CPU kernels would run a second OpenMP runtime (%s); using SDPA",
                        ", ".join(sorted(runtimes)))
            return None
        p, i64, i32, f32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
        for q_type in ("f32", "bf16"):  # a float cache of q's dtype, or the int8 cache (scales)
            for name in (f"decode_attention_{q_type}", f"decode_attention_{q_type}_i8"):
                fn = getattr(lib, name)
                fn.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, i64, i64, i64, p, p, p, i64, i64, i32,
                               i32, i32, f32, i32]
                fn.restype = i32
            for name in (f"prefill_attention_{q_type}", f"prefill_attention_{q_type}_i8"):
                fn = getattr(lib, name)
                fn.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, i64, i64, i64, p, p, p, p, i64, i64, i32,
                               i32, i32, f32, i32]
                fn.restype = i32
        lib.argmax_rows_bf16.argtypes = [p, i64, i64, i32, p, i32]
        lib.argmax_rows_bf16.restype = None
        lib.screen_pick.argtypes = [p, i64, i64, p, i64, p, p, i64, p, i32, i32, f64, i64, p, p, i32]
        lib.screen_pick.restype = None
        lib.write_kv.argtypes = [p, i64, i64, i64, p, i64, i64, i64, i64, p, p, i32, i32, i32, i32, i32]
        lib.write_kv.restype = None
        lib.write_kv_i8.argtypes = [p, i32, i64, i64, i64, p, i64, i64, i64, i64, p, i64, i64, i64, i64, p, p,
                                    i32, i32, i32, i32]
        lib.write_kv_i8.restype = None
        if hasattr(lib, "linear_int8"):  # built with AVX512-VNNI support (GCC, or the flag)
            lib.linear_int8.argtypes = [p, i32, i64, i64, p, p, p, i64, p, p, i32, i32]
            lib.linear_int8.restype = i32
            lib.i8_available.restype = i32
        if hasattr(lib, "linear_int8_amx"):  # and with AMX-INT8
            lib.linear_int8_amx.argtypes = lib.linear_int8.argtypes
            lib.linear_int8_amx.restype = i32
            lib.amx_int8_available.restype = i32
        if hasattr(lib, "linear_bf16"):  # built with AVX512-BF16 support
            lib.linear_bf16.argtypes = [p, i64, i64, p, i64, p, p, i32, i32]
            lib.linear_bf16.restype = None
            lib.bf16_available.restype = i32
        lib.linear_f32.argtypes = [p, i64, i64, p, i64, p, p, i32, i32]
        lib.linear_f32.restype = None
        lib.set_f32_chunk.argtypes = [i64]
        lib.set_f32_chunk.restype = i32
        lib.set_f32_chunk(f32_chunk())
        if hasattr(lib, "linear_amx_bf16"):  # built with AMX support
            lib.linear_amx_bf16.argtypes = [p, i64, i64, p, i64, p, p, i32, i32]
            lib.linear_amx_bf16.restype = i32
            lib.amx_init.restype = i32
        _lib = lib
        return _lib


def supports(dtype: torch.dtype, head_dim: int, max_len: int, n_head: int) -> bool:
    return dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0 and \
        head_dim <= MAX_HEAD_DIM and max_len <= MAX_LEN and n_head <= MAX_HEADS


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scales: "tuple[torch.Tensor, torch.Tensor] | None") -> None:
    """What the C code relies on and cannot check itself."""
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("native attention needs q [N, H, D] and cache views k, v [slots, H, max_len, D]")
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != v.dtype or \
            k.dtype != (torch.int8 if scales is not None else q.dtype):
        raise ValueError("native attention needs float32 or bfloat16 q with k, v of its dtype, or int8 k, v "
                         "with their scales")
    if scales is not None:
        ks, vs = scales
        if ks.dtype != torch.float32 or ks.shape != k.shape[:3] or vs.shape != ks.shape or \
                vs.stride() != ks.stride() or vs.dtype != ks.dtype or ks.device.type != "cpu":
            raise ValueError("native attention: int8 k, v need float32 scales [slots, H, max_len] of one layout")
    if not (q.device.type == k.device.type == v.device.type == "cpu"):
        raise ValueError("native attention runs on CPU tensors")
    if k.shape != v.shape or k.stride() != v.stride() or q.stride(2) != 1 or k.stride(3) != 1:
        raise ValueError("native attention needs unit stride in head_dim and K, V of one layout")
    if k.shape[1] != q.shape[1] or k.shape[3] != q.shape[2] or \
            not supports(q.dtype, q.shape[2], k.shape[2], q.shape[1]):
        raise ValueError(f"native attention: q {tuple(q.shape)} does not fit the cache {tuple(k.shape)}")


def _check_indices(*tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() and t.dtype == torch.int64 and t.dim() == 1 and t.device.type == "cpu"
               for t in tensors):
        raise ValueError("native kernels take their slot/position/length arrays as contiguous 1-D int64 on CPU")


def _check_range(what: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Every value of `t` in [lo, hi] (the raw pointers the C code gets are not bounds-checked there)."""
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{what} must lie in {lo}..{hi}; got {int(t.min())}..{int(t.max())}")


def _check_rows(what: str, n: int, *tensors: torch.Tensor) -> None:
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"{what}: the index arrays must have {n} entries, got {[t.shape[0] for t in tensors]}")


def _scale_args(scales: "tuple[torch.Tensor, torch.Tensor] | None") -> list:
    """The kernels' scale arguments: the pointers and strides (slot, head, position) of the
    int8 cache's key and value scales, or nulls for a float cache."""
    if scales is None:
        return [None, None, 0, 0, 0]
    ks, vs = scales
    return [ks.data_ptr(), vs.data_ptr(), *ks.stride()]


def _kernel(lib: ctypes.CDLL, kind: str, q: torch.Tensor, scales) -> Callable:
    return getattr(lib, f"{kind}_{'bf16' if q.dtype == torch.bfloat16 else 'f32'}{'_i8' if scales else ''}")


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slots: torch.Tensor, lens: torch.Tensor, *, prechecked: bool = False,
                     scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """Attention of one query per row over its own cache slot.

    q `[B, H, D]` (unit stride in D); k, v: the cache's `[slots, H, max_len, D]` views
    (same strides, unit stride in D); slots, lens `[B]` int64 (contiguous): row b attends
    to positions `0..lens[b]-1` of slot `slots[b]`. Returns `[B, H, D]`, q's dtype.
    All on CPU; slots and lens are checked against the cache unless `prechecked` (the engine's
    step checks its indices once for all layers: `server.model.attention.native_step`).
    `scales`: an int8 cache's key and value scales `[slots, H, max_len]` (`KVCache`).
    """
    _check_attention(q, k, v, scales)
    b, h, d = q.shape
    _check_indices(slots, lens)
    if not prechecked:
        _check_rows("decode_attention", b, slots, lens)
        _check_range("decode_attention: slots", slots, 0, k.shape[0] - 1)
        _check_range("decode_attention: lens", lens, 1, k.shape[2])
    out = torch.empty((b, h, d), dtype=q.dtype)
    if _kernel(lib, "decode_attention", q, scales)(
            q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            k.stride(2), *_scale_args(scales), slots.data_ptr(), lens.data_ptr(), out.data_ptr(), out.stride(0),
            out.stride(1), b, h, d, d ** -0.5, torch.get_num_threads()):
        raise MemoryError("decode_attention: no memory for its scratch buffers")
    return out


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slots: torch.Tensor, pasts: torch.Tensor, qlens: torch.Tensor, *,
                      prechecked: bool = False,
                      scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """Causal attention of prefill rows over their own cache slots.

    q `[N, H, D]`: the rows' queries one row after another (row b has `qlens[b]` of them,
    at positions `pasts[b]..`; their keys/values already in the cache); k, v as in
    `decode_attention`; slots, pasts, qlens `[B]` contiguous int64 (sum of qlens == N,
    every row within the cache: checked unless `prechecked`, as in `decode_attention`); `scales`
    as there. Returns `[N, H, D]`.
    """
    _check_attention(q, k, v, scales)
    n, h, d = q.shape
    _check_indices(slots, pasts, qlens)
    if not prechecked:
        _check_rows("prefill_attention", slots.shape[0], pasts, qlens)
        _check_range("prefill_attention: slots", slots, 0, k.shape[0] - 1)
        _check_range("prefill_attention: pasts", pasts, 0, k.shape[2] - 1)
        _check_range("prefill_attention: qlens", qlens, 1, k.shape[2])
        if int(qlens.sum()) != n or (slots.numel() and int((pasts + qlens).max()) > k.shape[2]):
            raise ValueError(f"prefill_attention: qlens must sum to the {n} queries and every row fit the cache")
    out = torch.empty((n, h, d), dtype=q.dtype)
    if _kernel(lib, "prefill_attention", q, scales)(
            q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            k.stride(2), *_scale_args(scales), slots.data_ptr(), pasts.data_ptr(), qlens.data_ptr(),
            out.data_ptr(), out.stride(0), out.stride(1), slots.shape[0], h, d, d ** -0.5,
            torch.get_num_threads()):
        raise MemoryError("prefill_attention: no memory for its scratch buffers")
    return out


def argmax_rows(lib: ctypes.CDLL, logits: torch.Tensor) -> list[int]:
    """`logits.argmax(-1).tolist()` for bf16 logits `[R, V]` (unit stride in V, V >= 1, on CPU)."""
    if logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.stride(1) != 1 or \
            logits.device.type != "cpu" or logits.shape[1] < 1:
        raise ValueError("argmax_rows needs bf16 [R, V >= 1] CPU logits with unit stride in V")
    r, v = logits.shape
    out = torch.empty(r, dtype=torch.int64)
    lib.argmax_rows_bf16(logits.data_ptr(), logits.stride(0), v, r, out.data_ptr(), torch.get_num_threads())
    return out.tolist()


def screen_pick(lib: ctypes.CDLL, y: torch.Tensor, bound: torch.Tensor, perm: torch.Tensor, h: torch.Tensor,
                w: torch.Tensor, round_bf16: bool, slack: float, max_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 greedy screen's pick (`Int8Screen`; kernels.c has the arithmetic): int8
    logits `y` `[R, V]` bf16 in the screen's token order `perm` `[V]` int64, bounds `[R,
    ceil(V/64)]` float64, normed hidden states `h` `[R, K]` float32, the head `w` `[V, K]`
    (float32 or bf16, original order). Returns (tokens `[R]`, -1 where a row is left to the
    full head; candidates per row `[R]`)."""
    r, v = y.shape
    k = h.shape[1]
    if y.dtype != torch.bfloat16 or h.dtype != torch.float32 or bound.dtype != torch.float64 or \
            perm.dtype != torch.int64 or w.dtype not in (torch.float32, torch.bfloat16) or \
            bound.shape != (r, -(-v // 64)) or perm.shape != (v,) or h.shape[0] != r or w.shape != (v, k):
        raise ValueError("screen_pick: mismatched dtypes or shapes")
    if any(t.device.type != "cpu" for t in (y, bound, perm, h, w)):
        raise ValueError("screen_pick runs on CPU tensors")
    y, bound, perm, h, w = (t.contiguous() for t in (y, bound, perm, h, w))
    tok, count = torch.empty(r, dtype=torch.int64), torch.empty(r, dtype=torch.int64)
    lib.screen_pick(y.data_ptr(), r, v, bound.data_ptr(), bound.shape[1], perm.data_ptr(), h.data_ptr(), k,
                    w.data_ptr(), int(w.dtype == torch.bfloat16), int(round_bf16), slack, max_cand,
                    tok.data_ptr(), count.data_ptr(), torch.get_num_threads())
    return tok, count


def write_kv(lib: ctypes.CDLL, kv: torch.Tensor, src: torch.Tensor, slots: torch.Tensor,
             pos: torch.Tensor, *, prechecked: bool = False, scale: torch.Tensor | None = None) -> None:
    """`kv[:, slots, :, pos] = src`: kv is one layer's cache `[2, slots, H, max_len, D]` (a
    view, unit stride in D), src `[N, 2, H, D]` (unit stride in D, same dtype), slots and
    pos `[N]` contiguous int64 within the cache's bounds (checked unless `prechecked`).
    An int8 cache (`scale`: its float32 scales `[2, slots, H, max_len]`) gets src (float32 or
    bf16) quantized per token and head (`write_kv_i8` in kernels.c)."""
    if src.dim() != 4 or kv.dim() != 5 or src.shape[1] != 2 or kv.shape[0] != 2:
        raise ValueError("write_kv: src must be [N, 2, H, D] and kv one layer's [2, slots, H, max_len, D]")
    n, _, h, d = src.shape
    quantized = kv.dtype == torch.int8
    if (src.dtype != kv.dtype and not quantized) or src.stride(3) != 1 or kv.stride(4) != 1 or \
            kv.shape[2] != h or kv.shape[4] != d or quantized != (scale is not None):
        raise ValueError("write_kv: mismatched dtype, shape or strides")
    if quantized and (src.dtype not in (torch.float32, torch.bfloat16) or d % 16 or scale.dtype != torch.float32
                      or scale.shape != kv.shape[:4] or scale.device.type != "cpu"):
        raise ValueError("write_kv: an int8 cache takes float32 or bf16 keys/values (head_dim % 16 == 0) and "
                         "float32 scales [2, slots, H, max_len]")
    if src.device.type != "cpu" or kv.device.type != "cpu":
        raise ValueError("write_kv runs on CPU tensors")
    _check_indices(slots, pos)
    if not prechecked:
        _check_rows("write_kv", n, slots, pos)
        _check_range("write_kv: slots", slots, 0, kv.shape[1] - 1)
        _check_range("write_kv: positions", pos, 0, kv.shape[3] - 1)
    if quantized:
        lib.write_kv_i8(src.data_ptr(), int(src.dtype == torch.bfloat16), src.stride(0), src.stride(1),
                        src.stride(2), kv.data_ptr(), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
                        scale.data_ptr(), *scale.stride(), slots.data_ptr(), pos.data_ptr(), n, h, d,
                        torch.get_num_threads())
        return
    lib.write_kv(src.data_ptr(), src.stride(0), src.stride(1), src.stride(2), kv.data_ptr(), kv.stride(0),
                 kv.stride(1), kv.stride(2), kv.stride(3), slots.data_ptr(), pos.data_ptr(), n, h, d,
                 src.element_size(), torch.get_num_threads())
