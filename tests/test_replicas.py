"""Replicas on one database, each with its own data folder (issue 15): the database holds the
prompt bytes (`prompt_blobs`), so a replica with an EMPTY data folder serves every task, greedy
output identical to the replica that registered it; and a change made through one replica (task
registered, new version uploaded, rolled back, deleted) is served by the other within 2 s by
polling (`--reload-interval` 0.5 s), and on PostgreSQL within 0.5 s with the poll set to 5 s: the
NOTIFY every registry write sends, not the poll, did it. Run with `-s` to see the measured times.
Every test runs on SQLite and on PostgreSQL (`module_db_url`; tests/pg.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from registry import Registry
from server.app import create_app
from tests.apiutil import adapter_files, greedy, make_peft_adapter, settings

PROMPT = "The quick brown fox"
POLL = 0.5  # the default --reload-interval
SLOW_POLL = 5.0  # PostgreSQL: so long that only NOTIFY can make it under 0.5 s
DEADLINE = 10.0  # give up waiting (the assertions are far below)


def _pg(url: str) -> bool:
    return not url.startswith("sqlite")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two PEFT adapters (7 and 5 virtual tokens), folders for upload."""
    root = tmp_path_factory.mktemp("replica-peft")
    make_peft_adapter(tiny_model_dir, root / "a", num_virtual_tokens=7, seed=1)
    make_peft_adapter(tiny_model_dir, root / "b", num_virtual_tokens=5, seed=2)
    return root / "a", root / "b"


def _client(model_dir, data, url, **kw) -> Iterator[TestClient]:
    with TestClient(create_app(settings(model_dir, data, db=url, **kw))) as c:
        yield c


@pytest.fixture(scope="module")
def writer(tiny_model_dir, tmp_path_factory, module_db_url):
    """Replica A: every change goes through it."""
    yield from _client(tiny_model_dir, tmp_path_factory.mktemp("replica-a"), module_db_url)


@pytest.fixture(scope="module")
def reader(tiny_model_dir, tmp_path_factory, module_db_url, writer):
    """Replica B, its own (empty) data folder: polls every 0.5 s on SQLite, every 5 s on PostgreSQL
    (where it LISTENs)."""
    interval = SLOW_POLL if _pg(module_db_url) else POLL
    yield from _client(tiny_model_dir, tmp_path_factory.mktemp("replica-b"), module_db_url, reload_interval=interval)


@pytest.fixture(scope="module")
def poller(tiny_model_dir, tmp_path_factory, module_db_url, writer):
    """Replica C on PostgreSQL without its LISTEN connection: the poll alone (the fallback)."""
    if not _pg(module_db_url):
        pytest.skip("SQLite has no NOTIFY: the reader already runs on the poll alone")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Registry, "listen", lambda self, on_change: None)
        client = TestClient(create_app(settings(tiny_model_dir, tmp_path_factory.mktemp("replica-c"),
                                                db=module_db_url, reload_interval=POLL)))
        client.__enter__()
    assert getattr(client.app.state.runtime, "_listener", None) is None
    yield client
    client.__exit__(None, None, None)


def _served(client: TestClient, name: str) -> tuple[list[int], list[float]] | None:
    """What `client` answers for task `name` (greedy ids and their log-probs), None on 404."""
    r = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                             "ignore_eos": True, "logprobs": 1, "return_token_ids": True})
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def _same(a, b) -> bool:
    """Same greedy ids and the same log-probs (to float noise): the same prompt served."""
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1], b[1])) < 1e-3


def _wait_served(client: TestClient, name: str, want, t0: float) -> float:
    """Seconds from `t0` until `client` serves `want` for `name` (None: answers 404)."""
    while True:
        got = _served(client, name)
        if _same(got, want):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > DEADLINE:
            pytest.fail(f"{name}: not served as expected after {DEADLINE}s: {got} != {want}")
        time.sleep(0.002)


def _wait_change(client: TestClient, name: str, before, t0: float):
    """(seconds from `t0` until `client` stops serving `before` for `name`, what it serves then)."""
    while True:
        got = _served(client, name)
        if not _same(got, before):
            return time.perf_counter() - t0, got
        if time.perf_counter() - t0 > DEADLINE:
            pytest.fail(f"{name}: still served as before after {DEADLINE}s")
        time.sleep(0.002)


def _propagation(writer: TestClient, other: TestClient, name: str, adapter: tuple) -> dict[str, float]:
    """Register, update, roll back and delete `name` through `writer`; the seconds from sending each
    request to the writer until `other` serves the change (then: exactly what the writer serves)."""
    times = {}
    assert _served(other, name) is None

    def change(kind: str, before, send):
        t0 = time.perf_counter()
        send()
        times[kind], got = _wait_change(other, name, before, t0)
        want = _served(writer, name)  # the writer reloaded at once after its own change
        assert _same(got, want), (kind, got, want)
        return want

    def ok(r, status=201):
        assert r.status_code == status, r.text

    v1 = change("register", None, lambda: ok(writer.post("/v1/tasks", json={
        "name": name, "num_virtual_tokens": 6, "seed": 7})))
    v2 = change("update", v1, lambda: ok(writer.post(f"/v1/tasks/{name}/prompt", files=adapter_files(adapter[0]))))
    assert not _same(v1, v2)
    assert _same(change("rollback", v2, lambda: ok(writer.post(f"/v1/tasks/{name}/activate", json={"version": 1}),
                                                    200)), v1)
    assert change("delete", v1, lambda: ok(writer.delete(f"/v1/tasks/{name}"), 204)) is None
    return times


def _report(label: str, times: dict[str, float]) -> None:
    print(f"\n[propagation {label}] " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items()))


def test_replica_with_an_empty_data_folder_serves_every_task(writer, reader, adapters, module_db_url):
    """Tasks registered through A (a random init, an uploaded PEFT adapter, a task rolled back to v1):
    B, whose data folder started empty, serves each with A's greedy output, its prompts read from the
    database and cached in its own folder."""
    names = ["rep-init", "rep-peft", "rep-rolled"]
    for name in names:
        assert writer.post("/v1/tasks", json={"name": name, "num_virtual_tokens": 4, "seed": 3}).status_code == 201
    for name in names[1:]:
        assert writer.post(f"/v1/tasks/{name}/prompt", files=adapter_files(adapters[0])).status_code == 201
    assert writer.post("/v1/tasks/rep-rolled/activate", json={"version": 1}).status_code == 200
    reg_b = reader.app.state.runtime.registry
    assert reg_b.data_dir != writer.app.state.runtime.registry.data_dir
    for name in names:
        want = _served(writer, name)
        _wait_served(reader, name, want, time.perf_counter())
        assert greedy(reader, name, PROMPT, 6)["choices"][0]["token_ids"] == \
            greedy(writer, name, PROMPT, 6)["choices"][0]["token_ids"]
        sha = reg_b.get_task(name)["sha256"]
        assert (reg_b.data_dir / "prompts" / sha[:2] / f"{sha}.safetensors").is_file()  # cached on B now
    for name in names:
        assert writer.delete(f"/v1/tasks/{name}").status_code == 204


def test_changes_through_one_replica_reach_the_other(writer, reader, adapters, module_db_url):
    """All four kinds of change made through A are served by B within 2 s; on PostgreSQL, with B
    polling only every 5 s, within 0.5 s (NOTIFY)."""
    pg = _pg(module_db_url)
    times = _propagation(writer, reader, "prop-notify" if pg else "prop-poll", adapters)
    _report(f"{'postgresql NOTIFY, poll 5 s' if pg else 'sqlite poll 0.5 s'}", times)
    assert all(t < 2.0 for t in times.values()), times
    if pg:
        assert all(t < 0.5 for t in times.values()), times
        listener = reader.app.state.runtime._listener
        assert listener is not None and listener.notifications >= 4


def test_poll_alone_reaches_every_replica_on_postgresql(writer, poller, adapters, module_db_url):
    """The fallback: a PostgreSQL replica that does not LISTEN still sees all four changes within 2 s."""
    times = _propagation(writer, poller, "prop-pg-poll", adapters)
    _report("postgresql poll 0.5 s, no LISTEN", times)
    assert all(t < 2.0 for t in times.values()), times


def test_listener_reconnects_after_its_connection_is_killed(writer, reader, adapters, module_db_url):
    """The LISTEN connection ended by the server (pg_terminate_backend): the listener reconnects
    (backoff from 0.5 s) and changes are pushed again, well under the 5 s poll."""
    if not _pg(module_db_url):
        pytest.skip("SQLite has no LISTEN connection")
    listener = reader.app.state.runtime._listener
    assert listener.connected.wait(10)
    before, pid = listener.connects, listener.backend_pid
    reg = writer.app.state.runtime.registry
    with reg.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    deadline = time.monotonic() + 15
    while listener.connects == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listener.connects == before + 1 and listener.backend_pid != pid
    times = _propagation(writer, reader, "prop-reconnected", adapters)
    _report("postgresql NOTIFY after a reconnect", times)
    assert all(t < 0.5 for t in times.values()), times
