"""PEFT prompt-tuning artifacts in and out, with validation.

Format (what peft's `save_pretrained` writes for PROMPT_TUNING): a folder with
`adapter_model.safetensors` holding one tensor `prompt_embeddings`
`[num_virtual_tokens, hidden]` and `adapter_config.json`. Only safetensors is
accepted; pickled files are refused and nothing is ever passed to `torch.load`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import PROMPT_KEY, write_bytes_atomic

if TYPE_CHECKING:  # torch and safetensors load in the functions that need them: checking a header,
    import torch  # a config or an error class (`polyprompt tasks`) must not cost torch's import

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
README_NAME = "README.md"
PICKLED_NAME = "adapter_model.bin"
MAX_PROMPT_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024  # one tensor's header is ~100 bytes; this bounds the checks below
MAX_JSON_DEPTH = 64
MAX_VIRTUAL_TOKENS = 1024
DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

_ESCAPE = re.compile(r"\\.", re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


class AdapterError(ValueError):
    """An adapter file or folder that cannot be used; the message says why."""


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _show(value: Any, limit: int = 60) -> str:
    """repr() for messages: escapes lone surrogates (an error body must be encodable too), cut short."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# -- JSON that can be stored and served back ------------------------------------
def _too_deep(what: str) -> AdapterError:
    return AdapterError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")


def _check_depth(text: str, what: str) -> None:
    """Refuse nesting over MAX_JSON_DEPTH before parsing, by counting the brackets outside
    strings in a loop: json.loads itself would recurse (RecursionError at ~1000 levels)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    outside = "".join(_ESCAPE.sub("", text).split('"')[::2])  # the text outside strings, in linear time
    depth = 0
    for ch in _NOT_BRACKET.sub("", outside):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what)


def _check_values(value: Any, what: str) -> None:
    """Refuse what a JSON response cannot carry: strings (keys too) that are not UTF-8 encodable
    (lone surrogates, which the JSON escape `\\ud800` can produce) and infinite floats (`1e400`)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                raise AdapterError(f"{what} holds a string with a lone surrogate ({_show(v)}), "
                                   "which is not valid Unicode; text must be encodable as UTF-8")
        elif isinstance(v, float) and not math.isfinite(v):
            raise AdapterError(f"{what} holds a number too large for a float; numbers must be finite")


def _load_json(data: bytes, what: str) -> Any:
    """json.loads for untrusted bytes: every way it can fail is an AdapterError, and what it
    returns can be stored and served back (bounded depth, finite numbers, UTF-8 text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterError(f"{what} is not UTF-8 text: {e}") from None
    _check_depth(text, what)

    def constant(name: str) -> Any:
        raise AdapterError(f"{what} holds {name}, which is not a JSON number; numbers must be finite")

    try:
        value = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{what} is not valid JSON: {e}") from None
    except AdapterError:
        raise
    except RecursionError:  # last resort: _check_depth already refuses anything this deep
        raise _too_deep(what) from None
    except ValueError:  # int("1" * 5000): over sys.get_int_max_str_digits()
        raise AdapterError(
            f"{what} holds an integer with more than {sys.get_int_max_str_digits()} digits") from None
    _check_values(value, what)
    return value


# -- safetensors ----------------------------------------------------------------
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
    if n > MAX_HEADER_BYTES:
        raise AdapterError(f"safetensors header is {_mib(n)}, over the {_mib(MAX_HEADER_BYTES)} limit")
    return n


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header (without `__metadata__`) and how many data bytes follow it."""
    n = _check_magic(data)
    header = _load_json(data[8 : 8 + n], "the safetensors header")
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, len(data) - 8 - n


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0  # not bool, float or str


def _prompt_entry(header: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """(rows, hidden, header entry) of the prompt tensor, its shape checked."""
    if PROMPT_KEY not in header:
        keys = sorted(header)
        found = [k if len(k) <= 40 else k[:37] + "..." for k in keys[:10]] + (["..."] if len(keys) > 10 else [])
        raise AdapterError(f"no {PROMPT_KEY!r} tensor in the file; keys found: {', '.join(found) or '(none)'}")
    info = header[PROMPT_KEY]
    if not isinstance(info, dict):
        raise AdapterError(f"{PROMPT_KEY}'s header entry is {_show(info)}; "
                           "expected an object with dtype, shape and data_offsets")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterError(f"{PROMPT_KEY} has shape {_show(shape)}; expected a list of non-negative "
                           "integers [num_virtual_tokens, hidden]")
    if len(shape) != 2:
        raise AdapterError(
            f"{PROMPT_KEY} must be 2-D [num_virtual_tokens, hidden], got shape {shape} ({len(shape)}-D)"
        )
    return shape[0], shape[1], info


def _check_offsets(info: dict[str, Any], rows: int, hidden: int, payload: int) -> None:
    dtype, offsets = info["dtype"], info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise AdapterError(f"{PROMPT_KEY} has data_offsets {_show(offsets)}; "
                           "expected [begin, end], two non-negative integers")
    size = rows * hidden * DTYPE_SIZES[dtype]
    begin, end = offsets
    if end - begin != size or end > payload:
        raise AdapterError(f"{PROMPT_KEY} has data_offsets {_show(offsets)}, but a {dtype} [{rows}, {hidden}] "
                           f"tensor takes {size} bytes and the file has {payload} bytes of data")


def prompt_shape(data: bytes) -> tuple[int, int]:
    """(num_virtual_tokens, hidden) from a safetensors file's header; the file's first
    8 + header-length bytes are enough. Raises AdapterError."""
    rows, hidden, _ = _prompt_entry(_header(data)[0])
    return rows, hidden


def parse_adapter_config(data: bytes) -> dict[str, Any]:
    """Parse `adapter_config.json`; it must be a PROMPT_TUNING config."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is {_mib(len(data))}, over the {_mib(MAX_CONFIG_BYTES)} limit")
    cfg = _load_json(bytes(data), CONFIG_NAME)
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_NAME} must be a JSON object")
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict[str, Any], rows: int | None = None, hidden: int | None = None) -> None:
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "PROMPT_TUNING":
        raise AdapterError(
            f"adapter peft_type is {_show(peft_type)}; only PROMPT_TUNING adapters are supported"
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(f"adapter task_type is {_show(task_type)}; only CAUSAL_LM is supported")
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise AdapterError(f"num_transformer_submodules is {_show(subs)}; decoder-only models need 1")
    nvt = cfg.get("num_virtual_tokens")
    if rows is not None and nvt is not None and nvt != rows:
        raise AdapterError(
            f"{CONFIG_NAME} says num_virtual_tokens={_show(nvt)} but {PROMPT_KEY} has {rows} rows"
        )
    dim = cfg.get("token_dim")
    if hidden is not None and dim is not None and dim != hidden:
        raise AdapterError(f"{CONFIG_NAME} says token_dim={_show(dim)} but {PROMPT_KEY} is {hidden} wide")


def parse_prompt_safetensors(
    data: bytes, *, expected_hidden: int, config: dict[str, Any] | None = None
) -> torch.Tensor:
    """Validate `adapter_model.safetensors` bytes; returns `[n, hidden]` float32 CPU contiguous."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AdapterError(f"expected file bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_PROMPT_BYTES:
        raise AdapterError(f"prompt file is {_mib(len(data))}, over the {_mib(MAX_PROMPT_BYTES)} limit")
    header, payload = _header(data)
    rows, hidden, info = _prompt_entry(header)
    if hidden != expected_hidden:
        raise AdapterError(f"{PROMPT_KEY} hidden size {hidden} != model's {expected_hidden}")
    if rows == 0:
        raise AdapterError(f"{PROMPT_KEY} has 0 rows; a prompt needs at least one virtual token")
    if rows > MAX_VIRTUAL_TOKENS:
        raise AdapterError(f"{PROMPT_KEY} has {rows} rows, more than the {MAX_VIRTUAL_TOKENS} maximum")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise AdapterError(f"{PROMPT_KEY} has dtype {_show(dtype)}; expected a float dtype (F32, F16, BF16, F64)")
    _check_offsets(info, rows, hidden, payload)
    if config is not None:
        _check_config(config, rows=rows, hidden=hidden)
    import torch
    from safetensors.torch import load as st_load

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


def model_card(*, base_model: str | None, title: str, lines: tuple[str, ...] | list[str] = ()) -> str:
    """A `README.md` as PEFT's `save_pretrained` writes one: YAML front matter naming the base
    model (`base_model`, `library_name: peft`), then a title and a few lines of markdown."""
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model, ensure_ascii=False)}")  # a JSON string is YAML
    front += ["library_name: peft", "pipeline_tag: text-generation", "tags:", "- prompt-tuning",
              "- polyprompt", "---", "", f"# {title}", ""]
    return "\n".join([*front, *lines, ""])


def write_adapter_folder(
    folder: str | os.PathLike[str],
    embeddings: torch.Tensor,
    *,
    base_model: str | None,
    num_layers: int,
    num_attention_heads: int,
    readme: str | None = None,
) -> Path:
    """Write a folder `PeftModel.from_pretrained(base, folder)` loads (and `readme`, e.g. a
    `model_card`, as its README.md); returns it. `base_model` becomes the config's
    `base_model_name_or_path`."""
    import torch
    from safetensors.torch import save as st_save

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
    write_bytes_atomic(folder / WEIGHTS_NAME, st_save({PROMPT_KEY: t}, metadata={"format": "pt"}))
    write_bytes_atomic(folder / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
    if readme is not None:
        write_bytes_atomic(folder / README_NAME, readme.encode("utf-8"))
    return folder
