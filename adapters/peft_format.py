"""PEFT prompt-tuning artifacts in and out, with validation.

Format (what peft's `save_pretrained` writes for PROMPT_TUNING): a folder with
`adapter_model.safetensors` holding one tensor `prompt_embeddings`
`[num_virtual_tokens, hidden]` and `adapter_config.json`. Only safetensors is
accepted; pickled files are refused and nothing is ever passed to `torch.load`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

PROMPT_KEY = "prompt_embeddings"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLED_NAME = "adapter_model.bin"
MAX_PROMPT_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
MAX_VIRTUAL_TOKENS = 1024
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class AdapterError(ValueError):
    """An adapter file or folder that cannot be used; the message says why."""


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _check_magic(data: bytes) -> int:
    """Refuse non-safetensors bytes; returns the header length."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise AdapterError(
            "this looks like a pickled PyTorch file (.bin/.pt); pickled .bin files are refused "
            "for safety, use safetensors (adapter_model.safetensors, e.g. save_pretrained("
            "..., safe_serialization=True))"
        )
    if len(data) < 10:
        raise AdapterError(f"not a safetensors file: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > len(data) - 8 or data[8:9] != b"{":
        raise AdapterError("not a safetensors file (bad header); upload adapter_model.safetensors")
    return n


def _header(data: bytes) -> dict[str, Any]:
    n = _check_magic(data)
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def parse_adapter_config(data: bytes) -> dict[str, Any]:
    """Parse `adapter_config.json`; it must be a PROMPT_TUNING config."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is {_mib(len(data))}, over the {_mib(MAX_CONFIG_BYTES)} limit")
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_NAME} must be a JSON object")
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict[str, Any], rows: int | None = None, hidden: int | None = None) -> None:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "PROMPT_TUNING":
        raise AdapterError(
            f"adapter peft_type is {cfg.get('peft_type')!r}; only PROMPT_TUNING adapters are supported"
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(f"adapter task_type is {task_type!r}; only CAUSAL_LM is supported")
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise AdapterError(f"num_transformer_submodules is {subs}; decoder-only models need 1")
    nvt = cfg.get("num_virtual_tokens")
    if rows is not None and nvt is not None and nvt != rows:
        raise AdapterError(
            f"{CONFIG_NAME} says num_virtual_tokens={nvt} but {PROMPT_KEY} has {rows} rows"
        )
    dim = cfg.get("token_dim")
    if hidden is not None and dim is not None and dim != hidden:
        raise AdapterError(f"{CONFIG_NAME} says token_dim={dim} but {PROMPT_KEY} is {hidden} wide")


def parse_prompt_safetensors(
    data: bytes, *, expected_hidden: int, config: dict[str, Any] | None = None
) -> torch.Tensor:
    """Validate `adapter_model.safetensors` bytes; returns `[n, hidden]` float32 CPU contiguous."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AdapterError(f"expected file bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_PROMPT_BYTES:
        raise AdapterError(f"prompt file is {_mib(len(data))}, over the {_mib(MAX_PROMPT_BYTES)} limit")
    header = _header(data)
    if PROMPT_KEY not in header:
        found = sorted(header) or ["(none)"]
        raise AdapterError(f"no {PROMPT_KEY!r} tensor in the file; keys found: {', '.join(found)}")
    info = header[PROMPT_KEY]
    shape = list(info.get("shape", [])) if isinstance(info, dict) else []
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if len(shape) != 2:
        raise AdapterError(
            f"{PROMPT_KEY} must be 2-D [num_virtual_tokens, hidden], got shape {shape} ({len(shape)}-D)"
        )
    rows, hidden = int(shape[0]), int(shape[1])
    if hidden != expected_hidden:
        raise AdapterError(f"{PROMPT_KEY} hidden size {hidden} != model's {expected_hidden}")
    if rows == 0:
        raise AdapterError(f"{PROMPT_KEY} has 0 rows; a prompt needs at least one virtual token")
    if rows > MAX_VIRTUAL_TOKENS:
        raise AdapterError(f"{PROMPT_KEY} has {rows} rows, more than the {MAX_VIRTUAL_TOKENS} maximum")
    if dtype not in FLOAT_DTYPES:
        raise AdapterError(f"{PROMPT_KEY} has dtype {dtype}; expected a float dtype (F32, F16, BF16, F64)")
    if config is not None:
        _check_config(config, rows=rows, hidden=hidden)
    try:
        tensor = st_load(data)[PROMPT_KEY]
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"corrupt safetensors file: {e}") from None
    tensor = tensor.to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError(f"{PROMPT_KEY} contains {bad} non-finite values (NaN or Inf)")
    return tensor


def _read_capped(path: Path, cap: int) -> bytes:
    size = path.stat().st_size
    if size > cap:
        raise AdapterError(f"{path.name} is {_mib(size)}, over the {_mib(cap)} limit")
    return path.read_bytes()


def read_adapter_folder(
    folder: str | os.PathLike[str], *, expected_hidden: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a PEFT prompt-tuning folder -> (embeddings, config dict; {} if no config)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLED_NAME).exists():
            raise AdapterError(
                f"{folder} holds only {PICKLED_NAME}; pickled .bin files are refused, use "
                f"safetensors (re-save with save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"no {WEIGHTS_NAME} in {folder}")
    config: dict[str, Any] = {}
    cfg_path = folder / CONFIG_NAME
    if cfg_path.is_file():
        config = parse_adapter_config(_read_capped(cfg_path, MAX_CONFIG_BYTES))
    data = _read_capped(weights, MAX_PROMPT_BYTES)
    tensor = parse_prompt_safetensors(data, expected_hidden=expected_hidden, config=config or None)
    return tensor, config


def _write_atomic(target: Path, data: bytes) -> None:
    """temp file -> fsync -> os.replace (kept here so adapters never import SQLAlchemy)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _peft_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None


def adapter_config(
    *, num_virtual_tokens: int, token_dim: int, base_model: str | None, num_layers: int, num_attention_heads: int
) -> dict[str, Any]:
    """The `adapter_config.json` PEFT writes for a CAUSAL_LM prompt-tuning adapter."""
    cfg: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": int(num_attention_heads),
        "num_layers": int(num_layers),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(num_virtual_tokens),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": int(token_dim),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    pv = _peft_version()
    if pv:
        cfg["peft_version"] = pv
    return dict(sorted(cfg.items()))


def write_adapter_folder(
    folder: str | os.PathLike[str],
    embeddings: torch.Tensor,
    *,
    base_model: str | None,
    num_layers: int,
    num_attention_heads: int,
) -> Path:
    """Write a folder `PeftModel.from_pretrained(base, folder)` loads; returns it."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise AdapterError(f"embeddings must be [n>=1, hidden], got shape {tuple(embeddings.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    cfg = adapter_config(
        num_virtual_tokens=t.shape[0],
        token_dim=t.shape[1],
        base_model=base_model,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
    )
    _write_atomic(folder / WEIGHTS_NAME, st_save({PROMPT_KEY: t}, metadata={"format": "pt"}))
    _write_atomic(folder / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
    return folder
