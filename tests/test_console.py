"""The operator console (/console): the API it adds (paged task list, /v1/auth), its packaged files,
and the console itself in a real browser — Playwright driving Debian's chromium against a real
`polyprompt serve`: create a task, upload an adapter, stream two tasks side by side, roll a version
back and see the answer change, see a chart move under load, 2,000 tasks paged, keys and roles.
No browser errors allowed; screenshots go to $POLYPROMPT_TEST_ARTIFACTS (or a pytest temp folder)."""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from registry import Registry, store
from registry.files import write_prompt_file
from registry.models import PromptVersion, Task
from registry.paths import default_db_url
from server.api.console import CONSOLE_DIR
from server.app import create_app
from tests.apiutil import assert_error, make_peft_adapter, settings
from tests.serverutil import free_port, running_server

CHROMIUM = os.environ.get("POLYPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parent.parent
PROMPT, MAX_TOKENS = "Hello world, this is", 12
N_BULK = 2000
USER_KEY, ADMIN_KEY = "console-user-key", "console-admin-key"


# ------------------------------------------------------------------ the API the console adds (no browser)

@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path_factory.mktemp("data-console")))) as c:
        for i, desc in enumerate(["Sentiment of reviews", "news SUMMARY", "100% literal", "plain", "plain",
                                  "under_score", "x"]):
            assert c.post("/v1/tasks", json={"name": f"p-{i:02d}", "description": desc,
                                             "num_virtual_tokens": 2}).status_code == 201
        yield c


def test_task_list_pages_in_order_and_counts(client):
    body = client.get("/v1/tasks").json()
    assert set(body) == {"object", "data"} and len(body["data"]) == 7  # no paging parameter: as it always was
    full, pages, offset = body["data"], [], 0
    while True:
        r = client.get("/v1/tasks", params={"limit": 3, "offset": offset})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == 7 and body["limit"] == 3 and body["offset"] == offset
        assert body["has_more"] == (offset + 3 < 7)
        pages += body["data"]
        if not body["has_more"]:
            break
        offset += 3
    assert pages == full  # same tasks, same order, same fields (versions included)
    assert client.get("/v1/tasks", params={"offset": 100}).json() | {"data": None} == {
        "object": "list", "data": None, "total": 7, "limit": 50, "offset": 100, "has_more": False}


@pytest.mark.parametrize("q,names", [("summary", ["p-01"]), ("SENT", ["p-00"]),
                                     ("p-0", [f"p-{i:02d}" for i in range(7)]), ("%", ["p-02"]), ("_", ["p-05"]),
                                     ("plain", ["p-03", "p-04"]), ("zz", [])])
def test_task_list_search(client, q, names):
    body = client.get("/v1/tasks", params={"q": q, "limit": 5}).json()
    assert [t["name"] for t in body["data"]] == names[:5] and body["total"] == len(names), body


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "x"}, {"q": "a" * 201},
                                    {"q": "a\x00b"}])
def test_task_list_bad_paging_params_422(client, params):
    assert_error(client.get("/v1/tasks", params=params), 422)


def test_auth_role(tiny_model_dir, tmp_path):
    """/v1/auth answers with the same rules the routes enforce (see deps.py)."""
    def roles(**keys):
        app = create_app(settings(tiny_model_dir, tmp_path / str(len(keys)) / "_".join(keys), **keys))
        with TestClient(app) as c:
            def role(key):
                r = c.get("/v1/auth", headers={"Authorization": f"Bearer {key}"} if key else {})
                return r.json()["role"] if r.status_code == 200 else r.status_code
            return [role(k) for k in (None, "wrong", USER_KEY, ADMIN_KEY)]

    assert roles() == ["admin"] * 4
    assert roles(api_key=USER_KEY, admin_key=ADMIN_KEY) == [401, 401, "user", "admin"]
    assert roles(admin_key=ADMIN_KEY) == ["user", "user", "user", "admin"]  # user routes open
    assert roles(api_key=USER_KEY) == [401, 401, "admin", 401]  # the one key is also the admin key


def test_new_routes_are_documented(client):
    """The rules tests/test_openapi_docs.py holds every route to, for the two routes the console adds."""
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(doc) and not any(p.startswith("/console") for p in doc["paths"])
    auth = doc["paths"]["/v1/auth"]["get"]["responses"]
    listing = doc["paths"]["/v1/tasks"]["get"]
    assert {"200", "401", "503"} <= set(auth) and "403" not in auth
    assert {"200", "401", "422", "503"} <= set(listing["responses"]) and "403" not in listing["responses"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "offset", "q"}
    for status, resp in [*auth.items(), *listing["responses"].items()]:
        if int(status) >= 400:
            assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def _module_imports(text: str) -> set[str]:
    return set(re.findall(r'^\s*import\s[^;]*?from\s+"\./([^"]+)";', text, re.M | re.S))


def test_console_page_and_files(client):
    r = client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"#]+)"', r.text)
    assert refs and all(u.startswith("/console/static/") for u in refs), refs
    assert client.get("/console/").text == r.text
    # every module reachable from app.js is served as JavaScript; nothing anywhere loads from elsewhere
    todo, seen = ["app.js"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        a = client.get(f"/console/static/{name}")
        assert a.status_code == 200 and "javascript" in a.headers["content-type"], name
        todo += _module_imports(a.text)
    assert {"api.js", "tasks.js", "playground.js", "metrics.js", "chart.js", "prom.js", "live.js"} <= seen
    for f in CONSOLE_DIR.iterdir():
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", f.read_text()), f"{f.name} refers to another site"
    html = TestClient(client.app, root_path="/pp").get("/console").text
    assert 'data-root="/pp"' in html and 'src="/pp/console/static/app.js"' in html


def test_console_files_are_packaged():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project runs on 3.10)
    assert re.search(r'^server = \[[^\]]*"console/\*"', text, re.M), "server/console/* is not package data"
    assert all(f.is_file() for f in CONSOLE_DIR.iterdir()), "console/* does not package subfolders"
    assert re.search(r'^test = \[[^\]]*"playwright', text, re.M), "playwright is not in the test extra"


# ------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = ("the Python package playwright is not installed (pip install -e '.[test]')" if sync_playwright is None
               else None if Path(CHROMIUM).exists() else f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    if missing:  # loud: a warning in the summary and the reason on the skip, never a silent pass
        msg = f"BROWSER TESTS OF THE CONSOLE SKIPPED: {missing}"
        warnings.warn(msg)
        pytest.skip(msg)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("POLYPROMPT_TEST_ARTIFACTS") or tmp_path_factory.mktemp("console-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Console:
    """One browser tab on the console: records every browser error, writes screenshots."""

    def __init__(self, browser, url: str, artifacts: Path, capsys):
        self.url, self.artifacts, self.capsys = url, artifacts, capsys
        self.context = browser.new_context(viewport={"width": 1440, "height": 960})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.expected: list[re.Pattern] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _console(self, m):
        if m.type == "error" and not any(p.search(f"{m.text} @ {m.location.get('url', '')}") for p in self.expected):
            self.errors.append(f"console.error: {m.text} @ {m.location}")

    def go(self, fragment: str):
        self.page.goto(f"{self.url}/console#/{fragment}")

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        with self.capsys.disabled():
            print(f"\n[console screenshot] {path}")
        return path

    def close(self):
        self.context.close()
        assert not self.errors, "errors in the browser:\n" + "\n".join(self.errors)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-console-e2e")
    with running_server(tiny_model_dir, data, "--device", "cpu", "--dtype", "float32", "--max-batch-size", "16",
                        "--kv-cache-gb", "0.25", "--prefix-cache-mb", "64") as url:
        yield url, data


@pytest.fixture
def console(browser, server, artifacts, capsys):
    c = Console(browser, server[0], artifacts, capsys)
    yield c
    c.close()


def _greedy(url: str, task: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": task, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                  "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _create_in_ui(c: Console, name: str, description: str, init: str = "random"):
    c.go("tasks")
    c.page.click("#new-task")
    c.page.fill("#new-name", name)
    c.page.fill("#new-desc", description)
    c.page.select_option("#new-init", init)
    c.page.click("#create-submit")
    c.page.wait_for_url(f"**/console#/tasks/{name}")
    c.page.wait_for_selector('#versions tr[data-version="1"] .badge-active')


def _run_playground(c: Console, tasks: list[str]) -> dict[str, str]:
    """Run the prompt on `tasks` in the playground; their answers, checked to have left together."""
    sent, done = [], []
    on_req = lambda r: sent.append(time.monotonic()) if r.url.endswith("/v1/completions") else None  # noqa: E731
    on_done = lambda r: done.append(time.monotonic()) if r.url.endswith("/v1/completions") else None  # noqa: E731
    c.page.on("request", on_req)
    c.page.on("requestfinished", on_done)
    c.page.click("#run")
    for t in tasks:
        c.page.wait_for_selector(f'.out[data-task="{t}"][data-state="done"]')
    c.page.wait_for_function("() => !document.querySelector('#run').disabled")
    c.page.remove_listener("request", on_req)
    c.page.remove_listener("requestfinished", on_done)
    assert len(sent) == len(tasks) == len(done), (sent, done)
    assert max(sent) < min(done), "a task's request left only after another had finished: not one batch"
    out = {}
    for t in tasks:
        card = c.page.locator(f'.out[data-task="{t}"]')
        assert card.locator('[data-finish="length"]').count() == 1
        assert card.locator(".out-stats").inner_text().startswith(f"{MAX_TOKENS} tokens")
        out[t] = card.locator(".completion").text_content()
    return out


@pytest.mark.slow
def test_console_end_to_end(console, server, tiny_model_dir, tmp_path):
    c, (url, _) = console, server
    c.go("tasks")
    c.page.wait_for_selector("text=No tasks yet")
    c.shot("01-tasks-empty")

    _create_in_ui(c, "alpha", "Greets people warmly")
    folder = tmp_path / "adapter"
    make_peft_adapter(tiny_model_dir, folder, num_virtual_tokens=7, seed=1)
    c.page.click("#upload")
    c.page.set_input_files("#adapter-files", [str(folder / "adapter_model.safetensors"),
                                              str(folder / "adapter_config.json")])
    c.page.click("#upload-submit")
    c.page.wait_for_selector('#versions tr[data-version="2"] .badge-active')
    assert "7 × 128" in c.page.locator('#versions tr[data-version="2"]').inner_text()
    c.shot("02-task-versions")
    _create_in_ui(c, "beta", "Answers in French", init="vocab")

    c.go("playground")
    for name in ("alpha", "beta"):
        c.page.fill("#task-picker", name[:3])
        c.page.click(f'#picker-list li[data-name="{name}"]')
        c.page.wait_for_selector(f'#picked .chip[data-task="{name}"]')
    c.page.fill("#pg-prompt", PROMPT)
    c.page.fill("#pg-max_tokens", str(MAX_TOKENS))
    c.page.fill("#pg-temperature", "0")
    c.page.check("#pg-ignore-eos")
    v2 = _run_playground(c, ["alpha", "beta"])
    assert v2 == {"alpha": _greedy(url, "alpha"), "beta": _greedy(url, "beta")}  # the streams, token for token
    assert v2["alpha"] and v2["beta"] and v2["alpha"] != v2["beta"]
    c.shot("03-playground-two-tasks")

    c.go("tasks/alpha")
    c.page.click('#versions [data-activate="1"]')  # roll back to the initial prompt
    c.page.wait_for_selector('#versions tr[data-version="1"] .badge-active')
    c.shot("04-rolled-back")
    c.go("playground")  # the picked tasks, prompt and settings are kept
    c.page.wait_for_selector('#picked .chip[data-task="alpha"] .chip-ver:text("v1")')
    v1 = _run_playground(c, ["alpha", "beta"])
    assert v1["alpha"] != v2["alpha"] and v1["beta"] == v2["beta"]
    assert v1["alpha"] == _greedy(url, "alpha")

    c.go("metrics")
    c.page.wait_for_selector("#metrics-status:has-text('updated')")
    before = c.page.locator("#chart-throughput .chart").get_attribute("data-points")
    stop = threading.Event()
    load = threading.Thread(target=_load, args=(url, ["alpha", "beta"], stop), daemon=True)
    load.start()
    try:
        c.page.wait_for_function("() => Number(document.querySelector('#chart-throughput .chart').dataset.last) > 0")
        c.page.wait_for_selector("#task-rates td:has-text('alpha')")
        c.page.click('[data-window="60"]')  # the last minute fills the width
        c.page.wait_for_timeout(3000)
        c.shot("05-metrics-under-load")
    finally:
        stop.set()
        load.join(30)
    assert int(c.page.locator("#chart-throughput .chart").get_attribute("data-points")) > int(before)

    _create_in_ui(c, "doomed", "to be deleted")
    c.page.click("#delete-task")
    c.page.click("#confirm-delete")
    c.page.wait_for_url("**/console#/tasks")
    c.page.wait_for_selector('#task-table tr[data-task="beta"]')
    assert c.page.locator('#task-table tr[data-task="doomed"]').count() == 0
    assert httpx.get(f"{url}/v1/tasks/doomed").status_code == 404


def _load(url: str, tasks: list[str], stop: threading.Event):
    """Streams of completions on `tasks`, 4 at a time, until `stop`."""
    def worker(i: int):
        with httpx.Client(timeout=60) as h:
            while not stop.is_set():
                h.post(f"{url}/v1/completions", json={"model": tasks[i % len(tasks)], "prompt": PROMPT,
                                                      "max_tokens": 48, "ignore_eos": True, "temperature": 0.8})
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


PROM_TEXT = r"""# HELP polyprompt_requests_total Finished requests.
polyprompt_requests_total{task="a\\\"b",finish_reason="stop"} 3
polyprompt_requests_total{task="",finish_reason="length"} 2
polyprompt_generation_tokens_total 40 1700000000000
polyprompt_queue_depth 1.5e1
polyprompt_time_to_first_token_seconds_bucket{le="1.0"} 6
polyprompt_time_to_first_token_seconds_bucket{le="0.1"} 2
polyprompt_time_to_first_token_seconds_bucket{le="+Inf"} 8
polyprompt_time_to_first_token_seconds_sum 3.5
polyprompt_time_to_first_token_seconds_count 8
"""


@pytest.mark.slow
def test_console_parses_prometheus_text(console):
    """The console's own parser (prom.js) in the browser: escapes, exponents, timestamps, quantiles."""
    c = console
    c.go("metrics")
    got = c.page.evaluate("""async (text) => {
        const m = await import(`${document.documentElement.dataset.root}/console/static/prom.js`);
        const samples = m.parseProm(text), s = m.summarize(samples);
        const h = (c) => ({ buckets: [[0.1, c[0]], [1, c[1]], [Infinity, c[2]]] });
        const [zero, now] = [h([0, 0, 0]), s.hist.ttft];
        return { tasks: [...s.byTask.entries()], requests: s.requests, gen: s.gauges.generation_tokens_total,
                 queue: s.gauges.queue_depth, n: samples.length, p50: m.quantileBetween(zero, now, 0.5),
                 p99: m.quantileBetween(zero, now, 0.99), none: m.quantileBetween(now, now, 0.5),
                 sum: now.sum, count: now.count };
    }""", PROM_TEXT)
    assert got["tasks"] == [['a\\"b', 3], ["(base model)", 2]] and got["requests"] == 5
    assert (got["gen"], got["queue"], got["n"], got["sum"], got["count"]) == (40, 15, 9, 3.5, 8)
    assert got["p50"] == pytest.approx(0.1 + 0.9 * (4 - 2) / 4)  # rank 4 of 8, in the (0.1, 1] bucket (sorted)
    assert got["p99"] == 1.0 and got["none"] is None  # in +Inf: the highest finite bound; nothing observed


def _bulk_register(data: Path, base_model: str, n: int) -> None:
    """`n` tasks in one transaction through the registry (the HTTP route one by one would take minutes)."""
    reg = Registry(default_db_url(data), data)
    g = torch.Generator().manual_seed(0)
    files = [(4 + i, *write_prompt_file(data, torch.randn(4 + i, 128, generator=g) * 0.3)) for i in range(4)]
    names = [f"bulk-{i:05d}" for i in range(n)]
    try:
        with reg._session() as s, s.begin():
            s.execute(insert(Task), [dict(name=x, description=f"bulk task number {i}", hidden_size=128,
                                          num_virtual_tokens=files[i % 4][0], base_model=base_model)
                                     for i, x in enumerate(names)])
            ids = dict(s.execute(select(Task.name, Task.id).where(Task.name.in_(names))).all())
            s.execute(insert(PromptVersion), [
                dict(task_id=ids[x], version=1, is_active=True, sha256=files[i % 4][1], path=files[i % 4][2],
                     num_virtual_tokens=files[i % 4][0], hidden_size=128, base_model=base_model, source="bulk", meta={})
                for i, x in enumerate(names)])
            store.bump_generation(s)
    finally:
        reg.close()


@pytest.mark.slow
def test_console_two_thousand_tasks(console, server, tiny_model_dir):
    c, (url, data) = console, server
    _bulk_register(data, Path(tiny_model_dir).resolve().name, N_BULK)
    deadline = time.time() + 30
    while httpx.get(f"{url}/health").json()["tasks"] < N_BULK and time.time() < deadline:
        time.sleep(0.2)
    full = len(httpx.get(f"{url}/v1/tasks").content)
    lists = []
    c.page.on("response", lambda r: lists.append((r.url, len(r.body()))) if "/v1/tasks?" in r.url else None)
    t0 = time.perf_counter()
    c.go("tasks")
    c.page.wait_for_selector("#task-table tbody tr")
    wall = time.perf_counter() - t0
    in_page = c.page.evaluate("() => window.__ppFirstRows")
    total = c.page.locator("#page-info").inner_text()
    with c.capsys.disabled():
        print(f"\n[console] {N_BULK}+ tasks: first rows {wall * 1e3:.0f} ms after navigation (in-page "
              f"{in_page:.0f} ms); page request {lists[0][1]} bytes vs {full} for the whole list")
    assert re.fullmatch(r"1–50 of 2,\d{3}", total), total
    assert len(lists) == 1 and "limit=50" in lists[0][0], lists  # one page of tasks, not the list
    assert lists[0][1] < full / 20 and lists[0][1] < 100_000, (lists, full)
    assert c.page.locator("#task-table tbody tr").count() == 50
    c.shot("06-tasks-2000")
    c.page.click("#next-page")
    c.page.wait_for_selector("#page-info:text('51–100 of')")
    c.page.fill("#task-search", "number 1999")
    c.page.wait_for_selector("#task-count:has-text('1 matching')")
    assert c.page.locator("#task-table tbody tr").all_inner_texts()[0].startswith("bulk-01999")
    c.page.fill("#task-search", "no-such-task")
    c.page.wait_for_selector("text=No task matches")


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    """A keyed server over real HTTP (uvicorn on a thread: `polyprompt serve` takes keys from the
    environment only, which tests.serverutil clears)."""
    import uvicorn

    s = settings(tiny_model_dir, tmp_path_factory.mktemp("data-console-keys"), api_key=USER_KEY, admin_key=ADMIN_KEY)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    r = httpx.post(f"{url}/v1/tasks", json={"name": "guarded"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    yield url
    srv.should_exit = True
    th.join(20)


@pytest.mark.slow
def test_console_keys_and_roles(browser, keyed_server, artifacts, capsys):
    c = Console(browser, keyed_server, artifacts, capsys)
    try:
        c.go("tasks")
        c.page.wait_for_selector("#api-key")
        c.expected.append(re.compile(r"status of 401 .*@ .*/v1/auth$"))  # the wrong key below, and only it
        c.page.fill("#api-key", "not-a-key")
        c.page.click("button:text('Sign in')")
        c.page.wait_for_selector("text=This key is not accepted")
        c.shot("07-sign-in")
        c.page.fill("#api-key", USER_KEY)
        c.page.click("button:text('Sign in')")
        c.page.wait_for_selector('#task-table tr[data-task="guarded"]')
        assert c.page.locator('[data-role="user"]').count() == 1 and c.page.locator("#new-task").count() == 0
        c.go("tasks/guarded")
        c.page.wait_for_selector("#versions")
        assert c.page.locator("#upload, #delete-task, [data-activate]").count() == 0
        c.shot("08-user-key-task")
        c.page.click("#elevate")
        c.page.fill("dialog #api-key", ADMIN_KEY)
        c.page.click("dialog button:text('Sign in')")
        c.page.wait_for_selector("#upload")
        c.page.reload()  # the key is kept for the tab (sessionStorage)
        c.page.wait_for_selector('[data-role="admin"]')
        c.page.wait_for_selector("#delete-task")
        c.page.click("#sign-out")
        c.page.wait_for_selector("#api-key")
        assert c.page.evaluate("() => sessionStorage.length") == 0
    finally:
        c.close()
