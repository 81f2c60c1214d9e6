"""Issue 13, "one request never hurts another": malformed adapter files are a 400 for that
request only and nothing is stored that cannot be served back (finding 6); a task and its
initial soft prompt are created in one transaction (finding 7)."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from adapters.peft_format import write_adapter_folder
from registry import Registry, TaskExists
from registry.models import PromptVersion
from registry.paths import default_db_url
from server.app import create_app
from server.cli import tasks as tasks_cli
from tests.apiutil import assert_error, settings
from training.register import LocalTarget

HIDDEN = 128  # the tiny fixture model's width
ROWS = 2
DEEP = 100_000  # far past any recursion limit
BIG = "1" + "0" * 5000  # over Python's 4300-digit int conversion limit
ENTRY = {"dtype": "F32", "shape": [ROWS, HIDDEN], "data_offsets": [0, ROWS * HIDDEN * 4]}
CONFIG = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": ROWS,
          "token_dim": HIDDEN, "base_model_name_or_path": "tiny"}


def _st(header: str | dict, data: bytes | None = None) -> bytes:
    """Safetensors bytes built by hand: 8-byte little-endian header length, JSON header, data."""
    text = header if isinstance(header, str) else json.dumps(header)
    hb = text.encode("utf-8")
    data = bytes(ROWS * HIDDEN * 4) if data is None else data
    return struct.pack("<Q", len(hb)) + hb + data


def _entry_text(**raw: str) -> str:
    """The header of a valid prompt file with some of its fields replaced by raw JSON text."""
    fields = {k: json.dumps(v) for k, v in ENTRY.items()} | raw
    return '{"prompt_embeddings": {' + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}}"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _config_text(**raw: str) -> bytes:
    """A valid adapter_config.json with some values replaced (or added) as raw JSON text."""
    fields = {k: json.dumps(v) for k, v in CONFIG.items()} | raw
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()  # escapes keys


HEADERS = {  # name -> (header JSON text, a word the 400's message must contain)
    "shape-null": (_entry_text(shape="null"), "shape"),
    "shape-string-dim": (_entry_text(shape='[2, "x"]'), "shape"),
    "shape-negative": (_entry_text(shape="[-2, 128]"), "shape"),
    "shape-bool": (_entry_text(shape="[true, 128]"), "shape"),
    "shape-float": (_entry_text(shape="[2.0, 128]"), "shape"),
    "shape-nan": (_entry_text(shape="[NaN, 128]"), "NaN"),
    "shape-overflow-float": (_entry_text(shape="[1e400, 128]"), "number"),
    "shape-huge-int": (_entry_text(shape=f"[2, {BIG}]"), "digits"),
    "shape-string": (_entry_text(shape='"2x128"'), "shape"),
    "shape-object": (_entry_text(shape='{"a": 1}'), "shape"),
    "dtype-list": (_entry_text(dtype='["F32"]'), "dtype"),
    "dtype-object": (_entry_text(dtype='{"F32": 1}'), "dtype"),
    "dtype-number": (_entry_text(dtype="5"), "dtype"),
    "dtype-int": (_entry_text(dtype='"I64"'), "dtype"),
    "offsets-null": (_entry_text(data_offsets="null"), "data_offsets"),
    "offsets-short": (_entry_text(data_offsets="[0]"), "data_offsets"),
    "offsets-strings": (_entry_text(data_offsets='["0", "1024"]'), "data_offsets"),
    "offsets-negative": (_entry_text(data_offsets="[-1, 1023]"), "data_offsets"),
    "offsets-reversed": (_entry_text(data_offsets="[1024, 0]"), "data_offsets"),
    "offsets-bool": (_entry_text(data_offsets="[false, 1024]"), "data_offsets"),
    "offsets-past-end": (_entry_text(data_offsets=f"[0, {10 ** 30}]"), "data_offsets"),
    "offsets-wrong-size": (_entry_text(data_offsets="[0, 1000]"), "data_offsets"),
    "entry-not-object": ('{"prompt_embeddings": 5}', "prompt_embeddings"),
    "entry-list": ('{"prompt_embeddings": [1, 2]}', "prompt_embeddings"),
    "deep": (_entry_text()[:-1] + f', "x": {_nested(DEEP)}}}', "deep"),
    "deep-under-recursion-limit": (_entry_text()[:-1] + f', "x": {_nested(100)}}}', "deep"),
    "huge-int-elsewhere": (_entry_text()[:-1] + f', "x": {BIG}}}', "digits"),
    "surrogate-key": ('{"\\ud800": ' + json.dumps(ENTRY) + "}", "surrogate"),
    "surrogate-metadata": (_entry_text()[:-1] + ', "__metadata__": {"format": "\\udfff"}}', "surrogate"),
}

CONFIGS = {  # name -> (adapter_config.json bytes, a word the 400's message must contain)
    "surrogate-value": (_config_text(base_model_name_or_path='"\\ud800"'), "surrogate"),
    "surrogate-key": (_config_text(**{"\udc00": "1"}), "surrogate"),  # written as "\\udc00"
    "surrogate-deep-in-list": (_config_text(auto_mapping='{"a": ["ok", "x\\ud83dy"]}'), "surrogate"),
    "nan": (_config_text(revision="NaN"), "NaN"),
    "infinity": (_config_text(revision="-Infinity"), "Infinity"),
    "overflow-float": (_config_text(revision="1e400"), "number"),
    "huge-int": (_config_text(revision=BIG), "digits"),
    "deep": (_config_text(auto_mapping=_nested(DEEP)), "deep"),
    "deep-under-recursion-limit": (_config_text(auto_mapping=_nested(100)), "deep"),
    "just-too-deep": (_config_text(auto_mapping=_nested(64)), "64"),  # 65 levels with the top object
    "deep-not-a-list": (b"[" * DEEP + b"]" * DEEP, "deep"),
}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-robust")
    with TestClient(create_app(settings(tiny_model_dir, data))) as c:
        r = c.post("/v1/tasks", json={"name": "robust", "num_virtual_tokens": 3})
        assert r.status_code == 201, r.text
        yield c


def _files(weights: bytes, config: bytes | None = None) -> dict:
    files = {"adapter_model.safetensors": ("adapter_model.safetensors", weights, "application/octet-stream")}
    if config is not None:
        files["adapter_config.json"] = ("adapter_config.json", config, "application/json")
    return files


def _reads_ok(client, name: str = "robust") -> dict:
    r = client.get("/v1/tasks")
    assert r.status_code == 200, r.text
    r = client.get(f"/v1/tasks/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def _refused(client, files: dict, needle: str) -> None:
    before = _reads_ok(client)
    r = client.post("/v1/tasks/robust/prompt", files=files)
    err = assert_error(r, 400, needle)
    assert err["code"] == "invalid_adapter"
    after = _reads_ok(client)
    assert len(after["versions"]) == len(before["versions"])


# ------------------------------------------------------------------ finding 6: malformed files

def test_hand_built_file_is_accepted(client):
    """The builder below makes real safetensors: an untouched header and config upload fine."""
    r = client.post("/v1/tasks/robust/prompt", files=_files(_st(_entry_text()), _config_text()))
    assert r.status_code == 201, r.text
    assert r.json()["num_virtual_tokens"] == ROWS
    assert _reads_ok(client)["versions"][-1]["meta"]["peft_config"]["base_model_name_or_path"] == "tiny"
    ok = _config_text(auto_mapping=_nested(63))  # 64 levels with the top object: the limit
    assert client.post("/v1/tasks/robust/prompt", files=_files(_st(_entry_text()), ok)).status_code == 201
    _reads_ok(client)


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_safetensors_header_is_400(client, case):
    header, needle = HEADERS[case]
    _refused(client, _files(_st(header)), needle)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_malformed_adapter_config_is_400(client, case):
    config, needle = CONFIGS[case]
    _refused(client, _files(_st(_entry_text()), config), needle)


def test_stored_unservable_meta_still_reads(tiny_model_dir, tmp_path):
    """A version meta written by an older build (lone surrogates, NaN) must not break GETs."""
    with TestClient(create_app(settings(tiny_model_dir, tmp_path))) as c:
        assert c.post("/v1/tasks", json={"name": "old", "num_virtual_tokens": 2}).status_code == 201
        reg = c.app.state.runtime.registry
        deep: list = []
        inner = deep
        for _ in range(300):  # past pydantic-core's serializer depth limit (~255)
            inner.append([])
            inner = inner[0]
        bad = {"peft_config": {"base_model_name_or_path": "\ud800", "\udfff": ["x\ud83dy"],
                               "revision": float("nan"), "r2": float("inf"), "auto_mapping": deep}}
        with reg._session() as s, s.begin():
            s.execute(update(PromptVersion).values(meta=bad))
        t = _reads_ok(c, "old")
        cfg = t["versions"][0]["meta"]["peft_config"]
        assert cfg["base_model_name_or_path"] == "\ufffd" and cfg["\ufffd"] == ["x\ufffdy"]
        assert cfg["revision"] is None and cfg["r2"] is None
        listed = c.get("/v1/tasks").json()["data"]
        assert listed[0]["versions"][0]["meta"] == t["versions"][0]["meta"]
    with TestClient(create_app(settings(tiny_model_dir, tmp_path))) as c:  # and after a restart
        _reads_ok(c, "old")


CLI_CASES = {
    "config-surrogate": (_entry_text(), CONFIGS["surrogate-value"][0], "surrogate"),
    "config-deep": (_entry_text(), CONFIGS["deep"][0], "deep"),
    "config-huge-int": (_entry_text(), CONFIGS["huge-int"][0], "digits"),
    "config-nan": (_entry_text(), CONFIGS["nan"][0], "NaN"),
    "header-shape-null": (HEADERS["shape-null"][0], None, "shape"),
    "header-shape-string-dim": (HEADERS["shape-string-dim"][0], None, "shape"),
    "header-shape-nan": (HEADERS["shape-nan"][0], None, "NaN"),
    "header-deep": (HEADERS["deep"][0], None, "deep"),
    "header-huge-int": (HEADERS["shape-huge-int"][0], None, "digits"),
    "header-dtype-list": (HEADERS["dtype-list"][0], None, "dtype"),
    "header-surrogate-key": (HEADERS["surrogate-key"][0], None, "surrogate"),
}


@pytest.mark.parametrize("known_model", [True, False], ids=["model-config", "peek-header"])
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_tasks_import_bad_folder_is_a_clear_error(case, known_model, tiny_model_dir, tmp_path, capsys,
                                                  monkeypatch):
    """`tasks import` prints `error: ...` and exits 1, also where it peeks at the header for the
    hidden size (a model whose config is unavailable)."""
    header, config, needle = CLI_CASES[case]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(_st(header))
    if config is not None:
        (folder / "adapter_config.json").write_bytes(config)
    if not known_model:
        monkeypatch.setattr(tasks_cli, "model_shape", lambda model: None)
    flags = ["--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir)]
    assert tasks_cli.main(["import", "bad", str(folder), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle.lower() in err.lower(), err
    assert tasks_cli.main(["list", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out) == []


# ------------------------------------------------------------------ finding 7: atomic creation

class SimulatedCrash(Exception):
    """Stands in for kill -9 between the task row and its first version."""


@contextlib.contextmanager
def crash_on_version_insert():
    """Fail every prompt-version INSERT (after the task row was flushed in the same transaction)."""
    def crash(*_):
        raise SimulatedCrash("killed before the version row was written")

    event.listen(PromptVersion, "before_insert", crash)
    try:
        yield
    finally:
        event.remove(PromptVersion, "before_insert", crash)


@pytest.fixture()
def reg(tmp_path: Path):
    r = Registry(default_db_url(tmp_path / "data"), tmp_path / "data")
    r.upgrade()
    yield r
    r.close()


def test_create_with_prompt_is_one_transaction(reg):
    e = torch.randn(3, 8)
    g0 = reg.generation()
    with crash_on_version_insert(), pytest.raises(SimulatedCrash):
        reg.create_task("t", base_model="gpt2", embeddings=e, source="init:random", meta={"k": 1})
    assert reg.list_tasks() == [] and reg.active_index() == {} and reg.generation() == g0
    t = reg.create_task("t", description="d", base_model="gpt2", embeddings=e, source="init:random",
                        meta={"k": 1})
    assert reg.generation() == g0 + 1  # one mutation, one bump
    assert t == reg.get_task("t")
    assert t["active_version"] == 1 and t["num_virtual_tokens"] == 3 and t["hidden_size"] == 8
    (v,) = t["versions"]
    assert v["is_active"] and v["source"] == "init:random" and v["meta"] == {"k": 1} and v["base_model"] == "gpt2"
    assert torch.equal(reg.load_prompt(t["sha256"]), e)
    files = sorted((reg.data_dir / "prompts").rglob("*.safetensors"))
    with pytest.raises(TaskExists):
        reg.create_task("t", base_model="gpt2", embeddings=torch.randn(3, 8), source="init:random")
    assert reg.generation() == g0 + 1
    assert sorted((reg.data_dir / "prompts").rglob("*.safetensors")) == files  # refused before writing
    # a task without versions can still be made where a caller wants one
    assert reg.create_task("bare", num_virtual_tokens=2, hidden_size=8, base_model="gpt2")["versions"] == []


def test_create_with_prompt_refuses_before_writing(reg, monkeypatch):
    import registry

    with pytest.raises(registry.InvalidPrompt):
        reg.create_task("t", base_model="gpt2", embeddings=torch.randn(3, 8), hidden_size=16, source="x")
    with pytest.raises(registry.InvalidPrompt):
        reg.create_task("t", base_model="gpt2", embeddings=torch.randn(3, 8), num_virtual_tokens=4, source="x")
    with pytest.raises(registry.InvalidName):
        reg.create_task("Bad", base_model="gpt2", embeddings=torch.randn(3, 8), source="x")
    assert not (reg.data_dir / "prompts").exists()

    def no_disk(*_a, **_k):
        raise OSError("disk full")

    import registry.files

    monkeypatch.setattr(registry.files, "write_prompt_file", no_disk)  # the registry imports it on use
    with pytest.raises(OSError):
        reg.create_task("t", base_model="gpt2", embeddings=torch.randn(3, 8), source="x")
    assert reg.list_tasks() == []


def test_concurrent_creates_one_wins(reg):
    for round_ in range(3):
        name = f"race-{round_}"
        barrier = threading.Barrier(2)
        results: list[object] = []

        def worker(i: int) -> None:
            barrier.wait()
            try:
                results.append(reg.create_task(name, base_model="gpt2", embeddings=torch.full((2, 4), float(i)),
                                               source="x"))
            except TaskExists as e:
                results.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(type(r).__name__ for r in results) == ["TaskExists", "dict"], results
        t = reg.get_task(name)
        assert t["active_version"] == 1 and len(t["versions"]) == 1


def test_train_create_is_atomic(reg):
    target = LocalTarget(reg, "trained", create=True, model_id="gpt2", hidden_size=8)
    target.check()
    e = torch.randn(4, 8)
    with crash_on_version_insert(), pytest.raises(SimulatedCrash):
        target.register(e, meta={"epochs": 1})
    assert reg.list_tasks() == []
    assert target.register(e, meta={"epochs": 1})["version"] == 1
    t = reg.get_task("trained")
    assert t["base_model"] == "gpt2" and t["versions"][0]["source"] == "train"
    assert t["versions"][0]["meta"] == {"epochs": 1}
    assert target.register(e, meta={"epochs": 2})["version"] == 2  # an existing task gets a new version


def test_tasks_import_create_is_atomic(tiny_model_dir, tmp_path, capsys):
    folder = write_adapter_folder(tmp_path / "adapter", torch.randn(3, HIDDEN), base_model="tiny",
                                  num_layers=2, num_attention_heads=2)
    flags = ["--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir)]
    with crash_on_version_insert(), pytest.raises(SimulatedCrash):
        tasks_cli.main(["import", "imp", str(folder), *flags])
    reg = Registry(default_db_url(tmp_path / "data"), tmp_path / "data")
    try:
        assert reg.list_tasks() == []
        capsys.readouterr()
        assert tasks_cli.main(["import", "imp", str(folder), "--json", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["created"] is True and out["version"]["version"] == 1 and out["version"]["is_active"]
        assert out["version"]["meta"]["base_model_name_or_path"] == "tiny"
        assert reg.get_task("imp")["active_version"] == 1
    finally:
        reg.close()


def test_api_create_never_shows_a_task_without_prompt(client):
    """Every committed registry state seen from outside: no task without an active version."""
    rt = client.app.state.runtime
    seen: list[set[str]] = []

    def observe(_session):
        seen.append({n for n, (_, version, _) in rt.registry.active_index().items() if version is None})

    event.listen(Session, "after_commit", observe)
    try:
        r = client.post("/v1/tasks", json={"name": "observed", "num_virtual_tokens": 4})
    finally:
        event.remove(Session, "after_commit", observe)
    assert r.status_code == 201, r.text
    assert r.json()["active_version"] == 1
    assert seen and all(not s for s in seen), seen


def test_api_create_crash_leaves_nothing(client):
    with crash_on_version_insert(), pytest.raises(SimulatedCrash):
        client.post("/v1/tasks", json={"name": "crashed", "num_virtual_tokens": 4})
    assert_error(client.get("/v1/tasks/crashed"), 404)
    r = client.post("/v1/tasks", json={"name": "crashed", "num_virtual_tokens": 4})  # a retry is no 409
    assert r.status_code == 201, r.text
    assert r.json()["active_version"] == 1
    _reads_ok(client, "crashed")
