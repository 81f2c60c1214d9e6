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


def test_0002_chat_template_keeps_data_both_ways(tmp_path):
    """0001 -> head adds tasks.chat_template (NULL for the tasks already there) and keeps every
    task and version; head -> 0001 drops the column in place, and keeps them too (a batch-mode
    table copy would drop `tasks` and, with foreign keys on, cascade into prompt_versions)."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url, tmp_path / "data")
    reg.upgrade("0001_initial")
    with reg.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tasks (id, name, description, num_virtual_tokens, hidden_size, base_model, "
                             "created_at, updated_at) VALUES (1, 'old', 'd', 2, 4, 'gpt2', '2025-01-01 00:00:00', "
                             "'2025-01-01 00:00:00')"))
        conn.execute(sa.text("INSERT INTO prompt_versions (task_id, version, is_active, sha256, path, "
                             "num_virtual_tokens, hidden_size, base_model, source, meta, created_at) VALUES "
                             "(1, 1, 1, :sha, 'p', 2, 4, 'gpt2', 'init', '{}', '2025-01-01 00:00:00')"),
                     {"sha": "a" * 64})
    reg.upgrade()
    t = reg.get_task("old")
    assert (t["description"], t["active_version"], t["sha256"], t["chat_template"]) == ("d", 1, "a" * 64, None)
    reg.update_task("old", chat_template="{{ messages[0]['content'] }}")

    def rows():
        with reg.engine.connect() as conn:
            return (conn.execute(sa.text("SELECT name FROM tasks")).scalars().all(),
                    conn.execute(sa.text("SELECT task_id, version, sha256 FROM prompt_versions")).all())

    kept = rows()
    assert kept == (["old"], [(1, 1, "a" * 64)])
    command.downgrade(alembic_config(url), "0001_initial")
    assert "chat_template" not in {c["name"] for c in sa.inspect(reg.engine).get_columns("tasks")}
    assert rows() == kept
    with reg.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0001_initial"
    reg.upgrade()
    assert rows() == kept and reg.get_task("old")["chat_template"] is None
    assert _drift(reg.engine, Base.metadata) == []
    reg.close()
