"""The registry's database goes away and comes back (issue 15, "Database trouble"), for real:
a PostgreSQL server of this test's own (initdb in a temp folder, a free port) is stopped and
started again under a running app.

While it is down: tasks already loaded keep serving (same tokens), admin writes fail fast
with 503 `registry_unavailable` and a clear message, `/health` says the registry is
degraded. When it returns, everything recovers by itself: no restart."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.apiutil import assert_error, settings

pytestmark = pytest.mark.slow  # a PostgreSQL server of its own


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    return Path(exe).parent if exe else None


class Cluster:
    """A throwaway PostgreSQL cluster (as the postgres user when root, trust auth on 127.0.0.1)."""

    def __init__(self, root: Path):
        self.bin = _pg_bin()
        self.dir = root / "pgdata"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd="/")

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.dir.parent, "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale")
        with open(self.dir / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nsynchronous_commit = off\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop")


@pytest.fixture
def cluster(tmp_path_factory):
    if _pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: DATABASE OUTAGE TEST SKIPPED "
                    "(.ci/run installs Debian's postgresql)")
    root = Path("/tmp") / f"pp-outage-{os.getpid()}-{time.monotonic_ns()}"  # short: the socket path has a limit
    c = Cluster(root)
    try:
        c.init()
        c.start()
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server of our own ({e}): DATABASE OUTAGE TEST SKIPPED")
    yield c
    try:
        c.stop()
    except Exception:
        pass
    shutil.rmtree(root, ignore_errors=True)


def _until(pred, timeout: float = 10.0, step: float = 0.1) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(step)
    return time.monotonic() - t0


def _greedy(client, model: str) -> list[int]:
    r = client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_outage_and_recovery(cluster, tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, tmp_path / "data", db=cluster.url, reload_interval=0.2)
    with TestClient(create_app(s)) as client:
        for name in ("steady", "other"):
            assert client.post("/v1/tasks", json={"name": name, "num_virtual_tokens": 4, "seed": 3}).status_code == 201
        before = _greedy(client, "steady")
        assert client.get("/health").json()["registry"] == {"status": "ok"}

        cluster.stop()
        # serving goes on, from what is loaded
        assert _greedy(client, "steady") == before
        took = _until(lambda: client.get("/health").json()["status"] == "degraded")
        health = client.get("/health")
        assert health.status_code == 200
        reg = health.json()["registry"]
        assert reg["status"] == "unreachable" and reg["error"]
        print(f"\n[outage] /health degraded {took:.2f}s after the database stopped: {reg['error'][:100]}")
        # admin writes fail fast with a clear 503
        t0 = time.monotonic()
        r = client.post("/v1/tasks", json={"name": "during", "num_virtual_tokens": 4})
        elapsed = time.monotonic() - t0
        err = assert_error(r, 503, "registry", "retry")
        assert err["code"] == "registry_unavailable" and r.headers.get("retry-after")
        assert elapsed < 6, elapsed
        assert_error(client.delete("/v1/tasks/other"), 503, "registry")
        assert _greedy(client, "steady") == before  # still serving after failed writes
        assert _greedy(client, "other") == _greedy(client, "other")

        cluster.start()
        took = _until(lambda: client.get("/health").json()["status"] == "ok", timeout=15)
        print(f"[outage] recovered {took:.2f}s after the database started again")
        assert client.get("/health").json()["registry"] == {"status": "ok"}
        r = client.post("/v1/tasks", json={"name": "after", "num_virtual_tokens": 4, "seed": 5})
        assert r.status_code == 201, r.text
        assert len(_greedy(client, "after")) == 6
        assert client.delete("/v1/tasks/other").status_code in (200, 204)
        assert _greedy(client, "steady") == before
        names = {t["name"] for t in client.get("/v1/tasks").json()["data"]}
        assert names == {"steady", "after"}
