"""CPU linear layers: oneDNN pre-packed weights, the AMX matmul for bf16 decode steps (or the
AVX512-BF16 one where there is no AMX), the native fp32 matmul of fp32 models, the int8
matmul of `--quantize int8` (AVX512-VNNI or AMX-INT8), and the row buckets every CPU matmul
is padded to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server import cpu_matmul


def bucket_rows(n: int) -> int:
    """`n` rounded up to one of a few sizes (multiples of 8 to 128, of 64 to 1024, then 128).

    oneDNN builds (JIT-compiles) a kernel for every new matmul shape it sees: about 1-2 ms
    at decode sizes and about 40 ms for a 2k-token bf16 prefill, per weight shape. Token
    counts change every step under continuous batching, so the CPU path pads rows to these
    buckets, whose kernels are built once and then come from oneDNN's cache; the padding
    itself costs little (at most 1/8 extra rows past 128).
    """
    step = 8 if n <= 128 else 64 if n <= 1024 else 128
    return -(-n // step) * step


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def bucketed(linear: "Linear", x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for rows `[R, C]`, run padded to `bucket_rows(R)` rows (a prebuilt kernel)."""
    n = x.shape[0]
    return linear(pad_rows(x, bucket_rows(n)))[:n]


def can_pack(dtype: torch.dtype) -> bool:
    return torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` that, on CPU, runs on a weight pre-packed for oneDNN.

    oneDNN's blocked weight layout is what lets bf16 matmuls use AMX: at decode-sized
    batches it is ~2-3x faster than `F.linear` on the plain `[out, in]` weight. GELU
    (tanh) can be fused into the same kernel.
    """

    packed: torch.Tensor | None = None
    _batch_hint = 0  # the row count oneDNN's packing was asked to suit (`pack`)
    # bf16 on CPU with AMX (see `set_amx`): the kernel library while steps of at most
    # AMX_MAX_ROWS rows (decode) run on `cpu_matmul.linear_amx`, and the weight in its tile
    # layout (kept when switched off: switching back is free)
    _amx_lib = None
    _amx_packed: torch.Tensor | None = None
    # bf16 on CPUs with AVX512-BF16 but no AMX (see `set_bf16`): the kernel library while steps of
    # at most BF16_MAX_ROWS rows run on `cpu_matmul.linear_bf16`, and the weight in its panels
    _bf16_lib = None
    _bf16_packed: "cpu_matmul.PanelWeight | None" = None
    # fp32 (see `set_f32`): the kernel library while steps of at most F32_MAX_ROWS rows run on
    # `cpu_matmul.linear_f32`, and the weight in its panels
    _f32_lib = None
    _f32_packed: "cpu_matmul.PanelWeight | None" = None
    # with --quantize int8 (see `set_int8`): the kernel library and the weight quantized for it
    _int8_lib = None
    _int8_packed: "cpu_matmul.Int8Weight | None" = None
    # with its 2 x 2 tiles the AMX kernel beats oneDNN up to ~128 rows (48 block matmuls on Sapphire
    # Rapids: 64 rows 10.0-10.2 vs 12.7-13.0 ms, 128 rows 14.6-15.0 vs 17.4-17.7; level at 192, behind
    # at 256; a 128-row engine step's model call 40.5-43.8 vs 42.8-45.0 ms, four pairs); prefill,
    # compute-bound, stays on oneDNN
    AMX_MAX_ROWS = 128
    # the AVX512-BF16 kernel beat oneDNN at every size measured, 8 to 1,024 rows, by 3-16 % from
    # 64 rows on (bench/results/HISTORY.md), so prefill chunks run on it too
    BF16_MAX_ROWS = 4096
    # the fp32 kernel: 10-15 % ahead of oneDNN at 16-64 rows, level from 256 rows to 2,048
    # (Zen 5, bench/results/HISTORY.md session 14), so prefill chunks run on it too
    F32_MAX_ROWS = 4096

    @classmethod
    def frozen(cls, weight: torch.Tensor, batch_hint: int) -> "Linear":
        """A bias-free packed layer over `weight` `[out, in]` (the LM head, the greedy screen):
        not a submodule of the model, so its parameters are not counted twice."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.pack(batch_hint)
        return layer

    @property
    def amx(self) -> torch.Tensor | None:
        """The packed weight the AMX kernel runs on, None while it is off."""
        return self._amx_packed if self._amx_lib is not None else None

    def _use(self, name: str, lib, suits: bool, pack) -> bool:
        """Turn native kernel `name` on with `lib` (off with None) where the weight is on the CPU
        and `suits` it; its packed weight, `pack()`, is made once and kept while off (switching
        back is free). Returns whether it is on."""
        ok = lib is not None and suits and self.weight.device.type == "cpu"
        if ok and getattr(self, f"_{name}_packed") is None:
            setattr(self, f"_{name}_packed", pack())
        setattr(self, f"_{name}_lib", lib if ok else None)
        self._pack_onednn()
        return ok

    def set_amx(self, lib) -> bool:
        """Run steps of up to AMX_MAX_ROWS rows on the native AMX kernel (`lib`: the loaded
        kernels, with AMX) when this weight suits it (bf16, inputs a multiple of 32); `None`
        turns it off. Returns whether it is on."""
        w = self.weight.detach()
        return self._use("amx", lib, w.dtype == torch.bfloat16 and self.in_features % 32 == 0,
                         lambda: cpu_matmul.pack_amx(w))

    @property
    def bf16(self) -> "cpu_matmul.PanelWeight | None":
        """The packed weight the native bf16 kernel runs on, None while it is off."""
        return self._bf16_packed if self._bf16_lib is not None else None

    def set_bf16(self, lib) -> bool:
        """Run steps of up to BF16_MAX_ROWS rows on `cpu_matmul.linear_bf16` (AVX512-BF16; for
        CPUs without AMX) when this weight suits it (bf16, on the CPU, inputs even); `None`
        turns it off. Returns whether it is on."""
        w = self.weight.detach()
        return self._use("bf16", lib, w.dtype == torch.bfloat16 and self.in_features % 2 == 0,
                         lambda: cpu_matmul.pack_bf16(w, self.bias))

    @property
    def f32(self) -> "cpu_matmul.PanelWeight | None":
        """The packed weight the native fp32 kernel runs on, None while it is off."""
        return self._f32_packed if self._f32_lib is not None else None

    def set_f32(self, lib) -> bool:
        """Run steps of up to F32_MAX_ROWS rows on `cpu_matmul.linear_f32` (AVX-512 FMA) when
        this weight is float32 on the CPU; `None` turns it off. Returns whether it is on."""
        w = self.weight.detach()
        return self._use("f32", lib, w.dtype == torch.float32, lambda: cpu_matmul.pack_f32(w, self.bias))

    @property
    def int8(self) -> "cpu_matmul.Int8Weight | None":
        """The int8 weight every step runs on, None while int8 is off."""
        return self._int8_packed if self._int8_lib is not None else None

    def set_int8(self, lib) -> bool:
        """Run every step on `cpu_matmul.linear_int8` (per-channel int8 weights, each row
        quantized on the fly) with `lib` the loaded kernels; `None` turns it off. Returns
        whether it is on (the weight needs inputs a multiple of 4 and to be on the CPU)."""
        w = self.weight.detach()
        return self._use("int8", lib, self.in_features % 4 == 0, lambda: cpu_matmul.pack_int8(w, self.bias))

    def pack(self, batch_hint: int) -> None:
        """Pre-pack the weight for oneDNN (`batch_hint` 0: don't; the int8 path needs no copy)."""
        self._batch_hint, self.packed = batch_hint, None
        self._pack_onednn()

    def _pack_onednn(self) -> None:
        """oneDNN's pre-packed copy of the weight, kept only while no native kernel takes the
        steps it would serve: the fp32 and AVX512-BF16 kernels take up to F32/BF16_MAX_ROWS
        rows, more than a step has unless --max-num-batched-tokens says otherwise, and past
        that `F.linear` on the plain weight does. One copy of the weights fewer (~0.5 GB for
        the 124M model in fp32); packed again when the kernel is switched off."""
        w = self.weight.detach()
        if self._f32_lib is not None or self._bf16_lib is not None or not self._batch_hint or \
                not can_pack(w.dtype) or w.device.type != "cpu":
            self.packed = None
        elif self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self._batch_hint)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self._int8_lib is not None:
            shape = x.shape
            y = cpu_matmul.linear_int8(self._int8_lib, x.reshape(-1, shape[-1]), self._int8_packed, gelu)
            return y.view(*shape[:-1], y.shape[-1])
        if self._amx_lib is not None and x.dim() == 2 and x.shape[0] <= self.AMX_MAX_ROWS:
            return cpu_matmul.linear_amx(self._amx_lib, x, self._amx_packed, self.out_features, self.bias, gelu)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0  # any leading dims (a prefix batch is 3-D)
        if self._bf16_lib is not None and rows <= self.BF16_MAX_ROWS:
            y = cpu_matmul.linear_bf16(self._bf16_lib, x.reshape(rows, -1), self._bf16_packed, gelu)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self._f32_lib is not None and rows <= self.F32_MAX_ROWS:
            y = cpu_matmul.linear_f32(self._f32_lib, x.reshape(rows, -1), self._f32_packed, gelu)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.packed is None:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate="tanh") if gelu else y
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, shape[-1]).contiguous(), self.packed, self.bias,
            "gelu" if gelu else "none", [], "tanh" if gelu else "")
        return y.view(*shape[:-1], y.shape[-1])
