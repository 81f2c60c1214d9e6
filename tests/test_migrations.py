"""The Alembic migrations and the SQLAlchemy models describe the same schema.

The models (registry/models.py) are what the code reads and writes; the migrations
(alembic/versions) are what a database actually gets. A column added to a model without a
migration works in tests that build tables from the models and fails on every real
database, so the schema `alembic upgrade head` builds is compared with the models'
metadata by Alembic's own autogenerate comparison: any difference it would write into a
new migration is a failure here.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command
from registry import Registry, alembic_config
from registry.models import Base

# the same comparison options alembic/env.py gives autogenerate
COMPARE = {"compare_type": True, "render_as_batch": True}


def _drift(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts=COMPARE), metadata)


@pytest.fixture
def upgraded(tmp_path):
    """A file SQLite database at `alembic upgrade head`, through the registry's own upgrade."""
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "data")
    reg.upgrade()
    yield reg
    reg.close()


def test_one_head():
    """Migrations form one line: two heads would leave `upgrade head` ambiguous."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, heads


def test_head_matches_the_models(upgraded):
    drift = _drift(upgraded.engine, Base.metadata)
    assert drift == [], "the models and alembic head differ; write a migration for:\n" + "\n".join(map(str, drift))


def test_partial_unique_index_has_its_where_clause(upgraded):
    """Autogenerate does not compare an index's WHERE clause, and without it the index would
    allow one version per task instead of one *active* version: read it from SQLite."""
    with upgraded.engine.connect() as conn:
        sql = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                   "AND name = 'uq_prompt_versions_one_active'")).scalar_one()
    assert "UNIQUE" in sql.upper() and sql.split("WHERE", 1)[1].strip() == "is_active", sql


def test_downgrade_then_upgrade_gives_the_same_schema(upgraded):
    command.downgrade(alembic_config(upgraded.db_url), "base")
    assert set(sa.inspect(upgraded.engine).get_table_names()) <= {"alembic_version"}
    upgraded.upgrade()
    assert _drift(upgraded.engine, Base.metadata) == []


def test_the_comparison_sees_a_drift(upgraded):
    """The check is not vacuous: models with one more column, one index fewer and a wider
    string each differ from the migrated database."""
    models = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(models)
    tasks, versions = models.tables["tasks"], models.tables["prompt_versions"]
    tasks.append_column(sa.Column("owner", sa.String(64), nullable=True))
    versions.indexes.remove(next(ix for ix in versions.indexes if ix.name == "ix_prompt_versions_sha256"))
    tasks.c.base_model.type = sa.String(512)
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in _drift(upgraded.engine, models)}
    assert kinds == {"add_column", "remove_index", "modify_type"}, kinds
