"""`polyprompt serve`: the port is bound, the data folder and model folder checked, then
migrations and the model load, then HTTP on its own thread and the engine loop on the main
one; SIGTERM drains (`server.lifecycle`).

A start-up failure a person can fix (port taken, model folder wrong, database URL bad or the
database down, data folder read-only) is one line on stderr and exit code 1, not a traceback
(`--log-level debug` logs the traceback as well): `StartupError` and `_explain`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

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
    if settings.log_level.lower() != "debug":  # alembic >= 1.16 logs each of its plugins at INFO on first use
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    import uvicorn

    from server.app import create_app
    from server.engine import openmp
    from server.lifecycle import freeze_heap, keep_freed_memory
    from server.runtime import Runtime

    heap = keep_freed_memory()  # before loading: no page faults for what each step frees

    try:
        sock = _bind(settings.host, settings.port)  # first: a taken port fails before seconds of loading
        _check_data_dir(settings.data_dir)
        _check_model(settings.model)
        runtime = Runtime(settings)  # migrations + model load before we listen
    except Exception as e:  # noqa: BLE001 -- every start-up failure ends as one line
        logging.getLogger("polyprompt.serve").debug("start-up failed", exc_info=True)
        print(f"polyprompt serve: {_explain(e, settings)}", file=sys.stderr)
        return 1
    if heap:  # logged once start-up went through (a failed one prints its one line only)
        logging.getLogger("polyprompt.serve").info(heap)
    app = create_app(settings, runtime)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level.lower(), timeout_graceful_shutdown=5))
    # HTTP runs on its own thread (uvicorn installs no signal handlers there); the main thread
    # runs the engine loop or, with --engine-thread, just waits. SIGTERM/SIGINT drain: refuse new
    # requests, let accepted ones finish within --drain-timeout, end the rest, exit 0; a second
    # signal stops waiting.
    runtime.engine_on_caller_thread = settings.engine_main_thread
    # before the HTTP thread exists: its torch work gets one OpenMP thread, the engine's team
    # keeps its own (server/engine/openmp.py; with --engine-thread, this thread's team from
    # loading the model is handed back)
    if settings.engine_main_thread:
        openmp.claim(runtime.engine.threads)
    else:
        openmp.release()
        openmp.set_default(1)
    freeze_heap()  # start-up is done: its heap out of the collector's way (server/lifecycle.py)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="polyprompt-http", daemon=True)
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


class StartupError(Exception):
    """A start-up problem already worded for the person starting the server."""


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now and handed to uvicorn (no window for another process to
    take the port between this check and the server's start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                           "(another server on that port? choose one with --port)") from e
    sock.set_inheritable(True)
    return sock


def _check_data_dir(data_dir: str) -> None:
    path = Path(data_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise StartupError(f"--data-dir {data_dir}: the data folder cannot be written ({e.strerror or e}); "
                           "choose a writable folder with --data-dir") from e


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _check_model(model: str) -> None:
    """A local model folder must exist and hold a config and tokenizer files; anything else is
    taken as a hub id (transformers reports a bad one, `_explain` words it)."""
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise StartupError(f"--model {model}: no such folder (a local model folder, or a hub id such as gpt2)")
        return
    if not path.is_dir():
        raise StartupError(f"--model {model}: not a folder (give the folder holding config.json and the tokenizer)")
    if not (path / "config.json").is_file():
        raise StartupError(f"--model {model}: the folder has no config.json: not a saved model folder")
    has = {name: (path / name).is_file() for name in ("tokenizer.json", "vocab.json", "merges.txt")}
    if not (has["tokenizer.json"] or (has["vocab.json"] and has["merges.txt"])):
        raise StartupError(f"--model {model}: the folder has no tokenizer files (tokenizer.json, or vocab.json and "
                           "merges.txt); save the tokenizer next to the model (tokenizer.save_pretrained)")


def _db_label(settings) -> str:
    if not settings.db:
        return f"the database in --data-dir {settings.data_dir}"
    try:
        from sqlalchemy.engine import make_url

        return f"--db {make_url(settings.db).render_as_string(hide_password=True)}"
    except Exception:  # noqa: BLE001 -- an unparseable URL is shown as given (it holds no parsed password)
        return "--db (unparseable URL)"


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _explain(e: Exception, settings) -> str:
    """One line naming what is wrong and what to change, for the failures start-up is known to hit."""
    if isinstance(e, StartupError):
        return str(e)
    import sqlalchemy.exc as sa

    if isinstance(e, (sa.NoSuchModuleError, sa.ArgumentError)):
        return f"{_db_label(settings)}: not a database URL this server can use ({_first_line(e)})"
    if isinstance(e, ModuleNotFoundError) and settings.db:
        return (f"{_db_label(settings)}: the database driver is not installed (No module named {e.name!r}); "
                "pip install it, e.g. psycopg[binary] for postgresql://")
    if isinstance(e, (sa.OperationalError, sa.InterfaceError)):
        cause = _first_line(e.orig) if getattr(e, "orig", None) is not None else _first_line(e)
        return f"{_db_label(settings)}: cannot open the database ({cause}); is it running and reachable?"
    if isinstance(e, sa.SQLAlchemyError):
        return f"{_db_label(settings)}: the database failed at start-up ({type(e).__name__}: {_first_line(e)})"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or _first_line(e)} (check --data-dir and --model)"
    if isinstance(e, OSError) and not Path(settings.model).expanduser().exists():
        return (f"--model {settings.model}: no such folder, and it could not be loaded from the Hugging Face hub "
                f"({_first_line(e)})")
    if isinstance(e, ValueError):  # --device/--dtype and settings the runtime refuses
        return _first_line(e)
    return f"start-up failed: {type(e).__name__}: {_first_line(e)} (--log-level debug shows the traceback)"
