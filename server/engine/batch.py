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
    """Flatten the plan's rows; make every key position a row reads finite (`cache.prepare`).

    Every integer array of the step travels to the device in one copy (on a GPU, each
    separate host-to-device copy is a synchronisation). Attention masks are not built here:
    the SDPA path builds them from these arrays when it needs them (`server.model`), the
    native CPU kernels never do.
    """
    device = cache.k[0].device
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    sample_ids: list[str] = []
    host: dict[str, list[int]] = {}  # more arrays for the device, by name

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
        full = [1] * rows  # key lengths by slot; slots without a decode row attend to one key
        for slot, n in zip(slots, lens):
            full[slot] = n
        host["decode_lens"] = full
        if slots != list(range(nd)):
            host["decode_slots"] = list(slots)

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
        host.update(prefill_slots=pslots, prefill_dest=dest, pasts=pasts, qlens=qlens)
        if pslots == list(range(pslots[0], pslots[0] + len(pslots))):
            meta.prefill_start = pslots[0]  # consecutive slots: attend through a view, no gather
        meta.prefill_q = tq
        meta.prefill_len = length

    dev = _to_device(dict(ids=ids, pos=pos, slot=slots, sample_rows=sample_rows, **host), device)
    meta.slot = dev["slot"]
    if nd:
        meta.decode_lens = dev["decode_lens"]
        meta.decode_slots = dev.get("decode_slots")
    if plan.prefill:
        meta.prefill_slots = dev["prefill_slots"]
        meta.prefill_dest = dev["prefill_dest"]
        meta.prefill_pasts, meta.prefill_qlens = dev["pasts"], dev["qlens"]
    return StepBatch(ids=dev["ids"], positions=dev["pos"], meta=meta, sample_rows=dev["sample_rows"],
                     sample_ids=sample_ids)


def _to_device(arrays: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Integer lists -> int64 tensors on `device`, as slices of one tensor copied once."""
    flat = torch.tensor([v for a in arrays.values() for v in a], dtype=torch.long)
    if flat.device != device:
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    out, i = {}, 0
    for name, a in arrays.items():
        out[name] = flat[i:i + len(a)]
        i += len(a)
    return out
