"""PostgreSQL for the tests, for real: `POLYPROMPT_TEST_PG_URL` (`.ci/run` sets it up) names a
database on a server whose role may CREATE DATABASE. Each test (or test module) that asks for
PostgreSQL gets a fresh, empty, uniquely named database made through that URL, dropped after it.
Without the variable those tests skip, with a reason that names it (and the run's summary says
how many skipped), never silently. The fixtures are in tests/conftest.py."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ENV = "POLYPROMPT_TEST_PG_URL"
SKIP_REASON = (f"{ENV} is not set: PostgreSQL tests SKIPPED (.ci/run sets up a server; or export "
               f"{ENV}=postgresql+psycopg://USER:PASS@127.0.0.1:PORT/DB, a role with CREATEDB)")
BACKENDS = ["sqlite", "postgresql"]


def admin_url() -> str | None:
    """The configured PostgreSQL URL, or None."""
    return os.environ.get(ENV) or None


def require() -> str:
    """The configured URL; skips the calling test (loudly, naming ENV) without one."""
    url = admin_url()
    if url is None:
        pytest.skip(SKIP_REASON)
    return url


def _autocommit(url: str, poolclass):
    """An AUTOCOMMIT engine (CREATE/DROP DATABASE run outside a transaction) for `url`, with the
    driver the project's own `make_engine` picks (a plain postgresql:// -> psycopg 3)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from registry import make_engine

    driver = make_engine(url).url.drivername
    return create_engine(make_url(url).set(drivername=driver), poolclass=poolclass, isolation_level="AUTOCOMMIT")


@contextmanager
def fresh_database(tag: str = "t") -> Iterator[str]:
    """A new empty database on the configured server, its URL (password included) for the block;
    dropped after it, connections still open to it ended (`WITH (FORCE)`). Skips without ENV."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = require()
    name = ("pp_" + re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_"))[:40] + "_" + uuid.uuid4().hex[:12]
    admin = _autocommit(url, NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
