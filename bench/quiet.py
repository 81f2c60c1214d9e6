"""Only the system being timed runs: the other systems' server processes are stopped meanwhile.

`python -m bench` keeps every system it compares alive through a dtype's repeats (polyprompt's
HTTP server, the OpenVINO worker, vLLM's server), so that runs can alternate. Idle is not
free on 2 cores: vLLM's server and engine processes poll (~7 % of a core between requests,
bench/results/HISTORY.md session 13), which slowed whichever system was being timed beside
them. `Quiet.timing(name)` sends SIGSTOP to every registered process (or process group) but
`name`'s, and SIGCONT to `name`'s; `resume_all()` (also on exit) continues them all, which
must happen before a server is shut down (a stopped process does not act on SIGTERM).
"""

from __future__ import annotations

import os
import signal
import time

SETTLE_S = 0.3  # after SIGCONT: let a resumed server's threads and timers catch up before timing it


class Quiet:
    def __init__(self, on: bool = True, log=None):
        self.on, self.log = on, log
        self.procs: dict[str, tuple[int, bool]] = {}  # name -> (pid or process-group id, is a group)
        self.stopped: set[str] = set()

    def add(self, name: str, pid: int, group: bool = False) -> None:
        """Register `name`'s server (`group`: `pid` leads a process group, e.g. start_new_session)."""
        self.procs[name] = (pid, group)

    def _signal(self, name: str, sig: int) -> bool:
        pid, group = self.procs[name]
        try:
            (os.killpg if group else os.kill)(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):  # gone: nothing left to stop or continue
            return False

    def timing(self, name: str | None) -> None:
        """`name` is about to be timed (None: something in this process, e.g. the engine):
        every other registered server stopped, `name`'s continued."""
        if not self.on:
            return
        for other in self.procs:
            if other != name and other not in self.stopped and self._signal(other, signal.SIGSTOP):
                self.stopped.add(other)
        if name in self.stopped:
            self._signal(name, signal.SIGCONT)
            self.stopped.discard(name)
            time.sleep(SETTLE_S)

    def resume_all(self) -> None:
        for name in list(self.stopped):
            self._signal(name, signal.SIGCONT)
        self.stopped.clear()

    def drop(self, name: str) -> None:
        """`name`'s server is about to stop (or has): continue it, forget it."""
        if name in self.stopped:
            self._signal(name, signal.SIGCONT)
            self.stopped.discard(name)
        self.procs.pop(name, None)

    def __enter__(self) -> "Quiet":
        return self

    def __exit__(self, *exc) -> None:
        self.resume_all()
