"""Training checkpoints: everything needed to continue bit for bit, written atomically.

A checkpoint is one file, ``<output-dir>/checkpoint.pt`` (torch.save of plain dicts,
tensors and numbers; loaded with ``weights_only=True``), replaced atomically
(temp file -> fsync -> os.replace -> fsync folder), plus ``checkpoint.json``, a
human-readable summary. It holds the soft prompt, the optimizer and scheduler
states, the RNG states, the epoch/step position, the epoch's data order, the loss
history and the best prompt so far, and a fingerprint of the run's settings:
resuming with different data or hyper-parameters is refused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from common import write_bytes_atomic

CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus a JSON summary) into `output_dir`."""
    out = Path(output_dir)
    state = {"format_version": FORMAT_VERSION, **state}
    target = out / CHECKPOINT_FILE
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(target, buf.getvalue())
    summary = {
        "epoch": state.get("epoch"),
        "micro_step": state.get("micro_step"),
        "global_step": state.get("global_step"),
        "total_steps": state.get("total_steps"),
        "history": state.get("history"),
        "fingerprint": state.get("fingerprint"),
    }
    write_bytes_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return target


def load_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in `output_dir`, or None if there is none."""
    path = Path(output_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file cannot happen (atomic), but a foreign one can
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format_version')}, "
                              f"expected {FORMAT_VERSION}")
    return state


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume when the data or the hyper-parameters differ."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"the checkpoint in {path} belongs to a different run; rerun with the same settings "
            "or a new --output-dir:\n  " + "\n  ".join(diffs))
