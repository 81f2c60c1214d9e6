"""HTTP API, admin side: tasks CRUD, prompt uploads (PEFT parity, validation), versions,
authorization, restart persistence. One app per module and database: the tests on `client`, the
restart and the concurrent duplicate creation run on SQLite and on PostgreSQL (`module_db_url`,
`db_url`: tests/conftest.py); separate small SQLite apps for auth."""

from __future__ import annotations

import io
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from server.app import create_app
from tests.apiutil import adapter_files, assert_error, config_bytes, greedy, make_peft_adapter, peft_greedy, settings

HIDDEN = 128  # the tiny fixture model's width
PROMPTS = ["Hello world, this is", "The quick brown fox", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    pm = make_peft_adapter(tiny_model_dir, folder, num_virtual_tokens=7)
    return folder, pm


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory, module_db_url):
    data = tmp_path_factory.mktemp("data-tasks")
    with TestClient(create_app(settings(tiny_model_dir, data, db=module_db_url))) as c:
        yield c


@pytest.fixture(scope="module")
def client2(tiny_model_dir, client, module_db_url):
    """A second server on `client`'s database and data folder (two replicas of one deployment)."""
    data = client.app.state.runtime.registry.data_dir
    with TestClient(create_app(settings(tiny_model_dir, data, db=module_db_url))) as c:
        yield c


@pytest.fixture(scope="module")
def base_id(tiny_model_dir) -> str:
    return Path(tiny_model_dir).resolve().name


@pytest.fixture(scope="module")
def uploaded(client, adapter):
    """Task 'peft-task' (initial 20-token prompt = v1) with the PEFT adapter uploaded as v2."""
    folder, _ = adapter
    r = client.post("/v1/tasks", json={"name": "peft-task", "description": "parity"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/tasks/peft-task/prompt", files=adapter_files(folder))
    assert r.status_code == 201, r.text
    return r.json()


def _task(client, name: str) -> dict:
    r = client.get(f"/v1/tasks/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def _ids(client, text: str) -> list[int]:
    return client.app.state.runtime.encode(text)


# ------------------------------------------------------------------ tasks CRUD

def test_create_task_defaults_and_servable(client, base_id):
    r = client.post("/v1/tasks", json={"name": "crud-a", "description": "first"})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == "crud-a" and t["description"] == "first"
    assert t["num_virtual_tokens"] == 20
    assert t["active_version"] == 1 and len(t["versions"]) == 1
    assert t["created_at"] and t["updated_at"]
    # servable at once, listed by /v1/models
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "crud-a" in ids and ids[0] == base_id
    out = greedy(client, "crud-a", "hi", max_tokens=3, ignore_eos=True)
    assert len(out["choices"][0]["token_ids"]) == 3


def test_create_task_options(client):
    for name, extra in [("crud-text", {"init": "text", "init_text": "Classify the sentiment:"}),
                        ("crud-vocab", {"init": "vocab", "num_virtual_tokens": 4}),
                        ("crud.b_1", {"num_virtual_tokens": 3, "init": "random"})]:
        r = client.post("/v1/tasks", json={"name": name, **extra})
        assert r.status_code == 201, r.text
        if "num_virtual_tokens" in extra:
            assert r.json()["num_virtual_tokens"] == extra["num_virtual_tokens"]
    assert client.post("/v1/tasks", json={"name": "crud-nt", "init": "text"}).status_code == 422


def test_create_duplicate_409(client):
    assert client.post("/v1/tasks", json={"name": "crud-dup"}).status_code == 201
    assert_error(client.post("/v1/tasks", json={"name": "crud-dup"}), 409, "crud-dup")


def test_concurrent_duplicate_create_one_201_one_409(client, client2):
    """Both replicas are asked to create the same task at the same moment, name after name: each
    time exactly one 201 and one 409 naming the task (never a 500, whichever check catches the
    loser: the existence check or the unique name at insert), and the task, made on one replica,
    is listed and goes live on both."""
    barrier = threading.Barrier(2)
    names = [f"race-{i}" for i in range(6)]
    for name in names:
        out: list = [None, None]

        def post(k: int, c) -> None:
            barrier.wait(30)
            out[k] = c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": 2})

        threads = [threading.Thread(target=post, args=(k, c)) for k, c in enumerate((client, client2))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert sorted(r.status_code for r in out) == [201, 409], [(r.status_code, r.text) for r in out]
        assert_error(next(r for r in out if r.status_code == 409), 409, name)
    for c in (client, client2):
        listed = {t["name"] for t in c.get("/v1/tasks", params={"q": "race-"}).json()["data"]}
        assert set(names) <= listed
        deadline = time.monotonic() + 30  # the other replica's tasks go live at its next registry poll
        while not set(names) <= {m["id"] for m in c.get("/v1/models").json()["data"]}:
            assert time.monotonic() < deadline, "a replica never served the tasks the other created"
            time.sleep(0.1)
        assert len(greedy(c, names[0], "hi", max_tokens=2, ignore_eos=True)["choices"][0]["token_ids"]) == 2
    for name in names:
        assert client.delete(f"/v1/tasks/{name}").status_code == 204


def test_create_base_model_id_409(client, base_id):
    assert_error(client.post("/v1/tasks", json={"name": base_id}), 409, base_id)


@pytest.mark.parametrize("name", ["Bad", "-x", ".x", "_x", "a" * 65, "", "a b", "a/b", "ünï"])
def test_create_bad_name_422(client, name):
    assert_error(client.post("/v1/tasks", json={"name": name}), 422)


def test_name_edges_ok(client):
    for name in ["a" * 64, "0start", "x"]:
        assert client.post("/v1/tasks", json={"name": name, "num_virtual_tokens": 1}).status_code == 201


def test_list_get_delete(client):
    assert client.post("/v1/tasks", json={"name": "crud-del", "num_virtual_tokens": 2}).status_code == 201
    r = client.get("/v1/tasks")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    names = [t["name"] for t in body["data"]]
    assert "crud-del" in names
    for t in body["data"]:
        assert {"name", "description", "num_virtual_tokens", "active_version", "versions",
                "created_at", "updated_at"} <= set(t)
    t = _task(client, "crud-del")
    assert t["num_virtual_tokens"] == 2 and t["active_version"] == 1
    assert_error(client.get("/v1/tasks/nope-nope"), 404, "nope-nope")

    r = client.delete("/v1/tasks/crud-del")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get("/v1/tasks/crud-del"), 404)
    assert_error(client.delete("/v1/tasks/crud-del"), 404)
    assert "crud-del" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    # no longer servable
    r = client.post("/v1/completions", json={"model": "crud-del", "prompt": "x", "max_tokens": 1})
    assert_error(r, 404, "crud-del")
    # the name is free again
    assert client.post("/v1/tasks", json={"name": "crud-del"}).status_code == 201


# ------------------------------------------------------------------ upload + PEFT parity

def test_upload_is_active_and_matches_peft(client, adapter, uploaded):
    _, pm = adapter
    assert uploaded["version"] == 2 and uploaded["num_virtual_tokens"] == 7
    t = _task(client, "peft-task")
    assert t["active_version"] == 2 and [v["version"] for v in t["versions"]] == [1, 2]
    for p in PROMPTS:
        want = peft_greedy(pm, _ids(client, p), 8)
        assert len(want) == 8, "fixture produced EOS; pick another prompt"
        got = greedy(client, "peft-task", p, 8)["choices"][0]
        assert got["token_ids"] == want, p
        assert got["finish_reason"] == "length"


def test_peft_parity_in_mixed_batch(client, adapter, uploaded, base_id):
    """Same tokens whatever shares the batch: other tasks, the base model, other lengths."""
    _, pm = adapter
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append({"task": "peft-task", "prompt": p, "max_tokens": 8, "temperature": 0})
        reqs.append({"task": base_id, "prompt": p * (i + 1), "max_tokens": 5, "temperature": 0})
        reqs.append({"task": "crud-a", "prompt": "z" * (3 + i), "max_tokens": 6, "temperature": 0})
    r = client.post("/v1/generate", json={"requests": reqs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    for i, p in enumerate(PROMPTS):
        assert res[3 * i]["task"] == "peft-task"
        assert res[3 * i]["token_ids"] == peft_greedy(pm, _ids(client, p), 8)


def _bad_upload(client, files, *needles):
    before = _task(client, "peft-task")
    err = assert_error(client.post("/v1/tasks/peft-task/prompt", files=files), 400, *needles)
    after = _task(client, "peft-task")
    assert after["active_version"] == before["active_version"]
    assert len(after["versions"]) == len(before["versions"])
    return err


def _st_file(data: bytes, field="adapter_model.safetensors"):
    return {field: (field, data, "application/octet-stream")}


def _torch_save_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.randn(7, HIDDEN)}, buf)
    return buf.getvalue()


def test_upload_wrong_hidden_size(client, uploaded):
    _bad_upload(client, _st_file(st_save({"prompt_embeddings": torch.randn(7, 64)})), "hidden", "64", "128")


def test_upload_wrong_shape(client, uploaded):
    _bad_upload(client, _st_file(st_save({"prompt_embeddings": torch.randn(2, 7, HIDDEN)})), "shape")


def test_upload_nan(client, uploaded):
    t = torch.randn(7, HIDDEN)
    t[3, 5] = float("nan")
    _bad_upload(client, _st_file(st_save({"prompt_embeddings": t})), "non-finite")
    t = torch.randn(7, HIDDEN)
    t[0, 0] = float("inf")
    _bad_upload(client, _st_file(st_save({"prompt_embeddings": t})), "non-finite")


def test_upload_not_safetensors(client, uploaded):
    g = torch.Generator().manual_seed(3)
    junk = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    _bad_upload(client, _st_file(junk), "safetensors")
    _bad_upload(client, _st_file(b"{}"), "safetensors")


def test_upload_pickled_refused(client, uploaded):
    data = _torch_save_bytes()
    _bad_upload(client, _st_file(data), "pickle")
    _bad_upload(client, _st_file(data, "adapter_model.bin"), "pickle")
    _bad_upload(client, _st_file(pickle.dumps({"prompt_embeddings": [1.0]})), "pickle")


def test_upload_missing_key(client, uploaded):
    _bad_upload(client, _st_file(st_save({"embeddings": torch.randn(7, HIDDEN)})), "prompt_embeddings")


def test_upload_missing_file_field(client, uploaded):
    _bad_upload(client, {"something.txt": ("something.txt", b"x", "text/plain")}, "adapter_model.safetensors")
    r = client.post("/v1/tasks/peft-task/prompt", json={"x": 1})
    assert_error(r, 400, "multipart")


def test_upload_config_mismatch(client, adapter, uploaded):
    folder, _ = adapter
    files = adapter_files(folder)
    files["adapter_config.json"] = ("adapter_config.json", config_bytes(folder, num_virtual_tokens=5),
                                    "application/json")
    _bad_upload(client, files, "num_virtual_tokens")
    files["adapter_config.json"] = ("adapter_config.json", config_bytes(folder, peft_type="LORA"),
                                    "application/json")
    _bad_upload(client, files, "PROMPT_TUNING")
    files["adapter_config.json"] = ("adapter_config.json", b"{not json", "application/json")
    _bad_upload(client, files, "json")


def test_upload_unknown_task_404(client, adapter):
    folder, _ = adapter
    assert_error(client.post("/v1/tasks/nope-nope/prompt", files=adapter_files(folder)), 404, "nope-nope")


def test_upload_without_config_and_new_length(client, uploaded):
    """Only the safetensors file; a different number of virtual tokens than before."""
    r = client.post("/v1/tasks", json={"name": "up-only", "num_virtual_tokens": 4})
    assert r.status_code == 201
    t = torch.randn(9, HIDDEN) * 0.3
    r = client.post("/v1/tasks/up-only/prompt", files=_st_file(st_save({"prompt_embeddings": t})))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2 and r.json()["num_virtual_tokens"] == 9
    t = _task(client, "up-only")
    assert t["active_version"] == 2 and t["num_virtual_tokens"] == 9
    assert greedy(client, "up-only", "abc", 2, ignore_eos=True)["usage"]["prompt_tokens"] == len(_ids(client, "abc"))


def test_activate_switches_versions(client, adapter, uploaded):
    _, pm = adapter
    p = PROMPTS[0]
    want_v2 = peft_greedy(pm, _ids(client, p), 8)
    v1_out = None
    try:
        r = client.post("/v1/tasks/peft-task/activate", json={"version": 1})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        t = _task(client, "peft-task")
        assert t["active_version"] == 1 and t["num_virtual_tokens"] == 20
        v1_out = greedy(client, "peft-task", p, 8, ignore_eos=True)["choices"][0]["token_ids"]
        assert v1_out != want_v2  # the 20-token random initial prompt, not the PEFT one
    finally:
        r = client.post("/v1/tasks/peft-task/activate", json={"version": 2})
        assert r.status_code == 200, r.text
    assert greedy(client, "peft-task", p, 8)["choices"][0]["token_ids"] == want_v2
    assert_error(client.post("/v1/tasks/peft-task/activate", json={"version": 99}), 404, "99")
    assert_error(client.post("/v1/tasks/nope-nope/activate", json={"version": 1}), 404)
    assert_error(client.post("/v1/tasks/peft-task/activate", json={"version": 0}), 422)
    t = _task(client, "peft-task")
    assert t["active_version"] == 2 and t["num_virtual_tokens"] == 7


# ------------------------------------------------------------------ the cap on virtual tokens

def _prompt_files(data_dir: Path) -> set[Path]:
    return {p for p in data_dir.rglob("*") if p.is_file() and p.suffix == ".safetensors"}


def test_upload_over_the_creation_cap_refused(client, uploaded):
    """A task is created with at most MAX_VIRTUAL_TOKENS (512) virtual tokens; an upload may
    change the count, but never beyond that: a 400 saying so, no version, no file written,
    also past the adapter parser's own bound (1024)."""
    from registry import MAX_VIRTUAL_TOKENS

    assert MAX_VIRTUAL_TOKENS == 512
    assert_error(client.post("/v1/tasks", json={"name": "cap-x", "num_virtual_tokens": 513}), 422)
    data_dir = client.app.state.runtime.registry.data_dir
    files_before = _prompt_files(data_dir)
    gen = client.app.state.runtime.registry.generation()
    for rows in (513, 1100):
        err = _bad_upload(client, _st_file(st_save({"prompt_embeddings": torch.randn(rows, HIDDEN)})),
                          f"{rows} virtual tokens", "maximum of 512")
        assert err["code"] == "invalid_adapter"
    assert _prompt_files(data_dir) == files_before and client.app.state.runtime.registry.generation() == gen
    r = client.post("/v1/tasks", json={"name": "cap-ok", "num_virtual_tokens": 1})
    assert r.status_code == 201, r.text
    r = client.post("/v1/tasks/cap-ok/prompt", files=_st_file(st_save({"prompt_embeddings":
                                                                        torch.randn(512, HIDDEN) * 0.1})))
    assert r.status_code == 201 and r.json()["num_virtual_tokens"] == 512, r.text
    assert client.delete("/v1/tasks/cap-ok").status_code == 204


# ------------------------------------------------------------------ a task's chat template

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


def test_chat_template_set_at_creation_and_shown(client):
    r = client.post("/v1/tasks", json={"name": "tpl-a", "num_virtual_tokens": 2, "chat_template": TEMPLATE})
    assert r.status_code == 201, r.text
    assert r.json()["chat_template"] == TEMPLATE == _task(client, "tpl-a")["chat_template"]
    assert client.app.state.runtime.tasks["tpl-a"].chat_template == TEMPLATE  # live at once
    assert client.post("/v1/tasks", json={"name": "tpl-none", "num_virtual_tokens": 2}).status_code == 201
    assert _task(client, "tpl-none")["chat_template"] is None  # none given: the server's
    listed = {t["name"]: t for t in client.get("/v1/tasks").json()["data"]}
    assert listed["tpl-a"]["chat_template"] == TEMPLATE and listed["tpl-none"]["chat_template"] is None


BAD_TEMPLATES = [("{% for m in messages %}", "TemplateSyntaxError"),  # does not compile
                 ("{{ raise_exception('this template takes no assistant turns') }}", "no assistant turns"),
                 ("{{ messages[7]['content'] }}", "UndefinedError"),
                 ("{{ 1 / 0 }}", "ZeroDivisionError"),
                 ("{% if false %}x{% endif %}", "empty text")]


@pytest.mark.parametrize("template,needle", BAD_TEMPLATES)
def test_bad_chat_template_refused_at_creation(client, template, needle):
    gen = client.app.state.runtime.registry.generation()
    body = {"name": "tpl-bad", "num_virtual_tokens": 2, "chat_template": template}
    err = assert_error(client.post("/v1/tasks", json=body), 400, "chat_template", "sample conversation", needle)
    assert err["code"] == "invalid_chat_template"
    assert_error(client.get("/v1/tasks/tpl-bad"), 404)  # nothing stored
    assert client.app.state.runtime.registry.generation() == gen


@pytest.mark.parametrize("value", ["", "x" * 65537, "a\x00b", 5, ["{{ x }}"]])
def test_chat_template_schema_errors_422(client, value):
    assert_error(client.post("/v1/tasks", json={"name": "tpl-422", "chat_template": value}), 422)
    assert client.post("/v1/tasks", json={"name": "tpl-422b", "num_virtual_tokens": 1}).status_code == 201
    assert_error(client.patch("/v1/tasks/tpl-422b", json={"chat_template": value}), 422)
    assert _task(client, "tpl-422b")["chat_template"] is None
    assert client.delete("/v1/tasks/tpl-422b").status_code == 204


def test_patch_chat_template(client):
    rt = client.app.state.runtime
    assert client.post("/v1/tasks", json={"name": "tpl-p", "num_virtual_tokens": 2}).status_code == 201
    created = _task(client, "tpl-p")
    r = client.patch("/v1/tasks/tpl-p", json={"chat_template": TEMPLATE})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["object"] == "task" and t["chat_template"] == TEMPLATE and t["updated_at"] >= created["updated_at"]
    assert t["versions"] == created["versions"]  # settings only: the prompt is untouched
    assert rt.tasks["tpl-p"].chat_template == TEMPLATE
    gen = rt.registry.generation()
    r = client.patch("/v1/tasks/tpl-p", json={})  # nothing sent: nothing changes
    assert r.status_code == 200 and r.json()["chat_template"] == TEMPLATE and rt.registry.generation() == gen
    for template, needle in BAD_TEMPLATES:  # refused, the stored one stays
        err = assert_error(client.patch("/v1/tasks/tpl-p", json={"chat_template": template}), 400, needle)
        assert err["code"] == "invalid_chat_template"
    assert _task(client, "tpl-p")["chat_template"] == TEMPLATE and rt.registry.generation() == gen
    r = client.patch("/v1/tasks/tpl-p", json={"chat_template": None})  # back to the server's
    assert r.status_code == 200 and r.json()["chat_template"] is None
    assert rt.tasks["tpl-p"].chat_template is None
    assert_error(client.patch("/v1/tasks/tpl-p", json={"description": "x"}), 422)  # not a setting here
    assert_error(client.patch("/v1/tasks/nope-nope", json={"chat_template": TEMPLATE}), 404, "nope-nope")
    assert_error(client.patch("/v1/tasks/nope-nope", json={"chat_template": "{% if %}"}), 404)


def test_chat_uses_the_task_template(client, base_id):
    """What the model sees: the task's template's text, exactly a completion of it; the base model
    and a task without one keep the default."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"messages": msgs, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    for name, extra in (("tpl-c", {"chat_template": TEMPLATE}), ("tpl-d", {})):
        r = client.post("/v1/tasks", json={"name": name, "num_virtual_tokens": 3, "seed": 4, **extra})
        assert r.status_code == 201, r.text
    default = "System: Be brief.\nUser: Hi\nAssistant:"
    rendered = {"tpl-c": "[system] Be brief.\n[user] Hi\n[assistant]", "tpl-d": default, base_id: default}
    for model, text in rendered.items():
        r = client.post("/v1/chat/completions", json={"model": model, **body})
        assert r.status_code == 200, r.text
        comp = greedy(client, model, text, 6, ignore_eos=True)
        assert r.json()["choices"][0]["token_ids"] == comp["choices"][0]["token_ids"], model
        assert r.json()["usage"]["prompt_tokens"] == comp["usage"]["prompt_tokens"] == len(_ids(client, text))


# ------------------------------------------------------------------ authorization

def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _completion(c, model, key):
    return c.post("/v1/completions", headers=_auth(key),
                  json={"model": model, "prompt": "hi", "max_tokens": 1})


def test_auth_both_keys(tiny_model_dir, tmp_path, base_id):
    s = settings(tiny_model_dir, tmp_path, api_key="user-key", admin_key="admin-key")
    with TestClient(create_app(s)) as c:
        # open endpoints
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        # user endpoints: either key
        for path in ("/v1/models", "/v1/tasks"):
            assert_error(c.get(path), 401)
            assert_error(c.get(path, headers=_auth("wrong")), 401)
            assert_error(c.get(path, headers={"Authorization": "user-key"}), 401)  # no Bearer scheme
            assert c.get(path, headers=_auth("user-key")).status_code == 200
            assert c.get(path, headers=_auth("admin-key")).status_code == 200
        err = assert_error(_completion(c, base_id, None), 401)
        assert err["type"] == "authentication_error"
        assert _completion(c, base_id, "user-key").status_code == 200
        assert _completion(c, base_id, "admin-key").status_code == 200
        r = c.post("/v1/generate", json={"requests": [{"task": base_id, "prompt": "x", "max_tokens": 1}]})
        assert_error(r, 401)
        # admin endpoints: admin key only; user key is 403
        assert_error(c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 2}), 401)
        assert_error(c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 2},
                            headers=_auth("wrong")), 401)
        err = assert_error(c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 2},
                                  headers=_auth("user-key")), 403)
        assert err["type"] == "permission_error"
        r = c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 2}, headers=_auth("admin-key"))
        assert r.status_code == 201
        assert c.get("/v1/tasks/t1", headers=_auth("user-key")).status_code == 200
        assert _completion(c, "t1", "user-key").status_code == 200
        assert_error(c.post("/v1/tasks/t1/activate", json={"version": 1}, headers=_auth("user-key")), 403)
        assert c.post("/v1/tasks/t1/activate", json={"version": 1}, headers=_auth("admin-key")).status_code == 200
        files = _st_file(st_save({"prompt_embeddings": torch.randn(2, HIDDEN)}))
        assert_error(c.post("/v1/tasks/t1/prompt", files=files, headers=_auth("user-key")), 403)
        assert c.post("/v1/tasks/t1/prompt", files=files, headers=_auth("admin-key")).status_code == 201
        assert_error(c.patch("/v1/tasks/t1", json={"chat_template": "x"}), 401)
        assert_error(c.patch("/v1/tasks/t1", json={"chat_template": "x"}, headers=_auth("user-key")), 403)
        r = c.patch("/v1/tasks/t1", json={"chat_template": "x"}, headers=_auth("admin-key"))
        assert r.status_code == 200 and r.json()["chat_template"] == "x", r.text
        assert_error(c.delete("/v1/tasks/t1"), 401)
        assert_error(c.delete("/v1/tasks/t1", headers=_auth("user-key")), 403)
        assert c.delete("/v1/tasks/t1", headers=_auth("admin-key")).status_code == 204


def test_auth_only_api_key(tiny_model_dir, tmp_path, base_id):
    s = settings(tiny_model_dir, tmp_path, api_key="user-key")
    with TestClient(create_app(s)) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert_error(c.get("/v1/models"), 401)
        assert_error(_completion(c, base_id, None), 401)
        assert _completion(c, base_id, "user-key").status_code == 200
        assert_error(c.post("/v1/tasks", json={"name": "t2", "num_virtual_tokens": 2}), 401)
        assert_error(c.post("/v1/tasks", json={"name": "t2", "num_virtual_tokens": 2},
                            headers=_auth("other")), 401)
        r = c.post("/v1/tasks", json={"name": "t2", "num_virtual_tokens": 2}, headers=_auth("user-key"))
        assert r.status_code == 201
        assert c.delete("/v1/tasks/t2", headers=_auth("user-key")).status_code == 204


def test_auth_only_admin_key(tiny_model_dir, tmp_path, base_id):
    s = settings(tiny_model_dir, tmp_path, admin_key="admin-key")
    with TestClient(create_app(s)) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/tasks").status_code == 200
        assert _completion(c, base_id, None).status_code == 200
        assert _completion(c, base_id, "anything").status_code == 200
        assert_error(c.post("/v1/tasks", json={"name": "t3", "num_virtual_tokens": 2}), 401)
        assert_error(c.post("/v1/tasks", json={"name": "t3", "num_virtual_tokens": 2},
                            headers=_auth("wrong")), 401)
        r = c.post("/v1/tasks", json={"name": "t3", "num_virtual_tokens": 2}, headers=_auth("admin-key"))
        assert r.status_code == 201
        assert _completion(c, "t3", None).status_code == 200
        assert_error(c.delete("/v1/tasks/t3"), 401)
        assert c.delete("/v1/tasks/t3", headers=_auth("admin-key")).status_code == 204


# ------------------------------------------------------------------ restart persistence

def test_restart_keeps_tasks_versions_and_outputs(tiny_model_dir, tmp_path, adapter, db_url):
    folder, pm = adapter
    s = settings(tiny_model_dir, tmp_path / "data", db=db_url)
    with TestClient(create_app(s)) as c:
        assert c.post("/v1/tasks", json={"name": "keep", "description": "kept"}).status_code == 201
        assert c.post("/v1/tasks/keep/prompt", files=adapter_files(folder)).status_code == 201
        assert c.post("/v1/tasks", json={"name": "keep2", "num_virtual_tokens": 3}).status_code == 201
        before_tasks = c.get("/v1/tasks").json()["data"]
        before = {p: greedy(c, "keep", p, 8)["choices"][0]["token_ids"] for p in PROMPTS}
        before2 = greedy(c, "keep2", "abc", 6, ignore_eos=True)["choices"][0]["token_ids"]
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "data", db=db_url))) as c:
        after_tasks = c.get("/v1/tasks").json()["data"]
        # the listing is non-trivial (two empty lists would compare equal) and identical field for field,
        # timestamps and prompt hashes included: a restart reads the registry, it does not rewrite it
        assert sorted(t["name"] for t in before_tasks) == ["keep", "keep2"]
        assert {t["name"]: t["active_version"] for t in before_tasks} == {"keep": 2, "keep2": 1}
        assert after_tasks == before_tasks
        keep = _task(c, "keep")
        assert keep["description"] == "kept" and keep["active_version"] == 2
        assert [v["version"] for v in keep["versions"]] == [1, 2]
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} >= {"keep", "keep2"}
        for p in PROMPTS:
            got = greedy(c, "keep", p, 8)["choices"][0]["token_ids"]
            assert got == before[p] == peft_greedy(pm, c.app.state.runtime.encode(p), 8)
        assert greedy(c, "keep2", "abc", 6, ignore_eos=True)["choices"][0]["token_ids"] == before2


def test_delete_lets_running_requests_finish(client):
    """DELETE while a request of the task runs: that request still completes normally, with
    every token, computed on the deleted task's prompt to the end."""
    import threading
    import time

    task = {"name": "del-live", "num_virtual_tokens": 4, "seed": 11}
    n = 600  # ~2 s of decoding on the tiny model; a DELETE takes milliseconds
    body = {"model": "del-live", "prompt": "go", "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    assert client.post("/v1/tasks", json=task).status_code == 201
    rt = client.app.state.runtime
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", client.post("/v1/completions", json=body)))
    th.start()
    deadline = time.monotonic() + 30
    while rt.engine.num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert rt.engine.num_running == 1, "the request never started running"
    assert client.delete("/v1/tasks/del-live").status_code == 204
    # the request was running before the DELETE and is still running after it returned
    still_running = th.is_alive() and rt.engine.num_running == 1
    th.join(120)
    r = box["r"]
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["completion_tokens"] == n and choice["finish_reason"] == "length"
    assert still_running, "the request finished before the DELETE was answered: the test proves nothing"
    assert_error(client.post("/v1/completions", json={"model": "del-live", "prompt": "go"}), 404)
    # the same task made again (same seed: the same initial prompt) gives the same tokens: the running
    # request kept the deleted version's prompt to its last token
    assert client.post("/v1/tasks", json=task).status_code == 201
    again = client.post("/v1/completions", json=body)
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == choice["token_ids"]
    assert client.delete("/v1/tasks/del-live").status_code == 204
