"""`polyprompt serve` start-up failures a person can fix: one line on stderr naming the problem,
exit code 1, no traceback (a real subprocess each)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    return _serve_env(tmp_path, {}, *args)


def _serve_env(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    defaults = {"--data-dir": str(tmp_path / "data"), "--device": "cpu", "--port": "0", "--log-level": "info"}
    for flag in args[::2]:
        defaults.pop(flag, None)
    argv = [a for kv in defaults.items() for a in kv] + list(args)
    p = subprocess.run([sys.executable, "-m", "server.cli", "serve", *argv], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env})
    out = (p.stderr + p.stdout).strip()
    return p.returncode, out.splitlines()


def _one_line(rc: int, lines: list[str], *words: str) -> str:
    assert rc == 1, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert lines[0].startswith("polyprompt serve: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def no_tokenizer(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model-without-tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


def test_model_path_that_does_not_exist(tmp_path):
    _one_line(*_serve(tmp_path, "--model", str(tmp_path / "no" / "such-model")), "--model", "no such folder")


def test_model_folder_without_tokenizer(no_tokenizer, tmp_path):
    _one_line(*_serve(tmp_path, "--model", str(no_tokenizer)), "--model", "no tokenizer files")


def test_bad_database_url(tiny_model_dir, tmp_path):
    _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir), "--db", "bogus://nowhere"), "--db bogus://",
              "not a database URL")


def test_database_that_is_down(tiny_model_dir, tmp_path):
    """A PostgreSQL URL to a closed port (psycopg is a dependency): one line about --db that
    says the database cannot be opened, the password hidden."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    line = _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir),
                             "--db", f"postgresql://user:secret@127.0.0.1:{port}/db"), "--db postgresql://")
    assert "secret" not in line
    assert "cannot open the database" in line


def test_data_folder_that_cannot_be_written(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder below a file: unwritable even as root
    _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir), "--data-dir", str(blocker / "data")),
              "--data-dir", "cannot be written")


def test_port_in_use_fails_before_the_model_loads(tiny_model_dir, tmp_path):
    """The port is checked first: the only output is the one line (no migration, model-loading
    or serving-paths log line, which the same command logs at info on a normal start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        line = _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir), "--port", port),
                         f"127.0.0.1:{port}", "cannot listen")
    assert "--port" in line
    assert not (tmp_path / "data").exists()  # nothing ran before the check: not even the data folder


def test_unknown_quantization(tiny_model_dir, tmp_path):
    _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir), "--quantize", "int4"), "--quantize", "int8")


def test_unknown_kv_cache_dtype(tiny_model_dir, tmp_path):
    _one_line(*_serve(tmp_path, "--model", str(tiny_model_dir), "--kv-cache-dtype", "fp8"),
              "--kv-cache-dtype", "auto, int8", "'fp8'")


def test_int8_kv_cache_without_native_kernels(tiny_model_dir, tmp_path):
    """With the native kernels switched off the int8 cache has no reader: refused in one line
    (at --log-level warning, which drops the kernels' info line saying they are switched off)."""
    rc, lines = _serve_env(tmp_path, {"POLYPROMPT_CPU_KERNELS": "0"}, "--model", str(tiny_model_dir),
                           "--kv-cache-dtype", "int8", "--log-level", "warning")
    _one_line(rc, lines, "--kv-cache-dtype int8", "native CPU kernels", "POLYPROMPT_CPU_KERNELS=0")
