"""Answers of identical deterministic requests, kept in a bounded LRU (`--response-cache-mb`).

What a request generates is fixed by the model (one per process), its prefix (the prompt
version's sha256, `Prepared.prefix_key`; "" = the base model), the prompt's token ids and
the sampling parameters, whenever no random draw is involved: a greedy request, a seeded one (its own
`torch.Generator`, the same tokens alone or in any batch), or one that samples no token at
all (`max_tokens` 0: the prompt's log-probs alone). Such a request is looked up here before
it reaches the engine (`service.Submission`); a hit is answered from what was stored,
without any engine request.

- **Key**: (prefix_key, the prompt ids packed 4 bytes each, every field of `SamplingParams`
  by name and value, written canonically: lists as tuples, numbers by value). It is derived
  from the dataclass's fields, so a field added later is part of the key without a change
  here; a value of a type it cannot write makes the request uncacheable (never a wrong hit).
- **What is stored**: an item's token ids, text, finish reason, prompt token count,
  per-token log-probs, any other field of `RequestOutput` (the prompt's log-probs for
  echo: on the first chunk of a stream, on the final output otherwise, as the engine sends
  them), and where each streamed chunk's text ends. A stream replays the same chunk
  sequence the engine sends (one per token, the last one final, same text deltas); for an
  entry filled by a non-streaming request those deltas are recomputed once with the engine's
  own `Detokenizer`, on first streamed use. Either mode fills the cache for both.
- **What is not**: only items that finished normally (`stop`, `length`, `repetition`).
- **Size**: each entry's bytes are estimated by walking it (`sys.getsizeof` of every object
  it holds, key included, plus the LRU's own per-entry overhead); least recently used
  entries go first once the total is over the cap; one entry over the whole cap is not kept.
- **Invalidation**: keys carry the prefix key (the version's sha256), so a new version can
  never be answered from an old one; each entry also records the task version it was computed
  on (`Prepared.served_version`), and `invalidate(version)` frees the memory of a version that
  stopped being served (`Runtime.refresh`); an item whose version was replaced while it ran
  is not stored.

Thread-safety: one lock; lookups and fills come from the event loop, invalidation from the
registry poller.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from array import array
from collections import OrderedDict
from typing import Any

from server.engine.output import Detokenizer, RequestOutput

CACHED_REASONS = frozenset({"stop", "length", "repetition"})
# RequestOutput fields the replay builds itself; any other field is carried as an "extra"
_BUILT = frozenset({"req_id", "new_token_ids", "text_delta", "finished", "finish_reason", "num_prompt_tokens",
                    "logprobs", "token_ids", "text"})
_ENTRY_OVERHEAD = 200  # the OrderedDict node, the per-version index's set slot, the Entry object's header


def deterministic(params) -> bool:
    """Whether the request's output is a function of its inputs: greedy, seeded, or no token sampled."""
    return bool(params.greedy or params.seed is not None or params.max_tokens == 0)


def _canon(v: Any) -> str:
    """`v` written so that two values give the same text exactly when they are equal: numbers
    by value (0, 0.0 and False alike, as Python compares them), strings quoted, a list like
    a tuple, dicts and sets in sorted order, dataclasses field by field. Any other type raises
    TypeError: such a request is not cached (never a wrong hit)."""
    if v is None or isinstance(v, (str, bytes)):
        return repr(v)
    if isinstance(v, (bool, int)):
        return repr(int(v))
    if isinstance(v, float):
        return repr(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_canon(x) for x in v) + ")"
    if isinstance(v, dict):
        return "{" + ",".join(sorted(f"{_canon(k)}:{_canon(x)}" for k, x in v.items())) + "}"
    if isinstance(v, (set, frozenset)):
        return "{" + ",".join(sorted(_canon(x) for x in v)) + "}"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return type(v).__qualname__ + "(" + ",".join(f"{f.name}={_canon(getattr(v, f.name))}"
                                                      for f in dataclasses.fields(v)) + ")"
    raise TypeError(f"cannot key a {type(v).__name__}")


def make_key(prefix_key: str, prompt_ids: list[int], params) -> tuple | None:
    """The cache key of a request, or None when it is not deterministic or not keyable:
    (prefix key, the prompt ids 4 bytes each, every field of `params` by name and value)."""
    if not deterministic(params):
        return None
    try:
        return (prefix_key, array("I", prompt_ids).tobytes(), _canon(params))
    except (TypeError, OverflowError, ValueError):
        return None


def _output_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RequestOutput) if f.name not in _BUILT]


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return value == f.default_factory()  # type: ignore[misc]
    return False


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _extras(out: RequestOutput, into: dict[str, Any]) -> None:
    """Record the extra fields `out` carries (first value seen wins)."""
    for f in _output_fields():
        if f.name not in into:
            value = getattr(out, f.name)
            if not _is_default(f, value):
                into[f.name] = tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(eq=False)
class Entry:
    version: str
    token_ids: array  # "I"
    text: str
    finish_reason: str
    num_prompt_tokens: int
    logprobs: tuple  # one TokenLogprob per token when asked for, else empty
    extras: dict[str, Any]  # other RequestOutput fields (e.g. the prompt's log-probs)
    offsets: array | None = None  # per streamed chunk, where its text delta ends in `text`; None: not known yet
    nbytes: int = 0

    @property
    def num_chunks(self) -> int:
        return max(1, len(self.token_ids))

    @classmethod
    def from_final(cls, out: RequestOutput, version: str) -> Entry:
        """From a non-streaming item's final output (all tokens and log-probs on it)."""
        extras: dict[str, Any] = {}
        _extras(out, extras)
        return cls(version, array("I", out.token_ids), out.text, out.finish_reason or "", out.num_prompt_tokens,
                   tuple(out.logprobs or ()), extras)

    def outputs(self, req_id: str, *, stream: bool) -> list[RequestOutput]:
        """What the engine would send for this item: the final output alone, or (streaming) one
        chunk per token, the last one final, the extras on the first. Needs `offsets` to stream."""
        ids = self.token_ids.tolist()
        extras = {k: _copy(v) for k, v in self.extras.items()}
        if not stream:
            return [RequestOutput(req_id, list(ids), self.text, True, self.finish_reason, self.num_prompt_tokens,
                                  list(self.logprobs), token_ids=ids, text=self.text, **extras)]
        assert self.offsets is not None
        lps = self.logprobs
        chunks, prev, n = [], 0, self.num_chunks
        for j in range(n):
            end = self.offsets[j]
            delta, prev = self.text[prev:end], end
            first = extras if j == 0 else {}
            if j < n - 1:
                chunks.append(RequestOutput(req_id, [ids[j]], delta, False, None, self.num_prompt_tokens,
                                            [lps[j]] if lps else None, **first))
            else:
                chunks.append(RequestOutput(req_id, ids[-1:], delta, True, self.finish_reason, self.num_prompt_tokens,
                                            list(lps[-1:]), token_ids=ids, text=self.text, **first))
        return chunks


class Recorder:
    """Gathers what a streamed item was sent, to store it once it finished normally."""

    def __init__(self) -> None:
        self.offsets = array("I")
        self.pos = 0
        self.logprobs: list = []
        self.extras: dict[str, Any] = {}

    def add(self, out: RequestOutput) -> None:
        self.pos += len(out.text_delta)
        self.offsets.append(self.pos)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        _extras(out, self.extras)

    def entry(self, final: RequestOutput, version: str) -> Entry:
        e = Entry(version, array("I", final.token_ids), final.text, final.finish_reason or "",
                  final.num_prompt_tokens, tuple(self.logprobs), dict(self.extras))
        if len(self.offsets) == e.num_chunks and self.pos == len(e.text):
            e.offsets = self.offsets
        return e  # else (never seen) the deltas are recomputed on first streamed use


def stream_offsets(entry: Entry, params, tokenizer, eos_token_id: int | None) -> array:
    """Where each streamed chunk's text ends, as the engine computes its deltas: the same
    `Detokenizer` fed the same tokens (an ending EOS is not fed unless `ignore_eos`)."""
    d = Detokenizer(tokenizer, params.stop, eos_token_id=eos_token_id)
    ids = entry.token_ids.tolist()
    offsets, pos = array("I"), 0
    for j, tok in enumerate(ids):
        if not (tok == eos_token_id and not params.ignore_eos):
            d.add(tok)
        if j < len(ids) - 1:
            pos += len(d.delta())
            offsets.append(pos)
    pos += len(d.delta(final=True))
    offsets.append(pos)
    if pos != len(entry.text):  # cannot happen with the engine's detokenizer; never send a wrong text
        offsets = array("I", [0] * (entry.num_chunks - 1) + [len(entry.text)])
    return offsets


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes held by `obj` and everything it references (each object once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, bytearray, array, int, float, bool, type(None))):
        return size
    if isinstance(obj, dict):
        return size + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_size(x, seen) for x in obj)
    if hasattr(obj, "__dict__"):
        size += deep_size(vars(obj), seen)
    for name in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, name):
            size += deep_size(getattr(obj, name), seen)
    return size


class ResponseCache:
    """LRU of `Entry` by `make_key`, bounded by estimated bytes; `max_bytes` 0 = off."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._by_version: dict[str, set[tuple]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: tuple) -> Entry | None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
            return e

    def put(self, key: tuple, entry: Entry) -> bool:
        """Store (or replace) an entry; False when it alone is over the cap (nothing stored)."""
        if not self.enabled:
            return False
        # the stream offsets are counted up front (4 bytes a chunk), known yet or not
        seen: set[int] = set()
        entry.nbytes = (deep_size(key, seen) + deep_size(entry, seen) + _ENTRY_OVERHEAD
                        + (0 if entry.offsets is not None else 4 * entry.num_chunks + 64))
        if entry.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._drop(key)
            self._entries[key] = entry
            self._by_version.setdefault(entry.version, set()).add(key)
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
        return True

    def _drop(self, key: tuple) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        self._bytes -= e.nbytes
        keys = self._by_version.get(e.version)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_version[e.version]

    def invalidate(self, version: str) -> int:
        """Drop every entry of a prompt version; returns how many went."""
        with self._lock:
            keys = list(self._by_version.get(version, ()))
            for k in keys:
                self._drop(k)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_version.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "evictions": self.evictions}
