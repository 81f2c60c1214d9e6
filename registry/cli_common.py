"""Shared `--db` / `--data-dir` / `--model` flags for every registry-touching command."""

from __future__ import annotations

import argparse
import os

from . import Registry
from .paths import DEFAULT_DATA_DIR, DEFAULT_MODEL, default_db_url


def add_registry_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--db`, `--data-dir`, `--model` (a flag wins over its POLYPROMPT_* variable)."""
    parser.add_argument(
        "--db",
        default=os.environ.get("POLYPROMPT_DB") or None,
        help="SQLAlchemy URL [env POLYPROMPT_DB; default: SQLite file in the data dir]",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("POLYPROMPT_DATA_DIR") or DEFAULT_DATA_DIR,
        help=f"folder for soft-prompt files [env POLYPROMPT_DATA_DIR; default {DEFAULT_DATA_DIR}]",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("POLYPROMPT_MODEL") or DEFAULT_MODEL,
        help=f"hub id or local save_pretrained folder [env POLYPROMPT_MODEL; default {DEFAULT_MODEL}]",
    )
    return parser


def db_url_from_args(args: argparse.Namespace) -> str:
    """`--db`, else the SQLite file inside `--data-dir`."""
    return args.db or default_db_url(args.data_dir)


def open_registry(args: argparse.Namespace) -> Registry:
    """A Registry for the parsed flags, migrated to head."""
    reg = Registry(db_url_from_args(args), args.data_dir)
    reg.upgrade()
    return reg
