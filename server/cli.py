"""`polyprompt` command line: serve, train, tasks, make-test-model."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from registry.settings import add_flags, from_args
from server.settings import Settings

def _serve(argv: list[str]) -> int:
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


def _make_test_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="polyprompt make-test-model",
                                description="Write a randomly initialised GPT-2 + tokenizer (offline).")
    p.add_argument("out")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny",
                   help="tiny (2 layers, 128 wide) or small (the real 124M shape)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.12)
    args = p.parse_args(argv)
    from server.testmodel import make_test_model

    out = make_test_model(args.out, size=args.size, seed=args.seed, init_std=args.init_std)
    print(f"wrote a random {args.size} GPT-2 to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": _serve, "make-test-model": _make_test_model}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: polyprompt {serve,train,tasks,make-test-model} ...\n\n"
              "  serve            start the HTTP server\n"
              "  train            train a task's soft prompt (PEFT prompt tuning) into the registry\n"
              "  tasks            list/show/import/export/delete/activate tasks\n"
              "  make-test-model  write a random GPT-2 for offline use\n")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from training.train import main as train_main

        return train_main(rest)
    if cmd == "tasks":
        from server.tasks_cli import main as tasks_main

        return tasks_main(rest)
    if cmd not in commands:
        print(f"polyprompt: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return commands[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
