"""The `--db` / `--data-dir` / `--model` flags of every registry-touching command, generated
from `RegistrySettings` (one definition, one default; see `registry.settings`)."""

from __future__ import annotations

import argparse

from . import Registry
from .paths import default_db_url
from .settings import RegistrySettings, add_flags, from_args


def add_registry_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--db`, `--data-dir`, `--model` (a flag wins over its POLYPROMPT_* variable)."""
    add_flags(parser, RegistrySettings)
    return parser


def registry_settings(args: argparse.Namespace) -> RegistrySettings:
    """The parsed flags, with POLYPROMPT_* variables and defaults filled in."""
    return from_args(RegistrySettings, args)


def resolve_registry_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the parsed `--db` / `--data-dir` / `--model` in place from the variables or defaults."""
    s = registry_settings(args)
    args.db, args.data_dir, args.model = s.db, s.data_dir, s.model
    return args


def open_registry(args) -> Registry:
    """A Registry for the parsed flags (or settings), migrated to head."""
    s = registry_settings(args) if isinstance(args, argparse.Namespace) else args
    reg = Registry(s.db or default_db_url(s.data_dir), s.data_dir)
    reg.upgrade()
    return reg
