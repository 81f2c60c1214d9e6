"""Leaf helpers and constants shared by `registry`, `adapters`, `training` and `server`.

It imports only the standard library, so every package can use it without pulling in
another's dependencies (`adapters` must not import SQLAlchemy through `registry`, the
engine nothing of the web or database stack).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

PROMPT_KEY = "prompt_embeddings"  # the tensor name in PEFT's adapter_model.safetensors
TASK_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"  # 1-64 of a-z 0-9 . _ -, a letter or digit first
TASK_NAME_RE = re.compile(TASK_NAME_PATTERN)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where directories can be opened: not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """temp file in the same folder -> fsync -> os.replace -> fsync folder: readers see the
    old file or the new one, never a part, even across a crash."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)
