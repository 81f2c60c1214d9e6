"""One multi-threaded OpenMP team per process: the engine thread's.

Why: torch's CPU ops and the native kernels run on libgomp, where each thread that opens a
parallel region gets a team of its own, whose workers live as long as that thread. Once
the process holds more OpenMP threads than it has CPUs, libgomp stops spinning between
parallel regions (its "throttled" wait: ~100 spins, then sleep on a futex), so each of
the hundreds of regions in a decode step starts with a wake-up. One torch op on a side
thread was enough: in `polyprompt serve` the HTTP thread's workers (a soft-prompt upload,
a registry load) gave the engine thread's team company, and a 64-row bf16 decode step took
37-40 ms instead of 26-27 ms (2-core Sapphire Rapids; the in-process engine 1,700-1,850
tok/s, HTTP 1,250-1,330). `OMP_WAIT_POLICY` and `GOMP_SPINCOUNT` do not lift the throttle.

So the engine thread keeps its team (`claim`), every thread that starts its torch work
later gets one OpenMP thread, and a thread whose team is no longer needed (the main thread
after loading the model, where the engine runs elsewhere) hands its workers back
(`release`). Work that stays off the engine thread is small (tokenizing, one soft prompt
at a time), so one thread there costs nothing that shows.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

log = logging.getLogger("polyprompt.engine")

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be kept


def set_default(n: int) -> None:
    """torch's thread count for threads not yet started on torch work (a global that
    `torch.set_num_threads` sets along with its own thread's), without changing this one's."""
    t = threading.Thread(target=torch.set_num_threads, args=(n,), name="polyprompt-omp-default")
    t.start()
    t.join()


def claim(threads: int | None = None) -> int:
    """Make the calling thread's OpenMP team the process's only one with more than one
    thread: `threads` of them (default: what this thread has now, torch's default on a
    fresh one); threads that start their torch work later get one. Returns the count."""
    own = torch.get_num_threads()  # first: torch sets a thread's count up on its first ask,
    n = threads or own  # from the default, which is about to be 1
    torch.set_num_threads(n)
    set_default(1)
    return n


def release() -> bool:
    """Hand the calling thread's OpenMP workers back (OpenMP 5 `omp_pause_resource_all`):
    they count against the engine's team while this thread lives. True where libgomp did;
    its next parallel region, if any, would start a team again."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the copy torch loaded (matched by its soname)
        return gomp.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
    except (OSError, AttributeError):  # no libgomp (another OpenMP runtime) or an old one
        log.debug("libgomp's omp_pause_resource_all is not available", exc_info=True)
        return False
