"""A serving step's attention: where each flattened token lives (`StepMeta`), and attention
over the slot KV cache by SDPA or by the native CPU kernels (`server.cpu_kernels`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from server import cpu_kernels

if TYPE_CHECKING:  # pragma: no cover
    from server.engine.kv_cache import KVCache


@dataclass
class StepMeta:
    """Where each flattened token of a step lives. Built by the engine, tensors on device.

    Tokens `[0, n_decode)` are decode rows (one token each), the rest are prefill rows'
    tokens, row after row.
    """

    slot: torch.Tensor  # [N] long: cache slot of each token
    n_decode: int
    # decode rows: attention over cache[:decode_rows, :, :decode_len]
    decode_rows: int = 0  # number of leading cache slots covered (>= n_decode)
    decode_len: int = 0
    decode_slots: torch.Tensor | None = None  # [n_decode] long, None when == arange
    decode_lens: torch.Tensor | None = None  # [decode_rows] long: keys attended, by slot (1 for idle slots)
    # [decode_rows, 1, 1, decode_len] additive (0 / -inf); built from decode_lens when SDPA needs it
    decode_mask: torch.Tensor | None = None
    # prefill rows
    prefill_slots: torch.Tensor | None = None  # [Bp] long
    prefill_start: int | None = None  # set when prefill_slots are consecutive
    prefill_q: int = 0  # padded query length
    prefill_len: int = 0  # keys attended (max past + q)
    prefill_dest: torch.Tensor | None = None  # [N - n_decode] long: index into Bp * prefill_q
    prefill_pasts: torch.Tensor | None = None  # [Bp] long: cache positions before each row's tokens
    prefill_qlens: torch.Tensor | None = None  # [Bp] long: each row's tokens this step
    # [Bp, 1, prefill_q, prefill_len] additive (0 / -inf); built from pasts/qlens when SDPA needs it
    prefill_mask: torch.Tensor | None = None

    # The masks are built on the step's device, once a step: on a GPU a few tiny kernels beat
    # building them on the host and copying them over (bench/results/HISTORY.md, the GPU runs).
    def decode_mask_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self.decode_mask is None:
            allowed = torch.arange(self.decode_len, device=self.decode_lens.device)[None, :] < self.decode_lens[:, None]
            self.decode_mask = additive_mask(allowed.view(self.decode_rows, 1, 1, self.decode_len), dtype)
        return self.decode_mask

    def prefill_mask_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self.prefill_mask is None:
            dev = self.prefill_pasts.device
            t = torch.arange(self.prefill_q, device=dev)[None, :, None]  # [1, Tq, 1]
            j = torch.arange(self.prefill_len, device=dev)[None, None, :]  # [1, 1, S]
            valid_q = t < self.prefill_qlens[:, None, None]
            mask = (j <= self.prefill_pasts[:, None, None] + t) & valid_q
            mask |= (~valid_q) & (j == 0)  # padded queries attend somewhere (no NaN), ignored
            self.prefill_mask = additive_mask(mask.unsqueeze(1), dtype)
        return self.prefill_mask


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive 0/-inf mask, on `allowed`'s device (SDPA's CPU
    kernel is faster with it)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class NativeStep(NamedTuple):
    """A step's token slots and positions (contiguous int64) and its decode rows' key lengths."""

    slots: torch.Tensor
    positions: torch.Tensor
    decode_lens: torch.Tensor


def native_step(meta: StepMeta, positions: torch.Tensor, cache: "KVCache") -> NativeStep:
    """A step's indices for the native kernels, after the bounds checks `index_put_` and
    SDPA would make (the kernels take raw pointers), once for every layer: the kernels are
    then called with `prechecked=True` (their own checks would repeat these per layer)."""
    n, nd, n_slots = positions.shape[0], meta.n_decode, cache.kv[0].shape[1]
    slots, positions = meta.slot.long().contiguous(), positions.long().contiguous()
    if n and (int(positions.min()) < 0 or int(positions.max()) >= cache.max_len or
              int(slots.min()) < 0 or int(slots.max()) >= n_slots):
        raise IndexError("a step's slots or positions are outside the KV cache")
    if meta.prefill_pasts is not None and n > nd:  # what prefill_attention indexes by
        ends = meta.prefill_pasts + meta.prefill_qlens
        if int(meta.prefill_qlens.sum()) != n - nd or int(meta.prefill_qlens.min()) < 1 or \
                int(meta.prefill_pasts.min()) < 0 or int(ends.max()) > cache.max_len or \
                int(meta.prefill_slots.min()) < 0 or int(meta.prefill_slots.max()) >= n_slots:
            raise IndexError("a step's prefill rows do not match its tokens or the KV cache")
    # a decode row attends to its own slot's keys 0..position
    return NativeStep(slots, positions, positions[:nd] + 1)


def attend(lib, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: StepMeta,
           native: NativeStep | None, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of a step's queries `[N, H, D]` over one layer's cache; `lib` and `native`
    (the native kernels and the step's checked indices) or SDPA when they are None. `scales`:
    an int8 cache's key and value scales (`KVCache.scales`; native kernels only)."""
    nd = meta.n_decode
    if nd == q.shape[0]:
        return _attend_decode(lib, q, kc, vc, meta, native, scales)
    if native is not None and meta.prefill_pasts is not None:
        pre = cpu_kernels.prefill_attention(lib, q[nd:], kc, vc, meta.prefill_slots, meta.prefill_pasts,
                                            meta.prefill_qlens, prechecked=True, scales=scales)
    elif scales is not None:
        raise RuntimeError("the int8 KV cache is read by the native kernels only")
    else:
        pre = prefill_attention(q[nd:], kc, vc, meta)
    return pre if nd == 0 else torch.cat([_attend_decode(lib, q[:nd], kc, vc, meta, native, scales), pre])


def _attend_decode(lib, q, kc, vc, meta: StepMeta, native: NativeStep | None, scales) -> torch.Tensor:
    if native is not None:
        return cpu_kernels.decode_attention(lib, q, kc, vc, native.slots[:meta.n_decode], native.decode_lens,
                                            prechecked=True, scales=scales)
    if scales is not None:
        raise RuntimeError("the int8 KV cache is read by the native kernels only")
    return decode_attention(q, kc, vc, meta)


def decode_attention(q, kc, vc, meta: StepMeta) -> torch.Tensor:
    """One query per row over a contiguous range of cache slots (a view, no copy)."""
    rows, length = meta.decode_rows, meta.decode_len
    k = kc[:rows, :, :length]  # [rows, H, S, D]
    v = vc[:rows, :, :length]
    if meta.decode_slots is None:  # decode rows are exactly slots 0..rows-1
        qf = q.unsqueeze(2)  # [rows, H, 1, D]
    else:
        qf = q.new_zeros(rows, q.shape[1], 1, q.shape[2])
        qf[meta.decode_slots] = q.unsqueeze(2)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=meta.decode_mask_for(q.dtype))  # [rows, H, 1, D]
    o = o.squeeze(2)
    return o if meta.decode_slots is None else o[meta.decode_slots]


def prefill_attention(q, kc, vc, meta: StepMeta) -> torch.Tensor:
    """Several queries per row; rows padded to `prefill_q`, keys gathered by slot."""
    bp, tq, length = meta.prefill_slots.shape[0], meta.prefill_q, meta.prefill_len
    nh, hd = q.shape[1], q.shape[2]
    if meta.prefill_start is not None:
        rows = slice(meta.prefill_start, meta.prefill_start + bp)
        k, v = kc[rows, :, :length], vc[rows, :, :length]  # [Bp, H, S, D] views
    else:
        k = kc[meta.prefill_slots, :, :length]  # [Bp, H, S, D] gathered
        v = vc[meta.prefill_slots, :, :length]
    if bp * tq == q.shape[0]:  # no padding
        qp = q.view(bp, tq, nh, hd)
    else:
        qp = q.new_zeros(bp * tq, nh, hd)
        qp[meta.prefill_dest] = q
        qp = qp.view(bp, tq, nh, hd)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=meta.prefill_mask_for(q.dtype))
    o = o.transpose(1, 2).reshape(bp * tq, nh, hd)  # [Bp*Tq, H, D]
    return o if bp * tq == q.shape[0] else o[meta.prefill_dest]
