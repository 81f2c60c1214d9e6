"""The Alembic migrations and the SQLAlchemy models describe the same schema.

The models (registry/models.py) are what the code reads and writes; the migrations
(alembic/versions) are what a database actually gets. A column added to a model without a
migration works in tests that build tables from the models and fails on every real
database, so the schema `alembic upgrade head` builds is compared with the models'
metadata by Alembic's own autogenerate comparison: any difference it would write into a
new migration is a failure here. Each test runs on SQLite and on PostgreSQL (`db_url`), and so
does the check that servers opening one empty database at the same moment migrate it once.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command
from registry import Registry, alembic_config, migration_lock
from registry.models import Base

# the same comparison options alembic/env.py gives autogenerate
COMPARE = {"compare_type": True, "render_as_batch": True}


def _drift(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts=COMPARE), metadata)


@pytest.fixture
def upgraded(db_url, tmp_path):
    """A fresh database (SQLite file, PostgreSQL) at `alembic upgrade head`, through the registry's own upgrade."""
    reg = Registry(db_url, tmp_path / "data")
    reg.upgrade()
    yield reg
    reg.close()



def _insert_task_v1(conn, name: str, description: str, sha: str, path: str, source: str) -> None:
    """Task 1 with an active version 1 (2 x 4), written with SQL as an older schema holds it."""
    conn.execute(sa.text("INSERT INTO tasks (id, name, description, num_virtual_tokens, hidden_size, base_model, "
                         "created_at, updated_at) VALUES (1, :n, :d, 2, 4, 'gpt2', '2025-01-01 00:00:00', "
                         "'2025-01-01 00:00:00')"), {"n": name, "d": description})
    conn.execute(sa.text("INSERT INTO prompt_versions (task_id, version, is_active, sha256, path, "
                         "num_virtual_tokens, hidden_size, base_model, source, meta, created_at) VALUES "
                         "(1, 1, :a, :s, :p, 2, 4, 'gpt2', :src, '{}', '2025-01-01 00:00:00')"),
                 {"a": True, "s": sha, "p": path, "src": source})

def test_one_head():
    """Migrations form one line: two heads would leave `upgrade head` ambiguous."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, heads


def test_head_matches_the_models(upgraded):
    drift = _drift(upgraded.engine, Base.metadata)
    assert drift == [], "the models and alembic head differ; write a migration for:\n" + "\n".join(map(str, drift))


def test_partial_unique_index_has_its_where_clause(upgraded):
    """Autogenerate does not compare an index's WHERE clause, and without it the index would
    allow one version per task instead of one *active* version: read it from the database."""
    with upgraded.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                       "AND name = 'uq_prompt_versions_one_active'")).scalar_one()
        else:
            sql = conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = "
                                       "'uq_prompt_versions_one_active'")).scalar_one()
    assert "UNIQUE" in sql.upper() and sql.split("WHERE", 1)[1].strip() in ("is_active", "is_active)"), sql


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


def test_0002_chat_template_keeps_data_both_ways(db_url, tmp_path):
    """0001 -> head adds tasks.chat_template (NULL for the tasks already there) and keeps every
    task and version; head -> 0001 drops the column in place, and keeps them too (a batch-mode
    table copy would drop `tasks` and, with foreign keys on, cascade into prompt_versions)."""
    url = db_url
    reg = Registry(url, tmp_path / "data")
    reg.upgrade("0001_initial")
    with reg.engine.begin() as conn:
        _insert_task_v1(conn, "old", "d", "a" * 64, "p", "init")
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


# ------------------------------------------------------------------ replicas opening one empty database

_OPENER = """
import logging, sys
from registry import Registry
runs = []
class Count(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Running upgrade"):
            runs.append(record.getMessage())
log = logging.getLogger("alembic.runtime.migration")
log.setLevel(logging.INFO)
log.addHandler(Count())
reg = Registry(sys.argv[1], sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # all start together
reg.upgrade()
reg.create_task(sys.argv[3], num_virtual_tokens=1, hidden_size=4, base_model="gpt2")
print("migrations run:", len(runs), flush=True)
reg.close()
"""


def test_replicas_opening_one_empty_database_at_once_migrate_it_once(db_url, tmp_path):
    """Three processes (three servers starting together) open the registry on one empty database at
    the same moment: all come up and can write, the schema is at head, and the migrations ran
    once, in one of them (the migration lock: an advisory lock on PostgreSQL, the write lock on
    SQLite; without it they race to create the same tables and all but one fail)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, db_url, str(tmp_path / "data"), f"replica-{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for i in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:  # all at once: every one is waiting on its stdin
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    scripts = ScriptDirectory.from_config(alembic_config())
    runs = [int(out.rsplit("migrations run:", 1)[1]) for out, _ in outs]
    assert sorted(runs) == [0, 0, len(list(scripts.walk_revisions()))], runs  # one ran them all, once
    heads = scripts.get_heads()
    reg = Registry(db_url, tmp_path / "data")
    with reg.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == heads
        assert conn.execute(sa.text("SELECT id FROM registry_state")).scalars().all() == [1]
    assert [t["name"] for t in reg.list_tasks()] == ["replica-0", "replica-1", "replica-2"]
    assert reg.generation() == 3 and _drift(reg.engine, Base.metadata) == []
    reg.close()


def test_upgrade_waits_for_the_migration_lock(db_url, tmp_path):
    """The lock is real: while another connection holds it, `upgrade` waits (the database stays
    empty); released, the upgrade runs."""
    reg = Registry(db_url, tmp_path / "data")
    holder = Registry(db_url, tmp_path / "data")
    th = threading.Thread(target=reg.upgrade)
    with holder.engine.connect() as conn, migration_lock(conn):
        th.start()
        time.sleep(0.5)
        assert th.is_alive(), "upgrade did not wait for the lock"
        assert "alembic_version" not in sa.inspect(holder.engine).get_table_names()
        conn.rollback()  # SQLite: the lock is the open write transaction
    th.join(60)
    assert not th.is_alive()
    assert reg.list_tasks() == [] and reg.generation() == 0
    holder.close()
    reg.close()


def test_0003_imports_the_prompt_files_into_the_database(db_url, tmp_path, caplog):
    """A registry at revision 0002 (prompts only as files in its data folder) upgraded to head: every
    intact file a version references becomes a blob; a missing and a corrupt one are skipped with a
    warning naming their tasks and versions (the rows stay, served from an intact local file only).
    Then a replica with an empty data folder serves the imported ones. Downgrade drops the table and
    leaves the files."""
    import torch

    from registry.errors import IntegrityError
    from registry.files import write_prompt_file

    data = tmp_path / "data"
    reg = Registry(db_url, data)
    reg.upgrade("0002_task_chat_template")
    prompts = [torch.randn(2 + i, 4) for i in range(4)]
    files = [write_prompt_file(data, e) for e in prompts]  # (sha, relpath)
    rows = [("a", 1, 0), ("a", 2, 1), ("b", 1, 0), ("c", 1, 2), ("d", 1, 3)]  # (task, version, prompt)
    with reg.engine.begin() as conn:
        for i, name in enumerate("abcd", 1):
            conn.execute(sa.text("INSERT INTO tasks (id, name, description, num_virtual_tokens, hidden_size, "
                                 "base_model, created_at, updated_at) VALUES (:id, :n, '', 2, 4, 'gpt2', "
                                 "'2025-01-01 00:00:00', '2025-01-01 00:00:00')"), {"id": i, "n": name})
        for name, version, p in rows:
            conn.execute(sa.text("INSERT INTO prompt_versions (task_id, version, is_active, sha256, path, "
                                 "num_virtual_tokens, hidden_size, base_model, source, meta, created_at) VALUES "
                                 "(:t, :v, :a, :s, :p, :n, 4, 'gpt2', 'x', '{}', '2025-01-01 00:00:00')"),
                         {"t": "abcd".index(name) + 1, "v": version, "a": version == 1, "s": files[p][0],
                          "p": files[p][1], "n": 2 + p})
    (data / files[2][1]).unlink()  # task c's prompt: missing
    corrupt = data / files[3][1]
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"!")  # task d's: corrupt
    caplog.set_level(logging.INFO, logger="alembic.runtime.migration")
    reg.upgrade()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 prompt file(s) missing or corrupt" in warnings[0], warnings
    assert "c v1" in warnings[0] and "d v1" in warnings[0] and "a v1" not in warnings[0]
    assert reg.blob_shas() == {files[0][0], files[1][0]}
    with reg.engine.connect() as conn:
        for sha, blob, size in conn.execute(sa.text("SELECT sha256, data, size FROM prompt_blobs")):
            assert hashlib.sha256(bytes(blob)).hexdigest() == sha and size == len(blob)
    assert _drift(reg.engine, Base.metadata) == []
    replica = Registry(db_url, tmp_path / "replica")
    for name, version, p in rows:
        sha = files[p][0]
        if p < 2:
            assert torch.equal(replica.load_prompt(sha), prompts[p]), (name, version)
        else:
            with pytest.raises(IntegrityError, match="not in the database"):
                replica.load_prompt(sha)
    assert len(replica.get_task("c")["versions"]) == 1  # the rows stay
    replica.close()
    command.downgrade(alembic_config(db_url), "0002_task_chat_template")
    assert "prompt_blobs" not in sa.inspect(reg.engine).get_table_names()
    assert (data / files[0][1]).is_file() and (data / files[1][1]).is_file()
    reg.upgrade()  # imports again
    assert reg.blob_shas() == {files[0][0], files[1][0]}
    reg.close()


def test_0003_takes_the_data_folder_from_the_alembic_command_line(db_url, tmp_path, caplog, monkeypatch):
    """`alembic -x data_dir=...` (no Registry around it) finds the files too; without any data
    folder (a PostgreSQL URL, no variable) nothing is imported, with a warning saying so."""
    import torch

    from registry.files import write_prompt_file

    data = tmp_path / "elsewhere"
    reg = Registry(db_url, tmp_path / "unused")
    reg.upgrade("0002_task_chat_template")
    sha, rel = write_prompt_file(data, torch.randn(2, 4))
    with reg.engine.begin() as conn:
        _insert_task_v1(conn, "x", "", sha, rel, "x")
    caplog.set_level(logging.INFO, logger="alembic.runtime.migration")
    cfg = alembic_config(db_url)
    if db_url.startswith("postgresql"):  # no data folder anywhere: a warning, nothing imported
        monkeypatch.delenv("POLYPROMPT_DATA_DIR", raising=False)
        command.upgrade(cfg, "head")
        assert any("no data folder given" in r.getMessage() for r in caplog.records)
        assert reg.blob_shas() == set()
        command.downgrade(alembic_config(db_url), "0002_task_chat_template")
    cfg = alembic_config(db_url)
    cfg.cmd_opts = argparse.Namespace(x=[f"data_dir={data}"])
    command.upgrade(cfg, "head")
    assert reg.blob_shas() == {sha}
    reg.close()
