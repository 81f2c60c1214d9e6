"""Static-shape decode steps, captured as CUDA graphs on GPU.

A decode-only step is padded to a few shapes: rows to a bucket `b` (row `i` is KV slot
`i`, so attention reads `cache[:b]` as a view) and keys to a length bucket `S`. Rows
with nothing to decode write their K/V into a spare "trash" slot and attend to one key,
so every tensor has a fixed shape and address: the step is captured once per `(b, S)`
and replayed, removing the per-kernel launch cost that dominates small decode steps.

On CPU the same static path runs eagerly (tests check it against the dynamic path).
"""

from __future__ import annotations

import bisect

import torch

from server.engine.batch import Step
from server.model import GPT2, StepMeta

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LEN_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024)


class StaticDecoder:
    def __init__(self, model: GPT2, cache, *, capture: bool):
        self.model, self.cache = model, cache
        self.capture = capture and cache.k[0].is_cuda
        self.trash = cache.num_slots  # the cache holds one extra slot for padding rows
        self.rows = [b for b in ROW_BUCKETS if b < cache.num_slots] + [cache.num_slots]
        self.lens = [s for s in LEN_BUCKETS if s < cache.max_len] + [cache.max_len]
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._staging: dict[int, torch.Tensor] = {}  # pinned host copies of each row bucket's inputs
        self._pool = None

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        return (self.rows[bisect.bisect_left(self.rows, rows)],
                self.lens[bisect.bisect_left(self.lens, length)])

    def decode(self, step: Step, *, greedy: bool) -> tuple[list[int] | None, torch.Tensor | None]:
        """One decode token per row of a decode-only `step` (`batch.build_step`), laid out by
        slot. `greedy`: return each row's argmax token (the step computes it on the device,
        so only a few bytes come back) and no logits; else the logits `[rows, V]` and no tokens."""
        nd = step.n_decode
        slots, tokens, positions = step.slots[:nd], step.ids[:nd], step.pos[:nd]
        b, s = self.bucket(max(slots) + 1, max(positions) + 1)
        for slot in slots:
            self.cache.prepare(slot, s)
        # one host tensor, one copy: token ids, positions, slots written, key lengths
        ids, pos, wslot, lens = [0] * b, [0] * b, [self.trash] * b, [1] * b
        for slot, tok, p in zip(slots, tokens, positions):
            ids[slot], pos[slot], wslot[slot], lens[slot] = tok, p, slot, p + 1
        host = torch.tensor([ids, pos, wslot, lens])
        if not self.capture:
            logits, top = self._forward(host.to(self.cache.k[0].device), s)
        else:
            graph, inputs, (logits, top) = self._graph(b, s)
            staging = self._staging[b]
            staging.copy_(host)
            inputs.copy_(staging, non_blocking=True)
            graph.replay()
        if greedy:
            top = top.tolist()
            return [top[slot] for slot in slots], None
        return None, logits[torch.tensor(slots, device=logits.device)]

    def _forward(self, inputs: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's own step (`GPT2.forward_step`) as a decode-only step over cache
        slots `[0, b)` and keys `[0, s)`: fixed shapes, so it can be captured. `inputs`
        `[4, b]`: ids, positions, slots written, key lengths. Returns logits and argmax."""
        ids, pos, wslot, lens = inputs.unbind(0)
        b = ids.shape[0]
        meta = StepMeta(slot=wslot, n_decode=b, decode_rows=b, decode_len=s, decode_lens=lens)
        logits = self.model.logits(self.model.forward_step(ids, pos, meta, self.cache))
        return logits, logits.argmax(-1)

    def _graph(self, b: int, s: int):
        key = (b, s)
        if key not in self._graphs:
            dev = self.cache.k[0].device
            inputs = torch.zeros(4, b, dtype=torch.long, device=dev)
            inputs[2] = self.trash
            inputs[3] = 1
            if b not in self._staging:
                self._staging[b] = torch.empty(4, b, dtype=torch.long).pin_memory()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and the allocator outside the graph
                    self._forward(inputs, s)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(inputs, s)
            self._graphs[key] = (graph, inputs, out)
        return self._graphs[key]
