"""The KV cache: allocated once, indexed by slot.

Per layer, keys and values are `[num_slots, heads, max_len, head_dim]` (views; see
`KVCache` for the memory order). A running request owns one slot for its whole life;
its sequence (virtual tokens first, then its prompt and output) sits at cache positions
`0..len-1`, which are also its GPT-2 position ids. Slots are handed out lowest-first so
the busy ones stay packed at the front, which lets decode attention read `cache[:rows]`
as a view instead of a gather.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import torch


def slot_bytes(*, n_layer: int, n_head: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes one slot takes (keys and values, every layer); an int8 cache also holds a float32
    scale per key and per value of each head."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_head = head_dim * elem + (4 if dtype == torch.int8 else 0)
    return 2 * n_layer * n_head * max_len * per_head


KV_CACHE_DTYPES = ("auto", "int8")


def check_kv_cache_dtype(kv_cache_dtype: str, model) -> bool:
    """Whether `model`'s engine gets the int8 cache (`EngineConfig.kv_cache_dtype`); a clear
    ValueError where the value is unknown or the int8 cache cannot run."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return False
    if not model.native_kernels:
        raise ValueError("--kv-cache-dtype int8 needs the native CPU kernels (--device cpu, float32 or bfloat16, "
                         "AVX-512 and a C compiler, POLYPROMPT_CPU_KERNELS not 0); this model does not run on them")
    return True


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values `[..., D]` (float32 or bf16) to the int8 cache's form: int8 `[..., D]`
    and float32 scales `[...]`, each vector on its own: scale = max|x| / 127, q =
    round(x * (127 / max|x|)) (zeros where max|x| == 0). The same arithmetic as the native
    `write_kv_i8` (kernels.c), so a prefix written from here equals one written there."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    # a true division (`127.0 / amax` would be torch's reciprocal-then-multiply: two roundings)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv.unsqueeze(-1)).to(torch.int8), amax / 127.0


def token_major_default(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Store each position's heads side by side on CPU for 2-byte dtypes (see `KVCache`)."""
    return torch.device(device).type == "cpu" and torch.empty((), dtype=dtype).element_size() == 2


class QuantizedKV(NamedTuple):
    """A prefix's KV in the int8 cache's form (`quantize_kv` of `[L, 2, H, n, D]`): what the
    prefix cache keeps for an int8 cache, quantized once instead of at every slot write."""

    q: torch.Tensor  # [L, 2, H, n, D] int8
    scale: torch.Tensor  # [L, 2, H, n] float32

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


class KVCache:
    PREPARE_CHUNK = 32  # positions

    def __init__(self, *, n_layer: int, n_head: int, head_dim: int, max_len: int,
                 num_slots: int, device: torch.device | str, dtype: torch.dtype,
                 token_major: bool | None = None, quantized: bool = False):
        """`token_major`: keep memory as `[slots, max_len, heads, head_dim]` (one position's
        heads contiguous) while every user still sees `[slots, heads, max_len, head_dim]`
        views. On CPU in bf16 a token's K/V write becomes one contiguous 1.5 KB run instead
        of 12 lines 128 KB apart, and decode attention reads it no slower, so bf16/fp16 on
        CPU are token-major; fp32 measured slower that way and CUDA was verified head-major,
        so both stay head-major (paired-step A/Bs: bench/results/HISTORY.md).

        `quantized` (`--kv-cache-dtype int8`, CPU with the native kernels only): keys and
        values stored as int8 with a float32 scale per head and position (`quantize_kv`):
        about half a bf16 cache's bytes, so decode attention, which streams the cache, reads
        half as much. Token-major; `scale[i]` is layer i's `[2, slots, H, max_len]` scales.
        """
        if num_slots < 1:
            raise ValueError("the KV cache needs at least one slot; raise the memory budget")
        self.quantized = quantized
        if quantized:
            if torch.device(device).type != "cpu":
                raise ValueError("the int8 KV cache runs on the CPU's native kernels only")
            token_major, dtype = True, torch.int8
        if token_major is None:
            token_major = token_major_default(device, dtype)
        self.token_major = token_major
        # one spare slot past the end: padding rows of static-shape (CUDA-graph) steps write there.
        # Keys and values of a layer share one tensor (`kv[i]`: [2, slots, H, M, D] views), so
        # a step writes both with one indexing op: one kernel instead of two on GPU.
        # torch.empty: pages never written are never touched, so memory grows with use.
        if token_major:
            shape = (n_layer, 2, num_slots + 1, max_len, n_head, head_dim)
            self._kv = torch.empty(shape, device=device, dtype=dtype).transpose(3, 4)
        else:
            shape = (n_layer, 2, num_slots + 1, n_head, max_len, head_dim)
            self._kv = torch.empty(shape, device=device, dtype=dtype)
        self._scale = None
        self.scale: list[torch.Tensor] = []
        if quantized:  # [L, 2, slots, M, H] in memory: a position's scales beside each other, as its values
            self._scale = torch.empty((n_layer, 2, num_slots + 1, max_len, n_head), device=device,
                                      dtype=torch.float32).transpose(3, 4)
            self.scale = list(self._scale.unbind(0))  # per layer [2, slots, H, M]
        self.kv = list(self._kv.unbind(0))  # per layer [2, slots, H, M, D]
        self.k = [kv[0] for kv in self.kv]  # per layer [slots, H, M, D]
        self.v = [kv[1] for kv in self.kv]
        self.num_slots = num_slots
        self.max_len = max_len
        self._zeroed = [0] * num_slots  # positions [0, n) of each slot hold finite values
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        return heapq.heappop(self._free)

    def prepare(self, slot: int, length: int) -> None:
        """Make positions [0, length) of `slot` finite before a request uses it.

        torch.empty memory may hold NaN bit patterns, and attention multiplies masked-out
        values by a zero weight (0 * NaN = NaN). Stale values of earlier requests are
        finite, so each position is zeroed at most once in the cache's life.
        """
        z = self._zeroed[slot]
        if z < length:
            # in whole chunks: decode steps ask for one more position per step, and many
            # tiny strided writes cost more than one larger one
            length = min(self.max_len, -(-length // self.PREPARE_CHUNK) * self.PREPARE_CHUNK)
            self._kv[:, :, slot, :, z:length] = 0
            if self._scale is not None:
                self._scale[:, :, slot, :, z:length] = 0
            self._zeroed[slot] = length

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def prefix_form(self, prefix: torch.Tensor) -> "torch.Tensor | QuantizedKV":
        """A computed prefix KV `[L, 2, H, n, D]` as the prefix cache should keep it for this
        cache: as it is, or quantized (`QuantizedKV`, half a bf16 prefix's bytes)."""
        return QuantizedKV(*quantize_kv(prefix)) if self.quantized else prefix

    def write_prefix(self, slots: list[int], prefix: "torch.Tensor | QuantizedKV") -> None:
        """Copy a task's prefix KV `[L, 2, H, n, D]` into positions 0..n-1 of each of
        `slots`. On CPU one strided copy per slot, which measured several times faster than
        one advanced-indexing write broadcast over the slots (bench/results/HISTORY.md); on
        GPU that one write is one kernel instead of one per slot."""
        n = prefix.shape[3]
        if not n or not slots:
            return
        if self.quantized:  # quantized once (`prefix_form`), copied into each slot
            q, scale = prefix if isinstance(prefix, QuantizedKV) else quantize_kv(prefix)
            for slot in slots:
                self._kv[:, :, slot, :, :n] = q
                self._scale[:, :, slot, :, :n] = scale
            return
        if len(slots) == 1 or self._kv.device.type == "cpu":
            for slot in slots:
                self._kv[:, :, slot, :, :n] = prefix
        else:
            idx = torch.tensor(slots, device=self._kv.device)
            self._kv[:, :, idx, :, :n] = prefix.unsqueeze(2)  # broadcast over the slots

    def scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `layer`'s key and value scales `[slots, H, max_len]` (None: not quantized)."""
        return (self.scale[layer][0], self.scale[layer][1]) if self.quantized else None

    @property
    def nbytes(self) -> int:
        return self._kv.nbytes + (self._scale.nbytes if self._scale is not None else 0)
