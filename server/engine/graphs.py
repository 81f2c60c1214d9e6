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

from server.engine.batch import additive_mask
from server.model import GPT2, StepMeta

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LEN_BUCKETS = (64, 128, 256, 512, 1024)


class StaticDecoder:
    def __init__(self, model: GPT2, cache, *, capture: bool):
        self.model, self.cache = model, cache
        self.capture = capture and cache.k[0].is_cuda
        self.trash = cache.num_slots  # the cache holds one extra slot for padding rows
        self.rows = [b for b in ROW_BUCKETS if b < cache.num_slots] + [cache.num_slots]
        self.lens = [s for s in LEN_BUCKETS if s < cache.max_len] + [cache.max_len]
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        return (self.rows[bisect.bisect_left(self.rows, rows)],
                self.lens[bisect.bisect_left(self.lens, length)])

    def logits(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits `[len(slots), V]` for one decode token per slot."""
        b, s = self.bucket(max(slots) + 1, max(positions) + 1)
        for slot in slots:
            self.cache.prepare(slot, s)
        dev = self.cache.k[0].device
        ids = torch.zeros(b, dtype=torch.long)
        pos = torch.zeros(b, dtype=torch.long)
        wslot = torch.full((b,), self.trash, dtype=torch.long)
        lens = torch.ones(b, dtype=torch.long)
        idx = torch.tensor(slots)
        ids[idx] = torch.tensor(tokens)
        pos[idx] = torch.tensor(positions)
        wslot[idx] = idx
        lens[idx] = torch.tensor(positions) + 1
        mask = additive_mask((torch.arange(s)[None, :] < lens[:, None]).view(b, 1, 1, s), self.cache.k[0].dtype, "cpu")
        if not self.capture:
            out = self._forward(ids.to(dev), pos.to(dev), wslot.to(dev), mask.to(dev))
        else:
            graph, inputs, out = self._graph(b, s)
            for buf, val in zip(inputs, (ids, pos, wslot, mask)):
                buf.copy_(val, non_blocking=True)
            graph.replay()
        return out[idx.to(dev)]

    def _forward(self, ids, pos, wslot, mask) -> torch.Tensor:
        """The engine's own step (`GPT2.forward_step`) as a decode-only step over cache
        slots `[0, b)` and keys `[0, s)`: fixed shapes, so it can be captured."""
        b, s = ids.shape[0], mask.shape[-1]
        meta = StepMeta(slot=wslot, n_decode=b, decode_rows=b, decode_len=s, decode_mask=mask)
        return self.model.logits(self.model.forward_step(ids, pos, meta, self.cache))

    def _graph(self, b: int, s: int):
        key = (b, s)
        if key not in self._graphs:
            dev = self.cache.k[0].device
            inputs = (torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                      torch.full((b,), self.trash, dtype=torch.long, device=dev),
                      torch.zeros(b, 1, 1, s, dtype=self.cache.k[0].dtype, device=dev))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and the allocator outside the graph
                    self._forward(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(*inputs)
            self._graphs[key] = (graph, inputs, out)
        return self._graphs[key]
