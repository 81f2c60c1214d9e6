"""Alembic environment for the polyprompt registry (metadata: registry.models)."""

from __future__ import annotations

import os
import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context

# make `registry` importable when alembic runs from any directory
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from registry.models import Base  # noqa: E402

config = context.config
target_metadata = Base.metadata
_programmatic = "connection" in config.attributes or "url" in config.attributes

if config.config_file_name is not None and not _programmatic:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("POLYPROMPT_DB")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        from registry.paths import DEFAULT_DATA_DIR, default_db_url

        url = default_db_url(os.environ.get("POLYPROMPT_DATA_DIR", DEFAULT_DATA_DIR))
    return url


def _configure(**kw: object) -> None:
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kw)


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live connection (given by the caller, or made from the URL)."""
    conn = config.attributes.get("connection")
    if conn is not None:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
        return
    from registry import make_engine, migration_lock

    engine = make_engine(_url())
    try:  # the `alembic` command: under the lock Registry.upgrade takes (it passes its connection above)
        with engine.connect() as connection, migration_lock(connection):
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
