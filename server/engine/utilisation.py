"""The engine's busy share: seconds inside `step()` over wall time, over a sliding window.

Why here and this way: autoscalers and readiness need "how close to saturated is this
replica" as one number, and queue depth only moves once it is too late. The engine loop
calls `begin()`/`end()` around each step (two `perf_counter()` calls, nothing per row) and
`tick()` when idle; every `mark_every` seconds a (time, cumulative busy) mark is kept, so
a reader on any thread gets the share of the last `window` seconds from two marks without
the engine doing any per-window work. The engine imports no metrics library: `server.metrics`
reads `utilisation()` and `busy` at scrape time.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable


class BusyMeter:
    def __init__(self, window: float = 10.0, mark_every: float = 0.25,
                 clock: Callable[[], float] = time.perf_counter):
        self.window = window
        self.mark_every = mark_every
        self.clock = clock
        self.busy = 0.0  # cumulative seconds inside step() (engine thread writes)
        self._since: float | None = None  # start of the step in progress
        self._marks: deque[tuple[float, float]] = deque([(clock(), 0.0)])  # (time, busy then)

    def begin(self) -> None:
        self._since = self.clock()

    def end(self) -> None:
        now = self.clock()
        if self._since is not None:
            self.busy += now - self._since
        self._since = None
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Keep a mark if the last one is `mark_every` old; drop marks the window no longer needs
        (one at or before the window's start is kept as its base)."""
        now = self.clock() if now is None else now
        marks = self._marks
        if now - marks[-1][0] >= self.mark_every:
            marks.append((now, self.busy))
            while len(marks) > 1 and marks[1][0] <= now - self.window:
                marks.popleft()

    def utilisation(self, now: float | None = None) -> float:
        """Busy share, 0..1, from the last mark at or before `now - window` (or the oldest one, for
        an engine younger than the window) to `now`, counting a step in progress up to `now`."""
        now = self.clock() if now is None else now
        busy = self.busy  # read before `_since`: a step ending in between is undercounted, never twice
        since = self._since
        if since is not None and now > since:
            busy += now - since
        marks = list(self._marks)  # a copy: the engine thread appends meanwhile
        base = marks[0]
        for m in marks[1:]:
            if m[0] > now - self.window:
                break
            base = m
        span = now - base[0]
        return 0.0 if span <= 0 else min(1.0, max(0.0, (busy - base[1]) / span))
