"""One configuration source: a setting is a pydantic-settings field (its name, type, default
and help), and its command-line flag and POLYPROMPT_* variable are generated from it.

`polyprompt serve` (`server.settings.Settings`), `polyprompt train`
(`training.train.TrainSettings`) and `polyprompt tasks` all extend `RegistrySettings`, so
`--db` / `--data-dir` / `--model` are one definition everywhere (`train` and `tasks` through
`TaskToolSettings`, whose `--model` defaults to the task's own base model instead of `gpt2`).
A flag wins over its variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .paths import DEFAULT_DATA_DIR, DEFAULT_MODEL

ENV_PREFIX = "POLYPROMPT_"
S = TypeVar("S", bound=BaseSettings)


ENV_ONLY = {"env_only": True}  # `json_schema_extra` of a setting without a flag (keys would show in `ps`)


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="hub id (gpt2, gpt2-medium, distilgpt2) or a local "
                                                   "save_pretrained folder")
    db: str | None = Field(None, description="SQLAlchemy URL (default: a SQLite file in the data dir)")
    data_dir: str = Field(DEFAULT_DATA_DIR, description="where soft-prompt files live")


class TaskToolSettings(RegistrySettings):
    """The shared settings of the commands that work on existing tasks (`polyprompt train`,
    `polyprompt tasks`): the same `--db` / `--data-dir` / `--model`, but `--model` has no default:
    left out, the base model is the one the task (or the server, or the registry) is on, so a
    prompt is never trained or registered for a model nobody asked for."""

    model: str | None = Field(None, description="base model: hub id or local save_pretrained folder (default: "
                                                "the task's base model, else the server's or the registry's)")


def _flag_type(annotation: Any) -> tuple[Any, tuple | None]:
    """(argparse type, choices) of a field annotation such as `int`, `str | None`, a Literal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, typing.get_args(annotation)
    return annotation, None


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings], *, skip: tuple[str, ...] = ()) -> None:
    """A flag for every field of `cls` (`max_batch_size` -> `--max-batch-size`), with its type,
    choices and help; booleans get `--x/--no-x`. Defaults stay None, so that `from_args` can
    tell a flag given from one left to the variable or the field's default."""
    for name, field in cls.model_fields.items():
        if name in skip or (field.json_schema_extra or {}).get("env_only"):
            continue
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        default = "required" if field.is_required() else f"default {field.default}"
        help_ = f"{field.description or ''} [env {env}; {default}]".replace("%", "%%")
        typ, choices = _flag_type(field.annotation)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=typ, choices=choices, default=None, help=help_)


def from_args(cls: type[S], args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> S:
    """The settings: the flags given, else the POLYPROMPT_* variables, else the defaults. A
    bad or missing value is a usage error (exit 2) through `parser` when given."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    try:
        return cls(**given)
    except ValidationError as e:
        msg = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors())
        if parser is None:
            raise ValueError(msg) from None
        parser.error(msg)
        raise  # unreachable: parser.error exits
