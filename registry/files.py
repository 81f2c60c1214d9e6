"""Content-addressed, atomically written soft-prompt files: a replica's local cache of the
prompt blobs the database holds (`prompt_blobs`, the source of truth).

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

__all__ = ["PROMPT_KEY", "prompt_bytes", "prompt_from_bytes", "write_bytes_atomic", "write_prompt_file",
           "read_prompt_bytes", "read_prompt_file"]


def prompt_bytes(embeddings: torch.Tensor) -> bytes:
    """Canonical safetensors bytes `{"prompt_embeddings": float32 contiguous}`."""
    if embeddings.ndim != 2:
        raise ValueError(f"prompt embeddings must be 2-D [n, hidden], got shape {tuple(embeddings.shape)}")
    t = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return st_save({PROMPT_KEY: t})


def write_prompt_file(data_dir: str | os.PathLike[str], embeddings: torch.Tensor | bytes) -> tuple[str, str]:
    """Store `embeddings` (a tensor, or its `prompt_bytes`); returns `(sha256, path relative to
    data_dir)`. Idempotent; a file there whose bytes do not match is replaced."""
    data = embeddings if isinstance(embeddings, bytes) else prompt_bytes(embeddings)
    sha = sha256_bytes(data)
    rel = prompt_relpath(sha)
    target = Path(data_dir) / rel
    if target.is_file() and sha256_file(target) == sha:
        return sha, rel
    write_bytes_atomic(target, data)
    return sha, rel


def read_prompt_bytes(data_dir: str | os.PathLike[str], sha256: str) -> bytes:
    """The bytes of the local file of `sha256`, verified; raises IntegrityError ("missing" /
    "corrupt") otherwise, ValueError if `sha256` is not a hex digest."""
    rel = prompt_relpath(sha256)  # validates the digest's form
    path = Path(data_dir) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"prompt file {rel} is missing from data dir {data_dir}") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"prompt file {rel} is corrupt: sha256 {actual} != {sha256}")
    return data


def prompt_from_bytes(data: bytes, what: str = "prompt") -> torch.Tensor:
    """The float32 `[n, hidden]` prompt in safetensors bytes (already sha-verified)."""
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure is an integrity problem here
        raise IntegrityError(f"{what} is not a safetensors file: {e}") from None
    if PROMPT_KEY not in tensors:
        raise IntegrityError(f"{what} has no {PROMPT_KEY!r} tensor")
    return tensors[PROMPT_KEY].to(torch.float32).contiguous()


def read_prompt_file(data_dir: str | os.PathLike[str], sha256: str) -> torch.Tensor:
    """Load the prompt stored under `sha256` in the local folder only, verifying the digest.
    float32 [n, hidden]. (`Registry.load_prompt` falls back to the database.)"""
    return prompt_from_bytes(read_prompt_bytes(data_dir, sha256), f"prompt file {prompt_relpath(sha256)}")
