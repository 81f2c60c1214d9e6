"""/metrics through `prometheus_client`'s own parser: every family typed and documented, counters
moving by exactly what requests did, rejections and errors by reason, the utilisation gauge."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.engine.utilisation import BusyMeter
from tests.apiutil import greedy, settings

PROMPT = "Once upon a time"
COUNTERS = {"requests", "prompt_tokens", "generation_tokens", "task_generation_tokens", "rejected_requests",
            "request_errors", "prefix_cache_hits", "prefix_cache_misses", "prefix_cache_computed",
            "engine_busy_seconds", "response_cache_hits", "response_cache_misses", "response_cache_evictions"}
GAUGES = {"queue_depth", "running_batch_size", "tasks", "engine_utilisation", "target_utilisation",
          "prefix_cache_entries", "prefix_cache_bytes", "kv_cache_bytes", "per_task_prefix_kv_bytes",
          "response_cache_entries", "response_cache_bytes"}
HISTOGRAMS = {"time_to_first_token_seconds", "inter_token_latency_seconds", "request_latency_seconds",
              "task_time_to_first_token_seconds", "task_inter_token_latency_seconds", "task_request_latency_seconds"}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-metrics")
    s = settings(tiny_model_dir, data, max_batch_size=1, max_queue=1, target_utilisation=0.75)
    with TestClient(create_app(s)) as c:
        for name, n in (("alpha", 5), ("beta", 3), ("doomed", 2)):
            assert c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n}).status_code == 201
        yield c


def scrape(client) -> tuple[dict, dict]:
    """(families by name, samples keyed (name, frozenset(labels)) -> value)."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return families, samples


def key(name: str, **labels) -> tuple:
    return (f"polyprompt_{name}", frozenset(labels.items()))


def test_every_family_is_typed_and_documented(client):
    greedy(client, "alpha", PROMPT, 3, ignore_eos=True)  # so the labelled families have samples
    families, samples = scrape(client)
    types = {name.removeprefix("polyprompt_"): f.type for name, f in families.items()}
    assert {n: types.get(n) for n in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {n: types.get(n) for n in GAUGES} == dict.fromkeys(GAUGES, "gauge")
    assert {n: types.get(n) for n in HISTOGRAMS} == dict.fromkeys(HISTOGRAMS, "histogram")
    assert set(types) == COUNTERS | GAUGES | HISTOGRAMS
    assert [n for n, f in families.items() if not f.documentation.strip()] == []
    assert not [s for s in samples if s[0].endswith("_created")]  # disabled: no per-task timestamp series
    assert samples[key("target_utilisation")] == 0.75


def test_counters_move_by_exactly_what_requests_did(client):
    _, before = scrape(client)
    a = greedy(client, "alpha", PROMPT, 3, ignore_eos=True)
    b = greedy(client, "beta", PROMPT, 2, ignore_eos=True)
    _, after = scrape(client)

    def delta(k: tuple) -> float:
        return after.get(k, 0.0) - before.get(k, 0.0)

    assert delta(key("requests_total", task="alpha", finish_reason="length")) == 1
    assert delta(key("requests_total", task="beta", finish_reason="length")) == 1
    assert delta(key("generation_tokens_total")) == 5
    assert delta(key("prompt_tokens_total")) == a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"]
    assert delta(key("task_generation_tokens_total", task="alpha")) == 3
    assert delta(key("task_generation_tokens_total", task="beta")) == 2
    for task in ("alpha", "beta"):
        for hist in ("task_time_to_first_token_seconds", "task_inter_token_latency_seconds",
                     "task_request_latency_seconds"):
            assert delta(key(f"{hist}_count", task=task)) == 1, (hist, task)
            assert after[key(f"{hist}_bucket", task=task, le="+Inf")] == after[key(f"{hist}_count", task=task)]
    assert delta(key("request_latency_seconds_count")) == 2
    assert delta(key("engine_busy_seconds_total")) > 0  # the engine stepped for them


def _post(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})


def test_intake_rejections_are_counted_by_reason(client):
    _, before = scrape(client)
    assert _post(client, model="alpha", n=2).json()["error"]["code"] == "too_many_items"  # max_queue=1
    assert _post(client, model="nope").status_code == 404
    assert _post(client, model="alpha", prompt="word " * 5000).json()["error"]["code"] == "context_length_exceeded"
    _, after = scrape(client)
    got = {r: after[key("rejected_requests_total", reason=r)] - before[key("rejected_requests_total", reason=r)]
           for r in ("too_many_items", "model_not_found", "context_length_exceeded", "queue_full", "queue_wait")}
    assert got == {"too_many_items": 1, "model_not_found": 1, "context_length_exceeded": 1,
                   "queue_full": 0, "queue_wait": 0}


def _wait_for(cond, what: str, limit: float = 60.0) -> None:
    """Poll an engine state (a progress guard, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.002)


def test_overload_rejections_errors_and_utilisation(client):
    """One slot, a queue of one: a long request runs (utilisation > 0), an expected wait over the
    bound is refused `queue_wait`, a second long one queues, the next is refused `queue_full`;
    both long ones are then aborted (errors `abort`/499), and the idle engine's share falls to 0."""
    rt = client.app.state.runtime
    eng = rt.engine
    _, before = scrape(client)
    codes: list[int] = []

    def long():
        codes.append(_post(client, model="alpha", max_tokens=900, ignore_eos=True).status_code)

    threads = [threading.Thread(target=long, daemon=True) for _ in range(2)]
    threads[0].start()
    _wait_for(lambda: eng.num_running == 1 and eng.meter.busy > 0, "the first long request runs")
    eng.slot_seconds = 1e4  # as if a slot were held for hours: the expected wait exceeds --max-queue-wait
    try:
        r = _post(client, model="alpha")
    finally:
        eng.slot_seconds = None
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    threads[1].start()
    _wait_for(lambda: eng.num_waiting == 1, "the second long request queues")
    assert _post(client, model="alpha").status_code == 503
    _, busy = scrape(client)
    health = client.get("/health").json()
    assert eng.num_running == 1, "the long request ended early: make it longer"
    assert busy[key("engine_utilisation")] > 0 and health["utilisation"] > 0
    assert health["target_utilisation"] == 0.75
    eng.abort_all("abort")
    for t in threads:
        t.join(60)
    assert codes == [499, 499]
    _, after = scrape(client)

    def delta(k: tuple) -> float:
        return after[k] - before[k]

    assert delta(key("rejected_requests_total", reason="queue_wait")) == 1
    assert delta(key("rejected_requests_total", reason="queue_full")) == 1
    assert delta(key("request_errors_total", finish_reason="abort", status="499")) == 2
    assert delta(key("request_errors_total", finish_reason="error", status="500")) == 0
    # idle: the loop keeps marking while it waits; once a mark holds the final busy total, a window
    # that starts there has seen no step at all
    meter = eng.meter
    _wait_for(lambda: not eng.has_work() and meter._since is None and meter._marks[-1][1] == meter.busy,
              "an idle mark")
    mark = meter._marks[-1][0]
    assert meter.utilisation(now=mark) > 0  # the window ending at the mark still holds the load
    assert meter.utilisation(now=mark + meter.window) == 0.0


def test_busy_meter_arithmetic():
    """Busy share over the window from marks, a step in progress counted up to now."""
    t = [0.0]
    m = BusyMeter(window=10.0, mark_every=1.0, clock=lambda: t[0])
    for start in range(0, 20, 2):  # busy 1 s of every 2 s for 20 s
        t[0] = float(start)
        m.begin()
        t[0] = start + 1.0
        m.end()
    assert m.busy == 10.0
    assert m.utilisation(now=19.0) == pytest.approx(0.5)  # from the mark at 9 s: 5 s busy of 10
    t[0] = 20.0
    m.begin()  # a step in progress since 20 s counts up to now
    assert m.utilisation(now=21.0) == pytest.approx(0.5)  # base mark (11 s, busy 6): 10 + 1 - 6 over 10
    t[0] = 21.0
    m.end()
    t[0] = 26.0
    m.tick()
    assert m.utilisation(now=26.0) == pytest.approx(3 / 11)  # base mark (15 s, busy 8): 11 - 8 over 11
    t[0] = 40.0
    m.tick()
    assert m.utilisation(now=40.0) == 0.0  # nothing ran in the last window


def test_deleted_task_loses_its_series(client):
    greedy(client, "doomed", PROMPT, 2, ignore_eos=True)
    _, samples = scrape(client)
    assert samples[key("task_generation_tokens_total", task="doomed")] == 2
    assert client.delete("/v1/tasks/doomed").status_code in (200, 204)
    _, samples = scrape(client)
    assert not [k for k in samples if ("task", "doomed") in k[1]]


def test_refusals_while_draining_are_counted(client):
    """The drain gate answers before any route: its 503s count as `shutting_down` rejections
    (and /metrics keeps answering while the server drains)."""
    _, before = scrape(client)
    lifecycle = client.app.state.lifecycle
    lifecycle.draining.set()
    try:
        r = _post(client, model="alpha")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        _, after = scrape(client)
    finally:
        lifecycle.draining.clear()
    k = key("rejected_requests_total", reason="shutting_down")
    assert after[k] - before[k] == 1
