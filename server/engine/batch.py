"""The one step builder: a scheduler plan -> the rows of one forward pass.

`build_step` lays the plan's rows out on the host (plain lists: cheap, no device copy) and
makes every key position a row reads finite (`cache.prepare`). The dynamic path moves them
to the device in one copy (`Step.to_device`); the static decode path (`graphs.StaticDecoder`,
CUDA graphs) lays the same decode rows out by slot instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.kv_cache import KVCache
from server.engine.scheduler import StepPlan
from server.model import StepMeta

if TYPE_CHECKING:  # pragma: no cover
    from server.engine.request import Request


@dataclass
class StepBatch:
    ids: torch.Tensor  # [N] token ids
    positions: torch.Tensor  # [N] GPT-2 positions == cache positions
    meta: StepMeta
    sample_rows: torch.Tensor  # [R] index into N: the last token of each row that samples


@dataclass
class Step:
    """A step's rows on the host: decode rows first (ordered by slot, so the busy slots form
    a prefix of the cache), then prefill rows' tokens, row after row."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # index into ids: each sampling row's last token
    sampled: list["Request"] = field(default_factory=list)  # the requests of those rows, same order
    n_decode: int = 0
    decode_rows: int = 0  # leading cache slots the decode rows cover
    decode_len: int = 0
    host: dict[str, list[int]] = field(default_factory=dict)  # more arrays for the device, by name
    # prefill rows that want the prompt's log-probs: (request, index into ids of its first
    # token here, that token's index in the prompt, how many tokens it has here)
    prompt_rows: list[tuple["Request", int, int, int]] = field(default_factory=list)
    prefill_start: int | None = None
    prefill_q: int = 0
    prefill_len: int = 0

    def to_device(self, device: torch.device) -> StepBatch:
        """Every integer array of the step in one host-to-device copy (on a GPU, each separate
        copy is a synchronisation). Attention masks are not built here: the SDPA path builds
        them from these arrays when it needs them (`server.model.attention`), the native CPU
        kernels never do."""
        dev = _to_device(dict(ids=self.ids, pos=self.pos, slot=self.slots, sample_rows=self.sample_rows,
                              **self.host), device)
        meta = StepMeta(slot=dev["slot"], n_decode=self.n_decode)
        if self.n_decode:
            meta.decode_rows, meta.decode_len = self.decode_rows, self.decode_len
            meta.decode_lens = dev["decode_lens"]
            meta.decode_slots = dev.get("decode_slots")
        if "prefill_slots" in dev:
            meta.prefill_slots, meta.prefill_dest = dev["prefill_slots"], dev["prefill_dest"]
            meta.prefill_pasts, meta.prefill_qlens = dev["pasts"], dev["qlens"]
            meta.prefill_start, meta.prefill_q, meta.prefill_len = self.prefill_start, self.prefill_q, self.prefill_len
        return StepBatch(ids=dev["ids"], positions=dev["pos"], meta=meta, sample_rows=dev["sample_rows"])


def build_step(plan: StepPlan, cache: KVCache) -> Step:
    """Flatten the plan's rows (see `Step`); make every key position a row reads finite."""
    step = Step()
    _decode_rows(step, sorted(plan.decode, key=lambda r: r.slot), cache)
    if plan.prefill:
        _prefill_rows(step, sorted(plan.prefill, key=lambda item: item[0].slot), cache)
    return step


def _decode_rows(step: Step, decode: list["Request"], cache: KVCache) -> None:
    lens: list[int] = []
    for r in decode:
        p = r.cache_len
        step.ids.append(r.last_token)
        step.pos.append(p)
        step.slots.append(r.slot)
        lens.append(p + 1)
        step.sample_rows.append(len(step.ids) - 1)
        step.sampled.append(r)
    step.n_decode = nd = len(decode)
    if not nd:
        return
    slots = step.slots[:nd]
    step.decode_rows = slots[-1] + 1
    step.decode_len = max(lens)
    for slot in slots:
        cache.prepare(slot, step.decode_len)
    full = [1] * step.decode_rows  # key lengths by slot; slots without a decode row attend to one key
    for slot, n in zip(slots, lens):
        full[slot] = n
    step.host["decode_lens"] = full
    if slots != list(range(nd)):
        step.host["decode_slots"] = list(slots)


def _prefill_rows(step: Step, prefill: list[tuple["Request", int]], cache: KVCache) -> None:
    """New prompts and chunks of long ones."""
    tq = max(n for _, n in prefill)
    pslots, pasts, qlens, dest = [], [], [], []
    for b, (r, n) in enumerate(prefill):
        start = r.num_computed
        toks = (r.prompt_ids + r.output_ids)[start:start + n]
        past = r.prefix_len + start
        if r.params.prompt_logprobs is not None and start < r.num_prompt - 1:  # the last one predicts no prompt token
            step.prompt_rows.append((r, len(step.ids), start, min(n, r.num_prompt - 1 - start)))
        step.ids.extend(toks)
        step.pos.extend(range(past, past + n))
        step.slots.extend([r.slot] * n)
        dest.extend(range(b * tq, b * tq + n))
        pslots.append(r.slot)
        pasts.append(past)
        qlens.append(n)
        if start + n == r.num_prompt + r.num_output:  # the prompt is complete: this row samples
            step.sample_rows.append(len(step.ids) - 1)
            step.sampled.append(r)
    length = max(p + n for p, n in zip(pasts, qlens))
    for slot in pslots:
        cache.prepare(slot, length)
    step.host.update(prefill_slots=pslots, prefill_dest=dest, pasts=pasts, qlens=qlens)
    if pslots == list(range(pslots[0], pslots[0] + len(pslots))):
        step.prefill_start = pslots[0]  # consecutive slots: attend through a view, no gather
    step.prefill_q, step.prefill_len = tq, length


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
