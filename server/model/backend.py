"""How a model's serving forward runs, chosen once as one object (`choose`): the packed LM
head, the greedy screen, the native CPU kernels, the AMX matmul, the padded CUDA head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server import cpu_kernels, cpu_matmul
from server.model.greedy import GreedyScreen, Int8Screen
from server.model.linear import Linear, can_pack

if TYPE_CHECKING:  # pragma: no cover
    from server.model.gpt2 import GPT2

HEAD_ALIGN = 64  # rows of the padded CUDA LM head


@dataclass
class Backend:
    head: Linear | None = None  # CPU: the LM head packed for oneDNN (row-bucketed steps)
    head_full: torch.Tensor | None = None  # CUDA: the LM head zero-padded to HEAD_ALIGN rows
    screen: GreedyScreen | Int8Screen | None = None  # CPU: int8 (or fp32's bf16) screen for exact greedy
    native: object | None = None  # the native CPU kernels (ctypes library) for attention, KV writes, argmax
    quantize: str | None = None  # "int8": every CPU matmul on int8 weights (`Linear.set_int8`)

    @property
    def screening(self) -> bool:
        return self.screen is not None and not self.screen.off

    def linears(self, model: "GPT2") -> list[Linear]:
        """Every matmul of the serving forward: the blocks', the packed LM head, the screen's."""
        extra = [m for m in (self.head, self.screen.layer if self.screen else None) if m is not None]
        return [m for m in model.modules() if isinstance(m, Linear)] + extra

    def describe(self, model: "GPT2") -> dict[str, str]:
        """Which path each part takes on this machine (the startup log, /health `paths`)."""
        w = model.wte.weight
        greedy = "full LM head + argmax"
        if self.screening:
            greedy = "%s screen + exact rescoring" % ("int8" if isinstance(self.screen, Int8Screen) else "bf16")
        if w.device.type != "cpu":
            return {"device": str(w.device), "attention": "SDPA", "greedy": greedy, "matmuls": "cuBLAS" +
                    (f" (LM head padded to a multiple of {HEAD_ALIGN} rows)" if self.head_full is not None else "")}
        linears = self.linears(model)
        if any(m.int8 is not None for m in linears):
            matmuls = "native int8 kernel (%s; per-channel int8 weights, per-row int8 activations)" % (
                "AMX-INT8" if cpu_matmul.amx_int8(cpu_kernels.load()) else "AVX512-VNNI")
        elif self.head is None:
            matmuls = "torch"
        elif any(m.f32 is not None for m in linears):
            matmuls = "native AVX-512 fp32 kernel (fp32 matmuls of <= %d rows, inputs in chunks of %d), " \
                "oneDNN (the rest)" % (Linear.F32_MAX_ROWS, cpu_kernels.f32_chunk())
            if any(m.amx is not None for m in linears):  # a bf16 greedy screen's layer
                matmuls += "; the bf16 greedy screen's on AMX-BF16"
            elif any(m.bf16 is not None for m in linears):
                matmuls += "; the bf16 greedy screen's on AVX512-BF16"
        elif any(m.amx is not None for m in linears):
            matmuls = "native AMX-BF16 kernel (decode steps), oneDNN (prefill)"
        elif any(m.bf16 is not None for m in linears):
            matmuls = "native AVX512-BF16 kernel (bf16 matmuls of <= %d rows%s), oneDNN (the rest)" % (
                Linear.BF16_MAX_ROWS, ", the fp32 greedy screen's" if w.dtype == torch.float32 else "")
        elif w.dtype == torch.bfloat16:
            matmuls = "oneDNN, pre-packed (%s)" % (
                "AVX512-BF16/AMX" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "bf16 emulated")
        else:
            matmuls = "oneDNN, pre-packed (fp32)"
        native = self.native is not None
        return {"cpu": cpu_kernels.cpu_summary(),
                "attention": "native CPU kernels (decode and prefill)" if native else "SDPA",
                "kv-cache write": "native row copy" if native else "index_put",
                "matmuls": matmuls, "greedy": greedy}


QUANTIZE = ("none", "int8")


def choose(model: "GPT2", *, native: bool = True, amx: bool = True, screen: bool | None = None,
           batch_hint: int = 128, quantize: str | None = None) -> Backend:
    """The backend for `model` on its device and dtype. CPU fp32/bf16: every matmul weight
    pre-packed for oneDNN, the LM head too; the native kernels when `native` and they can run
    here (AVX-512, a C compiler), with `amx` the native bf16 matmul of decode steps (AMX where
    the CPU has it, else AVX512-BF16); the greedy screen: int8 where the CPU has VNNI (fp32
    and bf16 models), else bf16 for fp32 models where bf16 matmuls are native (`screen`
    forces it on or off; `POLYPROMPT_CPU_SCREEN=0` turns it off). `quantize="int8"`: every
    matmul, the LM head's too, on the native int8 kernel instead (CPU with AVX512-VNNI only;
    a ValueError elsewhere). CUDA: the LM head padded
    for aligned cuBLAS kernels."""
    quantize = None if quantize in (None, "none") else quantize
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    w = model.wte.weight
    if quantize and (w.device.type != "cpu" or not can_pack(w.dtype)):
        raise ValueError("--quantize int8 runs on the CPU with float32 or bfloat16 (on CUDA, FP16 is faster)")
    if w.device.type == "cuda":
        return Backend(head_full=pad_head(model))
    if w.device.type != "cpu" or not can_pack(w.dtype):
        return Backend()
    for m in model.modules():
        if isinstance(m, Linear):
            m.pack(0 if quantize else batch_hint)
    b = Backend(head=Linear.frozen(model.head_weight().detach(), 0 if quantize else batch_hint), quantize=quantize)
    kind = "int8" if native and cpu_matmul.int8(cpu_kernels.load()) else "bf16"
    if screen is None:
        screen = not quantize and not cpu_kernels._switched_off("POLYPROMPT_CPU_SCREEN") and (
            kind == "int8" or (w.dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported())) \
            and bool(torch.isfinite(model.head_weight()).all())  # a NaN logit is argmax's answer: the full head's
    if screen:
        b.screen = make_screen(model.head_weight(), kind, batch_hint)
    set_native(model, b, native, amx and not quantize)  # a bf16 screen's layer too; int8 needs no bf16 copy
    if quantize:
        lib = b.native or cpu_kernels.load()
        if not cpu_matmul.int8(lib):
            raise ValueError("--quantize int8 needs the native CPU kernels with AVX512-VNNI (a C compiler, "
                             "AVX-512 and VNNI); this machine has not got them")
        for m in b.linears(model):
            m.set_int8(lib)
    return b


def make_screen(head_weight: torch.Tensor, kind: str, batch_hint: int = 128) -> GreedyScreen | Int8Screen:
    """The greedy screen of `kind`: "int8" (`Int8Screen`, needs the native kernels with
    VNNI; a ValueError elsewhere) or "bf16" (`GreedyScreen`, for fp32 models)."""
    if kind == "int8":
        lib = cpu_kernels.load()
        if not cpu_matmul.int8(lib):
            raise ValueError("the int8 greedy screen needs the native CPU kernels with AVX512-VNNI")
        return Int8Screen(head_weight, lib)
    return GreedyScreen(head_weight, batch_hint)


def set_native(model: "GPT2", b: Backend, on: bool, amx: bool = True) -> bool:
    """Switch `b`'s native CPU kernels (and with `amx` the native matmuls: bf16 ones of decode
    steps on AMX where the CPU has it, else AVX512-BF16 ones; fp32 ones on AVX-512 FMA) on or
    off; whether on."""
    w = model.wte.weight
    lib = None
    if on and w.device.type == "cpu" and cpu_kernels.supports(
            w.dtype, model.spec.head_dim, model.spec.n_positions, model.spec.n_head):
        lib = cpu_kernels.load()
    b.native = lib
    amx_lib = lib if amx and cpu_matmul.amx(lib) else None
    # no AMX: the AVX512-BF16 kernel for bf16 decode steps (POLYPROMPT_CPU_BF16=0 leaves them to oneDNN)
    bf_lib = lib if amx and amx_lib is None and cpu_matmul.bf16(lib) and \
        not cpu_kernels._switched_off("POLYPROMPT_CPU_BF16") else None
    # fp32 weights: the native fp32 kernel (POLYPROMPT_CPU_F32=0 leaves them to oneDNN)
    f32_lib = lib if amx and not cpu_kernels._switched_off("POLYPROMPT_CPU_F32") else None
    for m in b.linears(model):
        m.set_amx(amx_lib)
        m.set_bf16(bf_lib)
        m.set_f32(f32_lib)
    return lib is not None


def pad_head(model: "GPT2") -> torch.Tensor | None:
    """Give the LM head a row count that is a multiple of `HEAD_ALIGN` (GPU).

    GPT-2's vocabulary (50,257) is odd, so its logits' rows are not 16-byte aligned and
    cuBLAS runs the head with a slow unaligned kernel (bench/results/HISTORY.md, the GPU
    step profile). Padded with zero rows to 50,304, the head takes the aligned kernels;
    logits are sliced back to the vocabulary. The embedding (or untied head) becomes a
    view of the padded weight's first rows, so nothing is stored twice.
    """
    w = model.head_weight().detach()
    v = w.shape[0]
    rows = -(-v // HEAD_ALIGN) * HEAD_ALIGN
    if rows == v:
        return None
    full = w.new_zeros(rows, w.shape[1])
    full[:v] = w
    if model.lm_head is None:
        model.wte.weight = torch.nn.Parameter(full[:v], requires_grad=False)
    else:
        model.lm_head = torch.nn.Parameter(full[:v], requires_grad=False)
    return full
