"""Per-task prefix-KV cache: LRU with a memory cap, reference-counted while in use.

A task's virtual tokens come first and GPT-2 is causal, so their keys/values depend on
nothing else: compute them once per prompt version (keyed by the version's sha256) and
reuse them for every request of that task. A new version has a new sha256, so it gets
its own entry; the old one ages out once no running request holds it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class _Entry:
    kv: torch.Tensor
    refs: int = 0
    for_request: bool = False  # computed for a waiting request: its first use is that request's miss


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # hits/misses count requests (was the prefix there when the request came?);
        # computed counts forward passes, including the ones made ahead of any request
        self.hits = 0
        self.misses = 0
        self.computed = 0
        self.evictions = 0

    def acquire(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The prefix KV for `key` (computed on a miss); holds a reference until `release`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.refs += 1
                self._count_use(entry)
                return entry.kv
        kv = compute()  # outside the lock: may run a forward pass
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(kv)
                self._entries[key] = entry
                self._bytes += kv.nbytes
                self.computed += 1
                self.misses += 1
            else:
                self._count_use(entry)
            entry.refs += 1
            self._entries.move_to_end(key)
            self._evict()
            return entry.kv

    def put(self, key: str, kv: torch.Tensor, *, for_request: bool = False) -> None:
        """Insert a computed entry (unreferenced) unless present. `for_request`: computed
        because a request needs it now (its `acquire` counts a miss), not ahead of time."""
        with self._lock:
            if key not in self._entries:
                self._entries[key] = _Entry(kv, for_request=for_request)
                self._bytes += kv.nbytes
                self.computed += 1
                self._evict()

    def _count_use(self, entry: _Entry) -> None:
        if entry.for_request:
            entry.for_request = False
            self.misses += 1
        else:
            self.hits += 1

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1
            self._evict()

    def invalidate(self, key: str) -> None:
        """Drop `key` once unused (running holders keep their tensor alive)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.kv.nbytes

    def _evict(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if e.refs == 0]:
            if self._bytes <= self.max_bytes:
                break
            self._bytes -= self._entries.pop(key).kv.nbytes
            self.evictions += 1

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "computed": self.computed, "evictions": self.evictions,
                "in_use": sum(1 for e in self._entries.values() if e.refs),
            }

    def __contains__(self, key: str) -> bool:
        return key in self._entries
