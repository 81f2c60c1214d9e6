"""Registry: alembic schema, CRUD, versions, generation, content-addressed files. The database
tests run on SQLite and on PostgreSQL (`db_url`, tests/conftest.py: a fresh database each)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import inspect, text

from alembic import command
from registry import (
    InvalidName,
    InvalidPrompt,
    Registry,
    TaskExists,
    TaskNotFound,
    VersionNotFound,
    alembic_config,
    make_engine,
)
from registry.errors import IntegrityError
from registry.files import read_prompt_file, write_prompt_file
from registry.paths import default_db_url, model_id_for
from tests import pg


@pytest.fixture()
def reg(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    r = Registry(db_url, tmp_path / "data")
    r.upgrade()
    yield r
    r.close()


def _tables(url: str) -> set[str]:
    eng = make_engine(url)
    try:
        return set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_upgrade_head_creates_schema(db_url: str, tmp_path: Path) -> None:
    url = db_url
    r = Registry(url, tmp_path / "data")
    r.upgrade()
    assert {"tasks", "prompt_versions", "registry_state", "alembic_version"} <= _tables(url)
    eng = make_engine(url)
    with eng.connect() as c:
        assert c.execute(text("SELECT id, generation FROM registry_state")).all() == [(1, 0)]
        cols = {col["name"] for col in inspect(c).get_columns("prompt_versions")}
        fks = inspect(c).get_foreign_keys("prompt_versions")
    eng.dispose()
    assert {"task_id", "version", "is_active", "sha256", "path", "num_virtual_tokens",
            "hidden_size", "base_model", "source", "meta", "created_at"} <= cols
    assert fks[0]["referred_table"] == "tasks" and fks[0]["options"].get("ondelete") == "CASCADE"
    r.upgrade()  # idempotent
    assert r.generation() == 0
    r.close()


def test_downgrade_then_upgrade(db_url: str, tmp_path: Path) -> None:
    url = db_url
    r = Registry(url, tmp_path / "data")
    r.upgrade()
    r.create_task("t", num_virtual_tokens=2, hidden_size=4, base_model="gpt2")
    r.close()
    command.downgrade(alembic_config(url), "base")
    assert _tables(url) <= {"alembic_version"}
    r = Registry(url, tmp_path / "data")
    r.upgrade()
    assert r.list_tasks() == [] and r.generation() == 0
    r.close()


def test_create_get_list_delete(reg: Registry) -> None:
    t = reg.create_task("beta", description="d", num_virtual_tokens=3, hidden_size=8, base_model="gpt2")
    assert t["name"] == "beta" and t["active_version"] is None and t["versions"] == []
    assert t["sha256"] is None and t["created_at"].endswith("+00:00")
    reg.create_task("alpha", num_virtual_tokens=3, hidden_size=8, base_model="gpt2")
    assert [x["name"] for x in reg.list_tasks()] == ["alpha", "beta"]
    assert reg.get_task("beta")["description"] == "d"
    with pytest.raises(TaskExists):
        reg.create_task("beta", num_virtual_tokens=3, hidden_size=8, base_model="gpt2")
    for bad in ["", "Upper", "-x", ".x", "a/b", "../etc", "a" * 65, "x\n", "sp ace"]:
        with pytest.raises(InvalidName):
            reg.create_task(bad, num_virtual_tokens=3, hidden_size=8, base_model="gpt2")
    reg.create_task("a" * 64, num_virtual_tokens=1, hidden_size=8, base_model="gpt2")
    reg.delete_task("beta")
    with pytest.raises(TaskNotFound):
        reg.get_task("beta")
    with pytest.raises(TaskNotFound):
        reg.delete_task("beta")
    assert isinstance(TaskNotFound("x"), LookupError)


def test_versions_activate_and_generation(reg: Registry) -> None:
    g0 = reg.generation()
    reg.create_task("t", num_virtual_tokens=3, hidden_size=8, base_model="gpt2")
    assert reg.generation() == g0 + 1
    e1, e2 = torch.randn(3, 8), torch.randn(5, 8)
    v1 = reg.add_version("t", e1, source="init", meta={"k": 1})
    assert v1["version"] == 1 and v1["is_active"] and v1["meta"] == {"k": 1}
    assert reg.generation() == g0 + 2
    v2 = reg.add_version("t", e2, source="train", activate=False, base_model="other")
    assert v2["version"] == 2 and not v2["is_active"] and v2["base_model"] == "other"
    t = reg.get_task("t")
    assert t["active_version"] == 1 and t["num_virtual_tokens"] == 3 and t["sha256"] == v1["sha256"]
    reg.activate_version("t", 2)
    t = reg.get_task("t")
    assert t["active_version"] == 2 and t["num_virtual_tokens"] == 5
    assert [v["is_active"] for v in t["versions"]] == [False, True]
    assert torch.equal(reg.load_prompt(t["sha256"]), e2)
    assert reg.generation() == g0 + 4
    v3 = reg.add_version("t", e1, source="upload")  # same content: same file, new version
    assert v3["version"] == 3 and v3["sha256"] == v1["sha256"] and v3["path"] == v1["path"]
    assert sum(v["is_active"] for v in reg.get_task("t")["versions"]) == 1
    with pytest.raises(VersionNotFound):
        reg.activate_version("t", 9)
    with pytest.raises(TaskNotFound):
        reg.add_version("nope", e1, source="x")
    with pytest.raises(InvalidPrompt):
        reg.add_version("t", torch.randn(3, 7), source="x")
    with pytest.raises(InvalidPrompt):
        reg.add_version("t", torch.randn(3), source="x")
    g = reg.generation()
    assert g == g0 + 5  # failed mutations do not bump
    snap = reg.snapshot()
    assert set(snap) == {"t"} and snap["t"]["active_version"] == 3
    reg.delete_task("t")
    assert reg.generation() == g + 1 and reg.snapshot() == {}
    assert (reg.data_dir / v1["path"]).is_file()  # files are left in place


def test_first_version_always_active(reg: Registry) -> None:
    reg.create_task("t", num_virtual_tokens=2, hidden_size=4, base_model="gpt2")
    v = reg.add_version("t", torch.randn(2, 4), source="x", activate=False)
    assert v["is_active"] and reg.get_task("t")["active_version"] == 1


def test_content_addressed_atomic_file(tmp_path: Path) -> None:
    e = torch.randn(4, 6, dtype=torch.float64)
    sha, rel = write_prompt_file(tmp_path, e)
    path = tmp_path / rel
    assert rel == f"prompts/{sha[:2]}/{sha}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert write_prompt_file(tmp_path, e.float()) == (sha, rel)  # idempotent, canonical float32
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    back = read_prompt_file(tmp_path, sha)
    assert back.dtype == torch.float32 and back.is_contiguous() and torch.equal(back, e.float())
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="corrupt"):
        read_prompt_file(tmp_path, sha)
    write_prompt_file(tmp_path, e)  # repairs a corrupt file
    assert torch.equal(read_prompt_file(tmp_path, sha), e.float())
    with pytest.raises(ValueError):
        read_prompt_file(tmp_path, "../../etc/passwd")
    with pytest.raises(IntegrityError, match="missing"):
        read_prompt_file(tmp_path, "0" * 64)


def test_default_url_is_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    r = Registry(default_db_url(tmp_path / "d"), tmp_path / "d")
    r.upgrade()
    r.create_task("x", num_virtual_tokens=1, hidden_size=4, base_model="gpt2")
    assert r.engine.dialect.name == "sqlite" and Path(r.engine.url.database).parent == (tmp_path / "d").resolve()
    r.close()


def test_persists_across_instances(db_url: str, tmp_path: Path) -> None:
    url, data = db_url, tmp_path / "d"
    r1 = Registry(url, data)
    r1.upgrade()
    r1.create_task("keep", num_virtual_tokens=2, hidden_size=4, base_model="gpt2")
    e = torch.randn(2, 4)
    r1.add_version("keep", e, source="x")
    gen = r1.generation()
    r1.close()
    r2 = Registry(url, data)
    r2.upgrade()
    t = r2.get_task("keep")
    assert t["active_version"] == 1 and r2.generation() == gen
    assert torch.equal(r2.load_prompt(t["sha256"]), e)
    r2.close()


def test_concurrent_add_version(reg: Registry) -> None:
    reg.create_task("c", num_virtual_tokens=2, hidden_size=4, base_model="gpt2")
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                reg.add_version("c", torch.full((2, 4), float(i)), source="x")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    versions = reg.get_task("c")["versions"]
    assert [v["version"] for v in versions] == list(range(1, 21))
    assert sum(v["is_active"] for v in versions) == 1


def test_model_id_for(tmp_path: Path) -> None:
    (tmp_path / "my-model").mkdir()
    assert model_id_for(str(tmp_path / "my-model")) == "my-model"
    assert model_id_for("gpt2") == "gpt2"


# ------------------------------------------------------------------ PostgreSQL URLs, racing writers

def test_plain_postgresql_url_uses_psycopg() -> None:
    """`postgresql://` (and Heroku's `postgres://`) get psycopg 3, the driver the project depends
    on, not SQLAlchemy's default psycopg2; an explicit driver is kept. No server needed."""
    for given in ("postgresql://u:secret@127.0.0.1:5/db", "postgres://u:secret@127.0.0.1:5/db",
                  "postgresql+psycopg://u:secret@127.0.0.1:5/db"):
        eng = make_engine(given)
        assert (eng.url.drivername, eng.dialect.driver) == ("postgresql+psycopg", "psycopg"), given
        assert (eng.url.database, eng.url.password) == ("db", "secret")
        eng.dispose()


def test_plain_postgresql_url_against_the_server(tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    with pg.fresh_database("plain-url") as url:
        plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        assert plain.startswith("postgresql://")
        r = Registry(plain, tmp_path / "data")
        r.upgrade()
        r.create_task("p", base_model="gpt2", embeddings=torch.randn(2, 4))
        assert r.get_task("p")["active_version"] == 1 and r.engine.dialect.driver == "psycopg"
        r.close()


def _outcome(fn) -> object:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- the test inspects what was raised
        return e


def test_duplicate_insert_racing_past_the_checks_is_task_exists(reg: Registry) -> None:
    """Another writer has inserted the name in a transaction still open when `create_task` runs, so
    no check can see it yet; when it commits, the insert trips the unique name, and the caller gets
    TaskExists (what the API answers 409 for), not the database's IntegrityError (a 500). On
    PostgreSQL `create_task` is seen waiting on that row's lock, past every check; on SQLite it waits
    for the write lock up front and then finds the name taken."""
    other = make_engine(reg.db_url)
    conn = other.connect()
    conn.execute(text("INSERT INTO tasks (name, description, num_virtual_tokens, hidden_size, base_model, "
                      "created_at, updated_at) VALUES ('race', '', 2, 4, 'gpt2', '2025-01-01 00:00:00', "
                      "'2025-01-01 00:00:00')"))
    g = reg.generation()
    box: dict[str, object] = {}
    th = threading.Thread(target=lambda: box.setdefault("r", _outcome(lambda: reg.create_task(
        "race", base_model="gpt2", embeddings=torch.randn(2, 4)))))
    th.start()
    if reg.engine.dialect.name == "postgresql":
        deadline, waiting = time.monotonic() + 20, 0
        while waiting == 0 and time.monotonic() < deadline:
            with reg.engine.connect() as c:
                waiting = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                         "AND wait_event_type = 'Lock'")).scalar_one()
            time.sleep(0.02)
        assert waiting == 1, "create_task never waited on the uncommitted row"
    else:
        time.sleep(0.3)
        assert th.is_alive(), "create_task did not wait for the other writer"
    conn.commit()
    conn.close()
    other.dispose()
    th.join(60)
    assert isinstance(box["r"], TaskExists), box["r"]
    assert "race" in str(box["r"]) and reg.generation() == g
    assert [t["name"] for t in reg.list_tasks()] == ["race"]
    reg.create_task("after", num_virtual_tokens=1, hidden_size=4, base_model="gpt2")  # still usable


def test_concurrent_duplicate_create_from_two_registries(reg: Registry) -> None:
    """Two registries (two replicas) on one database create the same names at the same moment:
    for each name exactly one succeeds and the other gets TaskExists, nothing else."""
    twin = Registry(reg.db_url, reg.data_dir)
    names = [f"dup-{i}" for i in range(8)]
    results: dict[int, list[object]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(i: int, r: Registry) -> None:
        for name in names:
            barrier.wait(30)
            results[i].append(_outcome(lambda: r.create_task(name, base_model="gpt2", embeddings=torch.randn(2, 4))))

    threads = [threading.Thread(target=worker, args=(i, r)) for i, r in enumerate((reg, twin))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    twin.close()
    for k, name in enumerate(names):
        pair = [results[0][k], results[1][k]]
        ok = [x for x in pair if isinstance(x, dict)]
        lost = [x for x in pair if isinstance(x, TaskExists)]
        assert len(ok) == 1 and len(lost) == 1, (name, pair)
    tasks = reg.list_tasks()
    assert [t["name"] for t in tasks] == names and all(len(t["versions"]) == 1 for t in tasks)


# ------------------------------------------------------------------ the cap on virtual tokens

def _prompt_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*.safetensors"))


def test_virtual_token_cap_on_every_store_path(reg: Registry) -> None:
    """The cap a task is created with over HTTP (registry.MAX_VIRTUAL_TOKENS) holds for every way a
    prompt is stored: a task created with or without a prompt, a new version. Refused with a clear
    InvalidPrompt before anything is written: no file, no row, no generation bump."""
    from registry import MAX_VIRTUAL_TOKENS

    assert MAX_VIRTUAL_TOKENS == 512
    over = torch.randn(MAX_VIRTUAL_TOKENS + 1, 4)
    reg.create_task("t", num_virtual_tokens=2, hidden_size=4, base_model="gpt2")
    g = reg.generation()
    with pytest.raises(InvalidPrompt, match="513 virtual tokens, over the maximum of 512"):
        reg.create_task("big", base_model="gpt2", embeddings=over, source="import")
    with pytest.raises(InvalidPrompt, match="over the maximum of 512"):
        reg.create_task("big", num_virtual_tokens=513, hidden_size=4, base_model="gpt2")
    with pytest.raises(InvalidPrompt, match="513 virtual tokens"):
        reg.add_version("t", over, source="upload")
    assert _prompt_files(reg.data_dir) == [] and reg.generation() == g
    assert [t["name"] for t in reg.list_tasks()] == ["t"] and reg.get_task("t")["versions"] == []
    v = reg.add_version("t", torch.randn(MAX_VIRTUAL_TOKENS, 4), source="upload")  # at the cap: fine
    assert v["num_virtual_tokens"] == 512
    with pytest.raises(InvalidPrompt, match="at least one virtual token"):
        reg.add_version("t", torch.randn(0, 4), source="upload")


def test_virtual_token_cap_for_import_and_training(reg: Registry, tmp_path: Path, tiny_model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`polyprompt tasks import` and training register through the registry: the same refusal,
    for a new task and for a new version of one, nothing written."""
    from adapters.peft_format import write_adapter_folder
    from server.cli import tasks as tasks_cli
    from training.register import LocalTarget

    flags = ["--db", reg.db_url, "--data-dir", str(reg.data_dir), "--model", str(tiny_model_dir)]
    ok = write_adapter_folder(tmp_path / "ok", torch.randn(3, 128), base_model="x", num_layers=2,
                              num_attention_heads=2)
    assert tasks_cli.main(["import", "small", str(ok), *flags]) == 0
    files = _prompt_files(reg.data_dir)
    for name in ("big", "small"):
        folder = write_adapter_folder(tmp_path / "big", torch.randn(600, 128), base_model="x", num_layers=2,
                                      num_attention_heads=2)
        capsys.readouterr()
        assert tasks_cli.main(["import", name, str(folder), *flags]) == 1
        assert "600 virtual tokens, over the maximum of 512" in capsys.readouterr().err
    with pytest.raises(TaskNotFound):
        reg.get_task("big")
    assert len(reg.get_task("small")["versions"]) == 1
    for name in ("trained", "small"):
        target = LocalTarget(reg, name, create=True, model_id=tiny_model_dir.name, hidden_size=128)
        with pytest.raises(InvalidPrompt, match="600 virtual tokens"):
            target.register(torch.randn(600, 128), meta={})
    assert [t["name"] for t in reg.list_tasks()] == ["small"] and _prompt_files(reg.data_dir) == files


# ------------------------------------------------------------------ a task's chat template

def test_chat_template_stored_changed_and_indexed(reg: Registry) -> None:
    tpl = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    t = reg.create_task("a", num_virtual_tokens=2, hidden_size=4, base_model="gpt2", chat_template=tpl)
    assert t["chat_template"] == tpl == reg.get_task("a")["chat_template"]
    reg.create_task("b", base_model="gpt2", embeddings=torch.randn(3, 4))
    assert reg.get_task("b")["chat_template"] is None
    index = reg.serving_index()
    assert index["a"] == (2, None, None, tpl) and index["b"][3] is None
    assert {n: v[:3] for n, v in index.items()} == reg.active_index()
    g = reg.generation()
    assert reg.update_task("a")["chat_template"] == tpl and reg.generation() == g  # nothing passed
    before = reg.get_task("b")
    t = reg.update_task("b", chat_template="plain {{ messages | length }}")
    assert t["chat_template"] == "plain {{ messages | length }}" and reg.generation() == g + 1
    assert t["updated_at"] >= before["updated_at"] and t["versions"] == before["versions"]
    assert reg.serving_index()["b"][3] == "plain {{ messages | length }}"
    assert reg.update_task("b", chat_template=None)["chat_template"] is None and reg.generation() == g + 2
    for bad in ("", "a\x00b", "x" * 65537, 5):
        with pytest.raises(ValueError):
            reg.update_task("a", chat_template=bad)
        with pytest.raises(ValueError):
            reg.create_task("c", num_virtual_tokens=2, hidden_size=4, base_model="gpt2", chat_template=bad)
    assert reg.get_task("a")["chat_template"] == tpl and reg.generation() == g + 2
    with pytest.raises(TaskNotFound):
        reg.update_task("nope", chat_template=tpl)
    reg.create_task("c", num_virtual_tokens=1, hidden_size=4, base_model="gpt2", chat_template=tpl)
    index = reg.serving_index()
    assert index["a"][3] is index["c"][3]  # equal templates held once


# ------------------------------------------------------------------ prompt bytes in the database

def _blob_rows(r: Registry) -> dict[str, tuple[bytes, int]]:
    with r.engine.connect() as c:
        return {sha: (bytes(data), size) for sha, data, size in c.execute(text(
            "SELECT sha256, data, size FROM prompt_blobs"))}


def _local(r: Registry, sha: str) -> Path:
    return r.data_dir / "prompts" / sha[:2] / f"{sha}.safetensors"


def test_a_replica_needs_only_the_database_url(reg: Registry, tmp_path: Path) -> None:
    """Every prompt is stored once in the database (content-addressed, sha256-checked, with its
    version row): a second registry on the same URL with an EMPTY data folder loads every version
    of every task, identical, and caches each in its own folder."""
    e1, e2, e3 = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8)
    reg.create_task("a", base_model="gpt2", embeddings=e1)
    reg.add_version("a", e2, source="upload")
    reg.create_task("b", base_model="gpt2", embeddings=e1)  # same content: one blob
    reg.create_task("c", num_virtual_tokens=2, hidden_size=8, base_model="gpt2")
    reg.add_version("c", e3, source="upload", activate=False)
    blobs = _blob_rows(reg)
    assert len(blobs) == 3 and reg.blob_shas() == set(blobs)
    for sha, (data, size) in blobs.items():
        assert hashlib.sha256(data).hexdigest() == sha and size == len(data)
        assert _local(reg, sha).read_bytes() == data  # the writer's own cache
    replica = Registry(reg.db_url, tmp_path / "replica")
    assert list(replica.data_dir.iterdir()) == []
    want = {"a": [e1, e2], "b": [e1], "c": [e3]}
    for name, tensors in want.items():
        for v, e in zip(replica.get_task(name)["versions"], tensors):
            assert torch.equal(replica.load_prompt(v["sha256"]), e), (name, v["version"])
            assert _local(replica, v["sha256"]).read_bytes() == blobs[v["sha256"]][0]  # cached now
    assert not [p for p in replica.data_dir.rglob("*") if p.name.startswith(".tmp-")]
    replica.close()


def test_a_missing_or_corrupt_cache_file_is_repaired_from_the_database(reg: Registry, tmp_path: Path) -> None:
    e = torch.randn(4, 8)
    sha = reg.create_task("t", base_model="gpt2", embeddings=e)["sha256"]
    path = _local(reg, sha)
    good = path.read_bytes()
    path.write_bytes(good[:-4] + b"\0\0\0\0")  # corrupt
    assert torch.equal(reg.load_prompt(sha), e) and path.read_bytes() == good
    path.unlink()  # missing
    assert torch.equal(reg.load_prompt(sha), e) and path.read_bytes() == good
    path.write_bytes(b"")  # truncated
    assert torch.equal(reg.load_prompt(sha), e) and path.read_bytes() == good
    # neither holds it intact: a clear IntegrityError, never a wrong tensor
    with reg.engine.begin() as c:
        c.execute(text("UPDATE prompt_blobs SET data = :d WHERE sha256 = :s"), {"d": good[:-1] + b"!", "s": sha})
    path.unlink()
    with pytest.raises(IntegrityError, match="corrupt in the database"):
        reg.load_prompt(sha)
    assert not path.exists()
    reg.add_version("t", e, source="upload")  # the same content uploaded again repairs the blob
    assert _blob_rows(reg)[sha][0] == good
    path.unlink()
    assert torch.equal(reg.load_prompt(sha), e)
    with reg.engine.begin() as c:
        c.execute(text("DELETE FROM prompt_blobs"))
    path.unlink()
    with pytest.raises(IntegrityError, match="not in the database.*missing"):
        reg.load_prompt(sha)
    with pytest.raises(ValueError):
        reg.load_prompt("../../etc/passwd")


def test_a_blob_is_checked_against_its_sha256_on_write(reg: Registry) -> None:
    from registry import store

    with reg._session() as s, s.begin():
        with pytest.raises(IntegrityError, match="hash to"):
            store.put_blob(s, sha256="0" * 64, data=b"not those bytes")
    assert _blob_rows(reg) == {}


def test_deleting_a_task_removes_the_blobs_no_version_references(reg: Registry) -> None:
    shared, own = torch.randn(3, 8), torch.randn(4, 8)
    sha_shared = reg.create_task("a", base_model="gpt2", embeddings=shared)["sha256"]
    sha_own = reg.add_version("a", own, source="upload")["sha256"]
    reg.create_task("b", base_model="gpt2", embeddings=shared)
    assert set(_blob_rows(reg)) == {sha_shared, sha_own}
    g = reg.generation()
    reg.delete_task("a")
    assert set(_blob_rows(reg)) == {sha_shared} and reg.generation() == g + 1  # b still uses it
    reg.delete_task("b")
    assert _blob_rows(reg) == {}
    assert _local(reg, sha_shared).is_file()  # local cache files stay (content-addressed, harmless)
    reg.create_task("c", base_model="gpt2", embeddings=shared)  # the same prompt back: stored again
    assert set(_blob_rows(reg)) == {sha_shared}
    with pytest.raises(TaskNotFound):
        reg.delete_task("a")
    assert set(_blob_rows(reg)) == {sha_shared}


def test_every_write_notifies_on_postgresql(reg: Registry) -> None:
    """Each mutation runs `pg_notify('polyprompt_registry', <new generation>)` in its transaction:
    delivered at commit, none for a mutation that failed (rolled back). SQLite: no listener."""
    from registry import NOTIFY_CHANNEL

    if reg.engine.dialect.name != "postgresql":
        assert reg.listen(lambda: None) is None
        return
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(reg.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        reg.create_task("n", base_model="gpt2", embeddings=torch.randn(2, 4))
        reg.add_version("n", torch.randn(3, 4), source="upload")
        reg.activate_version("n", 1)
        reg.update_task("n", chat_template="{{ messages }}")
        with pytest.raises(TaskExists):
            reg.create_task("n", num_virtual_tokens=1, hidden_size=4, base_model="gpt2")
        reg.delete_task("n")
        got = [n.payload for n in conn.notifies(timeout=2, stop_after=5)]
        assert [(n.channel) for n in conn.notifies(timeout=0.3)] == []
    assert got == [str(g) for g in range(1, 6)] and reg.generation() == 5


def test_listener_calls_back_on_commit(reg: Registry) -> None:
    """`Registry.listen`: on PostgreSQL a thread LISTENing calls back once connected and on every
    committed change, in well under the default 0.5 s poll."""
    if reg.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no LISTEN/NOTIFY: servers poll")
    calls: list[float] = []
    listener = reg.listen(lambda: calls.append(time.perf_counter()))
    try:
        assert listener.connected.wait(10)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 1  # the call after connecting
        t0 = time.perf_counter()
        reg.create_task("l", num_virtual_tokens=1, hidden_size=4, base_model="gpt2")
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        print(f"\n[notify] commit -> callback {1000 * (calls[1] - t0):.1f} ms (from before the write)")
        assert len(calls) == 2 and calls[1] - t0 < 0.5
    finally:
        listener.stop()
    assert not listener._thread.is_alive()
