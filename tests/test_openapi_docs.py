"""The OpenAPI document tells the truth about each route's answers; /docs works offline; no slash
redirects. The fuzzed counterpart is test_schemathesis.py; these are the cases a fuzzer does not reach
(keys, oversized bodies) and the docs page itself."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from server.app import create_app
from tests.apiutil import assert_error, settings

USER, ADMIN = "user-key", "admin-key"
OPEN_ROUTES = {("get", "/health"), ("get", "/metrics")}
ADMIN_ROUTES = {("post", "/v1/tasks"), ("patch", "/v1/tasks/{name}"), ("delete", "/v1/tasks/{name}"),
                ("post", "/v1/tasks/{name}/prompt"), ("post", "/v1/tasks/{name}/activate")}
# engine work: 500 (its row failed), 408 (its own timeout), 503 overload
GENERATION_PATHS = ("/v1/completions", "/v1/generate", "/v1/chat/completions", "/v1/score")
BODY_LIMIT = 4096  # bytes; max_body_mb of the keyed app


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tmp_path_factory):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path_factory.mktemp("data-docs")))) as c:
        assert c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 4}).status_code == 201
        yield c


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    s = settings(tiny_model_dir, tmp_path_factory.mktemp("data-docs-keys"), api_key=USER, admin_key=ADMIN,
                 max_body_mb=BODY_LIMIT / (1 << 20))
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/tasks", json={"name": "t1", "num_virtual_tokens": 4}, headers=_auth(ADMIN))
        assert r.status_code == 201, r.text
        yield c


@pytest.fixture(scope="module")
def doc(plain) -> dict:
    r = plain.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _operations(doc: dict):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def _documented(doc: dict, method: str, path: str, r) -> None:
    """`r` is one of the answers documented for this operation, with the documented media type; an
    error is in the error shape."""
    responses = doc["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, (method, path, r.status_code, sorted(responses), r.text)
    content = responses[str(r.status_code)].get("content", {})
    media = r.headers.get("content-type", "").split(";")[0]
    if r.status_code != 204:
        assert media in content, (method, path, r.status_code, media, sorted(content))
    if r.status_code >= 400:
        assert_error(r, r.status_code)
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


# ------------------------------------------------------------------ no slash redirects

@pytest.mark.parametrize("method,path", [("get", "/v1/tasks/"), ("get", "/v1/models/"), ("get", "/health/"),
                                         ("post", "/v1/completions/"), ("delete", "/v1/tasks/t1/")])
def test_trailing_slash_is_a_plain_404(plain, keyed, method, path):
    for client in (plain, keyed):
        r = client.request(method, path, headers={"Host": "attacker.example"}, follow_redirects=False)
        assert "location" not in r.headers, r.headers
        assert "attacker" not in r.text
        err = assert_error(r, 404)
        assert err["type"] == "invalid_request_error"


def test_slashless_paths_still_answer(keyed):
    assert keyed.get("/v1/tasks", headers=_auth(USER)).status_code == 200
    assert_error(keyed.get("/v1/tasks"), 401)


# ------------------------------------------------------------------ the document

def test_every_error_response_uses_the_error_model(doc):
    assert "HTTPValidationError" not in str(doc) and "ValidationError" not in doc["components"]["schemas"]
    err = doc["components"]["schemas"]["ErrorDetail"]
    assert set(err["required"]) == {"message", "type", "code"}
    for method, path, op in _operations(doc):
        for status, resp in op["responses"].items():
            if int(status) >= 400:
                schema = resp["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)


def test_documented_statuses_per_route(doc):
    for method, path, op in _operations(doc):
        got = {int(s) for s in op["responses"]}
        assert 503 in got, (method, path)  # every route refuses while draining
        if (method, path) not in OPEN_ROUTES:
            assert 401 in got, (method, path)
        assert (403 in got) == ((method, path) in ADMIN_ROUTES), (method, path)
        if "requestBody" in op:
            assert {413, 422} <= got, (method, path)
        assert (500 in got) == (408 in got) == (path in GENERATION_PATHS), (method, path)
    for path in GENERATION_PATHS:
        op = doc["paths"][path]["post"]
        assert {400, 404} <= {int(s) for s in op["responses"]}
        assert "Retry-After" in op["responses"]["503"]["headers"]
    assert "text/event-stream" in doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert 409 in {int(s) for s in doc["paths"]["/v1/tasks"]["post"]["responses"]}
    upload = doc["paths"]["/v1/tasks/{name}/prompt"]["post"]
    assert "adapter_model.safetensors" in upload["requestBody"]["content"]["multipart/form-data"]["schema"]["required"]


def test_auth_answers_are_documented(keyed, doc):
    """Every operation, asked without a key and with the user key, answers something it documents."""
    for method, path, _ in _operations(doc):
        url = path.format(name="t1")
        anon = keyed.request(method, url)
        _documented(doc, method, path, anon)
        if (method, path) not in OPEN_ROUTES:
            assert anon.status_code == 401, (method, path, anon.text)
        user = keyed.request(method, url, headers=_auth(USER))
        _documented(doc, method, path, user)
        if (method, path) in ADMIN_ROUTES:
            assert user.status_code == 403, (method, path, user.text)


def test_error_answers_are_documented(keyed, doc):
    """One request per documented error the fuzzer cannot reach or rarely does, answered as documented."""
    admin, user = _auth(ADMIN), _auth(USER)
    big = {"model": "t1", "prompt": "x" * (2 * BODY_LIMIT)}
    cases = [
        ("post", "/v1/completions", dict(json=big, headers=user), 413),
        ("post", "/v1/generate", dict(json={"requests": [{"task": "t1", "prompt": "x" * 2 * BODY_LIMIT}]},
                                      headers=user), 413),
        ("post", "/v1/tasks", dict(json={"name": "t2", "description": "d" * 2 * BODY_LIMIT}, headers=admin), 413),
        ("post", "/v1/completions", dict(json={"model": "nope", "prompt": "hi"}, headers=user), 404),
        ("post", "/v1/completions", dict(json={"model": "t1", "prompt": "hi", "max_tokens": 5000}, headers=user),
         400),
        ("post", "/v1/completions", dict(json={"model": "t1", "prompt": "hi", "max_tokens": 0}, headers=user), 422),
        ("post", "/v1/generate", dict(json={"requests": [{"task": "t1", "prompt": [10 ** 6]}]}, headers=user), 400),
        ("post", "/v1/tasks", dict(json={"name": "t1"}, headers=admin), 409),
        ("post", "/v1/tasks", dict(json={"name": "Bad Name"}, headers=admin), 422),
        ("get", "/v1/tasks/{name}", dict(headers=user), 404),
        ("delete", "/v1/tasks/{name}", dict(headers=admin), 404),
        ("post", "/v1/tasks/{name}/activate", dict(json={"version": 1}, headers=admin), 404),
        ("post", "/v1/tasks/{name}/prompt", dict(files={"adapter_model.safetensors": ("a", b"junk")},
                                                 headers=admin), 404),
    ]
    for method, path, kw, status in cases:
        r = keyed.request(method, path.format(name="nope"), **kw)
        assert r.status_code == status, (method, path, status, r.text)
        _documented(doc, method, path, r)
    r = keyed.post("/v1/tasks/t1/prompt", files={"adapter_model.safetensors": ("a", b"junk")}, headers=admin)
    assert r.status_code == 400, r.text
    _documented(doc, "post", "/v1/tasks/{name}/prompt", r)
    r = keyed.post("/v1/completions", json={"model": "t1", "prompt": "hi", "max_tokens": 2, "stream": True},
                   headers=user)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    _documented(doc, "post", "/v1/completions", r)


def test_success_answers_are_documented(keyed, doc):
    """The fuzzer cannot make a valid adapter file; here every operation's success answer is checked."""
    admin = _auth(ADMIN)
    weights = save({"prompt_embeddings": torch.randn(3, 128, generator=torch.Generator().manual_seed(0))})
    cases = [
        ("post", "/v1/tasks", "", dict(json={"name": "t3", "num_virtual_tokens": 2}), 201),
        ("post", "/v1/tasks/{name}/prompt", "t3", dict(files={"adapter_model.safetensors": ("w", weights)}), 201),
        ("post", "/v1/tasks/{name}/activate", "t3", dict(json={"version": 1}), 200),
        ("get", "/v1/tasks/{name}", "t3", {}, 200),
        ("get", "/v1/tasks", "", {}, 200),
        ("get", "/v1/models", "", {}, 200),
        ("get", "/health", "", {}, 200),
        ("get", "/metrics", "", {}, 200),
        ("post", "/v1/completions", "", dict(json={"model": "t3", "prompt": "hi", "max_tokens": 2}), 200),
        ("post", "/v1/generate", "", dict(json={"requests": [{"task": "t3", "prompt": "hi", "max_tokens": 2}]}), 200),
        ("delete", "/v1/tasks/{name}", "t3", {}, 204),
    ]
    for method, path, name, kw, status in cases:
        r = keyed.request(method, path.format(name=name), headers=admin, **kw)
        assert r.status_code == status, (method, path, r.text)
        _documented(doc, method, path, r)


# ------------------------------------------------------------------ /docs offline

def test_docs_page_uses_only_local_files(plain):
    r = plain.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html, html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(refs) == 3, refs  # css, favicon, bundle
    assert all(u.startswith("/static/swagger/") for u in refs), refs
    assert "url: '/openapi.json'" in html
    assert '"validatorUrl": null' in html  # no badge fetched from swagger.io
    sizes = {}
    for u in refs:
        a = plain.get(u)
        assert a.status_code == 200, u
        sizes[u.rsplit("/", 1)[1]] = (len(a.content), a.headers["content-type"])
    assert sizes["swagger-ui-bundle.js"][0] > 500_000 and "javascript" in sizes["swagger-ui-bundle.js"][1]
    assert sizes["swagger-ui.css"][0] > 50_000 and sizes["swagger-ui.css"][1].startswith("text/css")
    assert plain.get("/static/swagger/LICENSE").status_code == 200


def test_docs_honour_root_path(plain):
    """Behind a proxy that strips a prefix, the page asks for its files under that prefix."""
    c = TestClient(plain.app, root_path="/pp")
    html = c.get("/docs").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(u.startswith("/pp/static/swagger/") for u in refs), refs
    assert "url: '/pp/openapi.json'" in html


def test_redoc_is_off(plain):
    assert_error(plain.get("/redoc"), 404)


def test_docs_and_schema_need_no_key(keyed):
    assert keyed.get("/docs").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200
    assert keyed.get("/static/swagger/swagger-ui.css").status_code == 200
