"""Filesystem and URL conventions shared by the registry and its CLIs."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = "polyprompt-data"
DEFAULT_MODEL = "gpt2"
PROMPTS_SUBDIR = "prompts"


def model_id_for(model: str) -> str:
    """A local model folder -> its basename; anything else (a hub id) as given."""
    p = Path(model)
    if p.is_dir():
        return p.resolve().name
    return model


def default_db_url(data_dir: str | os.PathLike[str]) -> str:
    """The default SQLite database inside the data folder."""
    return f"sqlite:///{Path(data_dir).resolve() / 'polyprompt.db'}"


def prompt_relpath(sha256: str) -> str:
    """Relative (to the data dir) path of a content-addressed prompt file."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{PROMPTS_SUBDIR}/{sha256[:2]}/{sha256}.safetensors"


def repo_root() -> Path:
    """The folder that holds `registry/`, `alembic/` and `alembic.ini`."""
    return Path(__file__).resolve().parent.parent


def alembic_dir() -> Path:
    """The migrations folder (`<repo root>/alembic`)."""
    return repo_root() / "alembic"
