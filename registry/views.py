"""Plain-dict views of stored tasks and versions, safe for any JSON response: what the
registry hands the API (`task_to_dict`, `version_to_dict`), with stored JSON made servable."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from .models import PromptVersion, Task

# stored JSON deeper than this is cut on the way out: room for what the parsers accept (64 levels)
# plus the response around it, well under pydantic-core's serializer limit (~255)
MAX_SERVED_DEPTH = 128
_SURROGATE = re.compile("[\ud800-\udfff]")


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite drops the zone; we always store UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def _text(s: str) -> str:
    """`s` with lone surrogates (which no UTF-8 encoder accepts) replaced by U+FFFD."""
    return s if s.isascii() else _SURROGATE.sub("\ufffd", s)


def servable(value: Any) -> Any:
    """A copy of a stored JSON value that any JSON response can carry: lone surrogates become
    U+FFFD, non-finite floats None, containers nested deeper than MAX_SERVED_DEPTH None.
    Today's parsers refuse all three, but an older build stored them, and one such value must
    not make every listing fail. Iterative, so no depth can make it recurse."""
    root = [value]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    while stack:
        parent, key, depth = stack.pop()
        v = parent[key]
        if isinstance(v, str):
            parent[key] = _text(v)
        elif isinstance(v, float) and not math.isfinite(v):
            parent[key] = None
        elif isinstance(v, (dict, list, tuple)):
            if depth >= MAX_SERVED_DEPTH:
                parent[key] = None
                continue
            if isinstance(v, dict):
                new: Any = {_text(str(k)): item for k, item in v.items()}
                keys: Any = list(new)
            else:
                new, keys = list(v), range(len(v))
            parent[key] = new
            stack.extend((new, k, depth + 1) for k in keys)
    return root[0]


def version_to_dict(pv: PromptVersion) -> dict[str, Any]:
    """Plain-dict view of a version, its meta made servable (text columns cannot hold lone
    surrogates, the database drivers refuse to write them; JSON can, as `\\ud800` escapes)."""
    return {
        "version": pv.version,
        "num_virtual_tokens": pv.num_virtual_tokens,
        "hidden_size": pv.hidden_size,
        "base_model": pv.base_model,
        "sha256": pv.sha256,
        "path": pv.path,
        "is_active": bool(pv.is_active),
        "source": pv.source,
        "meta": servable(pv.meta) if isinstance(pv.meta, dict) else {},
        "created_at": _iso(pv.created_at),
    }


def task_to_dict(task: Task) -> dict[str, Any]:
    """Plain-dict view of a task with its versions and active version."""
    versions = sorted(task.versions, key=lambda v: v.version)
    active = next((v for v in versions if v.is_active), None)
    return {
        "name": task.name,
        "description": task.description,
        "num_virtual_tokens": task.num_virtual_tokens,
        "hidden_size": task.hidden_size,
        "base_model": task.base_model,
        "chat_template": task.chat_template,
        "active_version": active.version if active else None,
        "sha256": active.sha256 if active else None,
        "versions": [version_to_dict(v) for v in versions],
        "created_at": _iso(task.created_at),
        "updated_at": _iso(task.updated_at),
    }
