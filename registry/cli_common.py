"""What the registry-touching commands share: the `--db` / `--data-dir` / `--model` flags
(generated from `TaskToolSettings`, one definition, one default; see `registry.settings`), and
how `polyprompt train` / `polyprompt tasks` tell which base model they work on.

The base model is taken from where it is known (`resolve_base_model`): an existing task's
`base_model`, the server's (`GET /health`), or the one base model every task of the registry
shares. An explicit `--model` (or POLYPROMPT_MODEL) still wins, but must name that same model;
with nothing known and no `--model`, the command asks for one. Standard library, SQLAlchemy
and the registry only: no torch, transformers or HTTP stack is imported here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import Registry
from .paths import default_db_url, model_id_for
from .settings import TaskToolSettings, add_flags, from_args

# (hidden, layers, heads) of the public GPT-2 checkpoints, known without the hub
KNOWN_MODELS: dict[str, tuple[int, int, int]] = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
    "distilgpt2": (768, 6, 12),
}
HUB_PREFIXES = ("openai-community/", "distilbert/")  # the hub's new homes of the ids above


class BaseModelError(ValueError):
    """The base model cannot be told, or an explicit one is not the task's (one line for the user)."""


def add_registry_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--db`, `--data-dir`, `--model` (a flag wins over its POLYPROMPT_* variable)."""
    add_flags(parser, TaskToolSettings)
    return parser


def registry_settings(args: argparse.Namespace) -> TaskToolSettings:
    """The parsed flags, with POLYPROMPT_* variables and defaults filled in."""
    return from_args(TaskToolSettings, args)


def resolve_registry_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the parsed `--db` / `--data-dir` / `--model` in place from the variables or defaults
    (`args.model` stays None when neither the flag nor POLYPROMPT_MODEL gives one)."""
    s = registry_settings(args)
    args.db, args.data_dir, args.model = s.db, s.data_dir, s.model
    return args


def open_registry(args) -> Registry:
    """A Registry for the parsed flags (or settings), migrated to head."""
    s = registry_settings(args) if isinstance(args, argparse.Namespace) else args
    reg = Registry(s.db or default_db_url(s.data_dir), s.data_dir)
    reg.upgrade()
    return reg


# -- which base model -------------------------------------------------------------
def canonical_model(model_id: str) -> str:
    """`openai-community/gpt2` -> `gpt2` (the same checkpoint under its old and new hub ids)."""
    for prefix in HUB_PREFIXES:
        if model_id.startswith(prefix) and model_id[len(prefix):] in KNOWN_MODELS:
            return model_id[len(prefix):]
    return model_id


def same_model(a: str, b: str) -> bool:
    return canonical_model(a) == canonical_model(b)


def loadable_model(model_id: str) -> str | None:
    """What `from_pretrained` can load for a recorded base-model id without guessing: a folder of
    that name here (the registry records a local folder by its name), a public GPT-2 id, or an
    `org/name` hub id; None for a bare name that is none of these (a folder elsewhere, which a
    hub lookup would only answer after its retries, and wrongly)."""
    if Path(model_id).is_dir():
        return model_id
    if canonical_model(model_id) in KNOWN_MODELS or ("/" in model_id and not model_id.startswith((".", "/"))):
        return model_id
    return None


def registry_base_models(reg: Registry) -> dict[str, int]:
    """`{base model id: hidden size}` over the registry's tasks (one light query)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from .models import Task

    with Session(reg.engine) as s:
        return {base: hidden for base, hidden in s.execute(select(Task.base_model, Task.hidden_size).distinct())}


def registry_base_model(reg: Registry) -> tuple[str | None, str]:
    """(the one base model the registry's tasks share, "") or (None, why there is none)."""
    models = registry_base_models(reg)
    if len(models) == 1:
        return next(iter(models)), ""
    if not models:
        return None, "the registry has no tasks yet"
    return None, f"the registry's tasks are on several base models: {', '.join(sorted(models))}"


def resolve_base_model(explicit: str | None, known: str | None, *, owner: str, unknown: str = ""
                       ) -> tuple[str | None, str]:
    """(what to load, base model id) for a command on something whose base model is `known`:
    `owner` names it for messages ("task 'x'", "the server at URL"); `unknown` says why nothing
    is known when `known` is None.

    An explicit model (flag or POLYPROMPT_MODEL) wins, but must be the known one: raises
    BaseModelError rather than letting a prompt be made for another model. Without one, the
    known id is used; what to load is then `loadable_model(known)` (None when only its id is
    known). Neither given nor known: BaseModelError asking for --model."""
    if explicit:
        explicit_id = model_id_for(explicit)
        if known is not None and not same_model(explicit_id, known):
            raise BaseModelError(
                f"--model {explicit} is base model {explicit_id!r}, but {owner} is on {known!r}: leave --model "
                f"(and POLYPROMPT_MODEL) out to use {known!r}, or pass a copy of it")
        return explicit, known if known is not None else explicit_id
    if known is None:
        raise BaseModelError(f"no base model is known for {owner}" + (f" ({unknown})" if unknown else "")
                             + "; pass --model (a hub id or a local folder)")
    return loadable_model(known), known


def new_task_base_model(explicit: str | None, reg: Registry, *, name: str) -> tuple[str | None, str, str]:
    """(what to load, base model id, a line for stderr) for a task not yet in `reg`: an explicit
    model wins (the line warns when the registry's tasks are on another one); else the one base
    model every task in the registry is on; else BaseModelError asking for --model."""
    known, why = registry_base_model(reg)
    if explicit:
        base = model_id_for(explicit)
        if known is not None and not same_model(base, known):
            return explicit, base, f"warning: new task {name!r} is on {base!r}, the registry's other tasks on {known!r}"
        return explicit, base, ""
    load, base = resolve_base_model(None, known, owner=f"new task {name!r}", unknown=why)
    return load, base, f"new task {name!r} on base model {base!r}, the one every task in the registry is on"


def unloadable(known: str, owner: str) -> BaseModelError:
    """The error for a known base model that is not here to load."""
    return BaseModelError(f"{owner} is on base model {known!r}, which is not a folder here (nor a hub id); "
                          f"pass --model PATH to a local copy of it")
