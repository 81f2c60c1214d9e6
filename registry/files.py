"""Content-addressed, atomically written soft-prompt files.

Layout: ``<data_dir>/prompts/<sha[:2]>/<sha>.safetensors`` where ``sha`` is the
sha256 of the file's bytes. Paths are built from the digest only, never from a
client-supplied string.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common import PROMPT_KEY, sha256_bytes, sha256_file, write_bytes_atomic

from .errors import IntegrityError
from .paths import prompt_relpath

__all__ = ["PROMPT_KEY", "prompt_bytes", "write_bytes_atomic", "write_prompt_file", "read_prompt_file"]


def prompt_bytes(embeddings: torch.Tensor) -> bytes:
    """Canonical safetensors bytes `{"prompt_embeddings": float32 contiguous}`."""
    if embeddings.ndim != 2:
        raise ValueError(f"prompt embeddings must be 2-D [n, hidden], got shape {tuple(embeddings.shape)}")
    t = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return st_save({PROMPT_KEY: t})


def write_prompt_file(data_dir: str | os.PathLike[str], embeddings: torch.Tensor) -> tuple[str, str]:
    """Store `embeddings`; returns `(sha256, path relative to data_dir)`. Idempotent."""
    data = prompt_bytes(embeddings)
    sha = sha256_bytes(data)
    rel = prompt_relpath(sha)
    target = Path(data_dir) / rel
    if target.is_file() and sha256_file(target) == sha:
        return sha, rel
    write_bytes_atomic(target, data)
    return sha, rel


def read_prompt_file(data_dir: str | os.PathLike[str], sha256: str) -> torch.Tensor:
    """Load the prompt stored under `sha256`, verifying the digest. float32 [n, hidden]."""
    rel = prompt_relpath(sha256)  # validates the digest's form
    path = Path(data_dir) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"prompt file {rel} is missing from data dir {data_dir}") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"prompt file {rel} is corrupt: sha256 {actual} != {sha256}")
    tensors = st_load(data)
    if PROMPT_KEY not in tensors:
        raise IntegrityError(f"prompt file {rel} has no {PROMPT_KEY!r} tensor")
    return tensors[PROMPT_KEY].to(torch.float32).contiguous()
