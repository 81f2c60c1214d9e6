"""Registry changes pushed on PostgreSQL: LISTEN for the NOTIFY every registry write sends."""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.engine import make_url

from .store import NOTIFY_CHANNEL

log = logging.getLogger("polyprompt.registry")


class ChangeListener:
    """`LISTEN polyprompt_registry` on a dedicated psycopg connection (PostgreSQL), in a daemon
    thread: every committed registry change (each generation bump runs `pg_notify` in its
    transaction) calls `on_change()` at once, and so does every (re)connection (changes made
    while it was not listening). On a lost connection it reconnects with backoff (0.5 s doubling
    to `max_backoff`); meanwhile the caller's polling is what notices changes. An idle
    connection is checked every `ping_s` so that a silently dead one is found too. `on_change`
    errors are logged, never raised."""

    def __init__(self, url: Any, on_change: Any, *, max_backoff: float = 10.0, wait_s: float = 0.25,
                 ping_s: float = 10.0) -> None:
        url = make_url(str(url)) if isinstance(url, str) else url
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_change = on_change
        self._max_backoff, self._wait_s, self._ping_s = max_backoff, wait_s, ping_s
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.backend_pid: int | None = None  # the listening connection's server process
        self.notifications = 0
        self.connects = 0
        self._thread = threading.Thread(target=self._run, name="polyprompt-registry-listen", daemon=True)

    def start(self) -> ChangeListener:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _fire(self) -> None:
        try:
            self._on_change()
        except Exception:  # noqa: BLE001 -- the poll retries; the listener keeps listening
            log.exception("registry change handler failed")

    def _run(self) -> None:
        import psycopg

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.connects += 1
                    self.connected.set()
                    if self.connects > 1:
                        log.info("listening for registry changes again")
                    backoff = 0.5
                    self._fire()
                    idle = 0.0
                    while not self._stop.is_set():
                        got = 0
                        for _ in conn.notifies(timeout=self._wait_s):
                            got += 1
                            self.notifications += 1
                            self._fire()
                        idle = 0.0 if got else idle + self._wait_s
                        if idle >= self._ping_s:
                            conn.execute("SELECT 1")
                            idle = 0.0
            except Exception as e:  # noqa: BLE001 -- connection lost or refused: poll, retry later
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning("registry LISTEN connection lost (%s); polling until it is back, retrying in %.1fs",
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        self.connected.clear()
