"""Turn a scheduler plan into the tensors of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.kv_cache import KVCache
from server.engine.scheduler import SeqState, StepPlan
from server.model import StepMeta

if TYPE_CHECKING:  # pragma: no cover
    from server.engine.engine import Request


@dataclass
class StepBatch:
    ids: torch.Tensor  # [N] token ids
    positions: torch.Tensor  # [N] GPT-2 positions == cache positions
    meta: StepMeta
    sample_rows: torch.Tensor  # [R] index into N: the last token of each row that samples
    sample_ids: list[str]  # request ids of those rows, same order


def build_step(plan: StepPlan, requests: dict[str, "Request"], seqs: dict[str, SeqState],
               cache: KVCache) -> StepBatch:
    """Flatten the plan's rows; make every key position a row reads finite (`cache.prepare`)."""
    device, dtype = cache.k[0].device, cache.k[0].dtype
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    sample_ids: list[str] = []

    # decode rows, ordered by slot so the busy slots form a prefix of the cache
    decode = sorted((requests[rid] for rid in plan.decode), key=lambda r: r.slot)
    lens: list[int] = []
    for r in decode:
        p = r.prefix_len + seqs[r.req_id].num_computed
        # the last known token: the latest output, or a prompt's last token after chunking
        ids.append(r.output_ids[-1] if r.output_ids else r.prompt_ids[-1])
        pos.append(p)
        slots.append(r.slot)
        lens.append(p + 1)
        sample_rows.append(len(ids) - 1)
        sample_ids.append(r.req_id)
    nd = len(decode)
    meta = StepMeta(slot=torch.empty(0), n_decode=nd)
    if nd:
        rows = slots[-1] + 1
        meta.decode_rows = rows
        meta.decode_len = max(lens)
        for slot in slots:
            cache.prepare(slot, meta.decode_len)
        dense = slots == list(range(nd))
        full = [1] * rows  # key lengths by slot; slots without a decode row attend to one key
        for slot, n in zip(slots, lens):
            full[slot] = n
        full_t = torch.tensor(full, device=device)
        meta.decode_mask = additive_mask(
            (torch.arange(meta.decode_len, device=device)[None, :] < full_t[:, None]).view(
                rows, 1, 1, meta.decode_len), dtype)
        meta.decode_slots = None if dense else torch.tensor(slots, device=device)

    # prefill rows (new prompts and chunks of long ones)
    if plan.prefill:
        prefill = sorted(plan.prefill, key=lambda item: requests[item[0]].slot)
        tq = max(n for _, n in prefill)
        pslots, pasts, qlens, dest = [], [], [], []
        for b, (rid, n) in enumerate(prefill):
            r, seq = requests[rid], seqs[rid]
            start = seq.num_computed
            toks = (r.prompt_ids + r.output_ids)[start:start + n]
            past = r.prefix_len + start
            ids.extend(toks)
            pos.extend(range(past, past + n))
            slots.extend([r.slot] * n)
            dest.extend(range(b * tq, b * tq + n))
            pslots.append(r.slot)
            pasts.append(past)
            qlens.append(n)
            if start + n == seq.num_known:  # the prompt is complete: this row samples
                sample_rows.append(len(ids) - 1)
                sample_ids.append(rid)
        length = max(p + n for p, n in zip(pasts, qlens))
        for slot in pslots:
            cache.prepare(slot, length)
        # the mask is built where it is used: on a GPU, a few tiny kernels beat building
        # [Bp, Tq, S] on the host and copying it over (measured: ~10-30 ms of host time a
        # 64-row prefill on a 16-core GPU host, where each small CPU op wakes every thread)
        t = torch.arange(tq, device=device)[None, :, None]  # [1, Tq, 1]
        j = torch.arange(length, device=device)[None, None, :]  # [1, 1, S]
        past_t = torch.tensor(pasts, device=device)[:, None, None]
        qlen_t = torch.tensor(qlens, device=device)[:, None, None]
        valid_q = t < qlen_t
        mask = (j <= past_t + t) & valid_q
        mask |= (~valid_q) & (j == 0)  # padded queries attend somewhere (no NaN), ignored
        meta.prefill_slots = torch.tensor(pslots, device=device)
        if pslots == list(range(pslots[0], pslots[0] + len(pslots))):
            meta.prefill_start = pslots[0]  # consecutive slots: attend through a view, no gather
        meta.prefill_q = tq
        meta.prefill_len = length
        meta.prefill_dest = torch.tensor(dest, device=device)
        meta.prefill_mask = additive_mask(mask.unsqueeze(1), dtype)  # [Bp, 1, Tq, S]

    meta.slot = torch.tensor(slots, device=device)
    return StepBatch(
        ids=torch.tensor(ids, device=device),
        positions=torch.tensor(pos, device=device),
        meta=meta,
        sample_rows=torch.tensor(sample_rows, device=device),
        sample_ids=sample_ids,
    )


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive 0/-inf mask, on `allowed`'s device (SDPA's CPU
    kernel is faster with it)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
