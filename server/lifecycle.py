"""Shutdown without dropping work: SIGTERM -> stop admitting -> drain -> exit 0; the
start-up heap frozen out of the garbage collector's way (`freeze_heap`); and freed memory
kept by the C allocator for the next step instead of handed back to the kernel
(`keep_freed_memory`).

`Lifecycle` is the server's one record of whether it admits requests; `DrainGate` (pure
ASGI, outermost) counts the HTTP requests in flight and, once draining, answers new ones
503 with Retry-After (and `/health` 503 "draining", so a load balancer routes around the
replica) while the requests already accepted run to completion.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time

log = logging.getLogger("polyprompt.lifecycle")

RETRY_AFTER = "1"
ANSWER_GRACE_S = 5.0  # after the drain: time for the answers of ended requests to go out


class Lifecycle:
    def __init__(self) -> None:
        self.draining = threading.Event()
        self._forced = threading.Event()
        self.in_flight = 0  # HTTP requests being answered (changed on the event loop only)

    def drain(self, engine, timeout: float) -> bool:
        """Refuse new requests, wait up to `timeout` s for the accepted ones (queued, running,
        or still being answered), then end what is left with "shutdown". True if all finished."""
        self.draining.set()
        log.info("draining: refusing new requests; %d running, %d waiting, up to %gs to finish",
                 engine.num_running, engine.num_waiting, timeout)
        deadline = time.monotonic() + timeout
        while (engine.has_work() or self.in_flight) and time.monotonic() < deadline and not self._forced.is_set():
            time.sleep(0.02)
        clean = not engine.has_work()
        if not clean:
            log.warning("drain timeout: ending %d running and %d waiting requests", engine.num_running,
                        engine.num_waiting)
            engine.abort_all("shutdown")
        grace = time.monotonic() + ANSWER_GRACE_S
        while self.in_flight and time.monotonic() < grace:
            time.sleep(0.02)
        return clean

    def force(self) -> None:
        """A second signal: stop waiting for the running requests."""
        self._forced.set()


def _json(status: int, body: dict, send, headers: list[tuple[bytes, bytes]] = ()):
    data = json.dumps(body).encode()

    async def go():
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"retry-after", RETRY_AFTER.encode()), *headers]})
        await send({"type": "http.response.body", "body": data})
    return go()


class DrainGate:
    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lc = self.lifecycle
        if lc.draining.is_set() and scope.get("path") != "/metrics":
            if scope.get("path") == "/health":
                return await _json(503, {"status": "draining"}, send)
            rt = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
            if rt is not None:
                rt.metrics.reject("shutting_down")
            return await _json(503, {"error": {"message": "the server is shutting down; retry on another replica",
                                               "type": "server_error", "code": "shutting_down"}}, send)
        lc.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            lc.in_flight -= 1


def freeze_heap() -> int:
    """One full collection, then every object alive moved out of the garbage collector's
    reach (`gc.freeze`); returns how many. The heap a server builds at start-up (torch,
    transformers, the app, the registry: ~10^6 objects) lives as long as the process, and
    Python's full collections scanned all of it every few seconds of serving: 180-370 ms
    each, landing mid-step, up to ~9 % of a benchmark run's time (bench/results/HISTORY.md,
    session 13). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str | None:
    """glibc's malloc told to keep what is freed for the next allocation: blocks up to 32 MB
    come from the heap instead of their own mmap, and the heap's free top is not trimmed
    below 1 GB. Every step allocates and frees the same tensors (a 64-row step's logits
    alone are 12.9 MB); with glibc's defaults (a dynamic mmap threshold, trimming above twice
    it) much of that went back to the kernel each step and came back as zero-filled page
    faults: 50,000-90,000 a run of the bench's HTTP workload in the server, ~0 with this
    (+1 % throughput in a paired A/B, +4 % resident memory: bench/results/HISTORY.md, session
    16). The process keeps its peak working set (a steady server's memory anyway). Returns
    what was set, or None where it does not apply: not glibc, or the operator chose
    (MALLOC_*_ or GLIBC_TUNABLES glibc.malloc.* in the environment, which stand)."""
    if sys.platform != "linux" or any(k in os.environ for k in _MALLOC_ENV) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:  # musl and others: not glibc's knobs
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))):
        return None
    gnu.restype = ctypes.c_char_p
    return (f"glibc {gnu().decode()} malloc keeps freed memory: mmap threshold {MMAP_THRESHOLD >> 20} MB, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MB, top pad {TOP_PAD >> 20} MB")
