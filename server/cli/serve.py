"""`polyprompt serve`: migrations and the model load before the port is bound, then HTTP on
its own thread and the engine loop on the main one; SIGTERM drains (`server.lifecycle`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from registry.settings import add_flags, from_args
from server.settings import Settings


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="polyprompt serve", description="Start the HTTP server. "
                                "Every flag also reads POLYPROMPT_<FLAG> from the environment; a flag wins.")
    add_flags(p, Settings)
    p.add_argument("--engine-thread", dest="engine_main_thread", action="store_false", default=None,
                   help="the same as --no-engine-main-thread: the engine loop on a secondary thread")
    settings = from_args(Settings, p.parse_args(argv), p)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.app import create_app
    from server.runtime import Runtime

    runtime = Runtime(settings)  # migrations + model load before we listen
    app = create_app(settings, runtime)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level.lower(), timeout_graceful_shutdown=5))
    # HTTP runs on its own thread (uvicorn installs no signal handlers there); the main thread
    # runs the engine loop (its matmuls ran ~15% faster there than on a secondary thread in our
    # CPU measurements) or, with --engine-thread, just waits. SIGTERM/SIGINT drain: refuse new
    # requests, let accepted ones finish within --drain-timeout, end the rest, exit 0; a second
    # signal stops waiting.
    runtime.engine_on_caller_thread = settings.engine_main_thread
    http = threading.Thread(target=server.run, name="polyprompt-http", daemon=True)
    lifecycle = app.state.lifecycle

    def _drain_then_exit():
        lifecycle.drain(runtime.engine, settings.drain_timeout)
        server.should_exit = True

    def _stop(*_):
        if lifecycle.draining.is_set():
            lifecycle.force()
            return
        lifecycle.draining.set()  # at once: the drain thread may start a moment later
        threading.Thread(target=_drain_then_exit, name="polyprompt-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    http.start()
    if settings.engine_main_thread:
        runtime.engine.run(until=lambda: not http.is_alive())
    while http.is_alive():
        http.join(0.2)
    return 0 if server.started else 1  # e.g. the port was taken


