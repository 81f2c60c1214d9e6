"""Training data: JSON Lines loading, validation with line numbers, tokenization.

One object a line: ``{"prompt": "...", "completion": "..."}``. Blank lines are
ignored; extra keys are ignored. Every problem is reported with its 1-based line
number so the user can fix the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """The training data is malformed. `errors` lists one message per bad line."""

    def __init__(self, path: str | Path, errors: list[str]):
        self.path = str(path)
        self.errors = errors
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        lines = [f"{self.path}: {e}" for e in shown]
        if more > 0:
            lines.append(f"{self.path}: ... and {more} more error(s)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in the source file
    prompt: str
    completion: str


@dataclass(frozen=True)
class Tokenized:
    line: int
    input_ids: tuple[int, ...]  # prompt ids + completion ids (+ EOS)
    prompt_len: int  # the first prompt_len positions carry no loss

    @property
    def num_label_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def load_jsonl(path: str | Path) -> list[Example]:
    """Parse and validate `path`; raises `DataError` listing every bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, [f"cannot read the file: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, [f"line {line}: not valid UTF-8"]) from None
    examples: list[Example] = []
    errors: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {lineno}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {lineno}: expected a JSON object with \"prompt\" and \"completion\", "
                          f"got {type(obj).__name__}")
            continue
        bad = False
        for field in ("prompt", "completion"):
            if field not in obj:
                errors.append(f"line {lineno}: missing field \"{field}\"")
                bad = True
            elif not isinstance(obj[field], str):
                errors.append(f"line {lineno}: field \"{field}\" must be a string, "
                              f"got {type(obj[field]).__name__}")
                bad = True
        if bad:
            continue
        if obj["completion"] == "":
            errors.append(f"line {lineno}: empty completion (the loss covers the completion only)")
            continue
        examples.append(Example(lineno, obj["prompt"], obj["completion"]))
    if errors:
        raise DataError(path, errors)
    if not examples:
        raise DataError(path, ["no examples (the file is empty)"])
    return examples


def tokenize(
    examples: list[Example],
    tokenizer,
    *,
    path: str | Path,
    num_virtual_tokens: int,
    context: int,
    max_length: int | None = None,
    add_eos: bool = True,
    skip_long: bool = False,
) -> tuple[list[Tokenized], int]:
    """Tokenize prompt and completion separately (as the server sees them).

    Returns `(tokenized, skipped)`. An example whose tokens plus the virtual tokens
    exceed the context (or whose tokens exceed `max_length`) raises `DataError`
    naming its line, or is skipped and counted when `skip_long`.
    """
    limit = context - num_virtual_tokens
    if max_length is not None:
        limit = min(limit, max_length)
    if limit <= 0:
        raise DataError(path, [f"{num_virtual_tokens} virtual tokens leave no room in the "
                               f"{context}-token context"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError(path, ["the tokenizer has no EOS token; pass --no-eos"])
    out: list[Tokenized] = []
    errors: list[str] = []
    skipped = 0
    for ex in examples:
        p = list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) if ex.prompt else []
        c = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
        if add_eos:
            c.append(eos)
        n = len(p) + len(c)
        if n > limit:
            if skip_long:
                skipped += 1
                continue
            why = (f"{n} tokens ({len(p)} prompt + {len(c)} completion) + {num_virtual_tokens} virtual = "
                   f"{n + num_virtual_tokens} > {context} context") if n + num_virtual_tokens > context else \
                  f"{n} tokens ({len(p)} prompt + {len(c)} completion) > --max-length {max_length}"
            errors.append(f"line {ex.line}: example too long: {why}; shorten it by {n - limit} tokens "
                          "or pass --skip-long")
            continue
        out.append(Tokenized(ex.line, tuple(p + c), len(p)))
    if errors:
        raise DataError(path, errors)
    if not out:
        raise DataError(path, [f"all {skipped} examples are too long for the context (skipped)"])
    return out, skipped
