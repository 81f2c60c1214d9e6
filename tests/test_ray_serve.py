"""polyprompt as a Ray Serve application (server/ray_serve.py): 2 replicas on a local Ray cluster,
one shared SQLite registry, every request through Ray's HTTP proxy; greedy == PEFT token for
token, a task's requests stick to one replica, a task registered while it runs reaches both."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from tests import apiutil
from tests.peft_ref import peft_greedy, peft_model
from tests.serverutil import free_port

pytestmark = pytest.mark.slow  # a local Ray cluster, 2 replicas

try:
    import ray
    from ray import serve

    from server.ray_serve import REPLICA_HEADER, build_app, routing_key
except Exception as e:  # pragma: no cover - ray[serve] is the optional extra `ray`
    msg = f"RAY SERVE TEST SKIPPED: ray[serve] is not importable ({type(e).__name__}: {e}); pip install -e '.[ray]'"
    warnings.warn(msg)
    pytest.skip(msg, allow_module_level=True)

UPLOADED_ON: dict[str, str] = {}  # task -> the replica its prompt upload landed on
ROOT = Path(__file__).resolve().parent.parent
TASKS = {"r-three": 3, "r-eight": 8, "r-five": 5}
LATE = "r-late"
PROMPTS = ["The weather today is", "Once upon a time in a land", "one two three four five six",
           "In the beginning", "A", "the of and to in is you that it he was for on are as with"]


def test_routing_key():
    j = {"content-type": "application/json"}
    assert routing_key("/v1/completions", j, b'{"model": "a", "prompt": "x"}') == "a"
    assert routing_key("/v1/generate", j, b'{"requests": [{"task": "b"}, {"task": "b"}]}') == "b"
    assert routing_key("/v1/generate", j, b'{"requests": [{"task": "b"}, {"task": "c"}]}') == ""  # any replica
    assert routing_key("/v1/completions", {**j, "serve_multiplexed_model_id": "a#2"}, b'{"model": "a"}') == "a#2"
    assert routing_key("/v1/completions", j, b"not json") == ""
    assert routing_key("/v1/tasks/a/prompt", {"content-type": "multipart/form-data"}, b"--x") == ""
    assert routing_key("/health", {}, b"") == ""


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """Ray (2 CPUs, no dashboard) + Serve on a free port + the app with 2 replicas; its URL."""
    data = tmp_path_factory.mktemp("ray-data")
    s = apiutil.settings(tiny_model_dir, data, kv_cache_gb=0.02, prefix_cache_mb=16.0, max_batch_size=8,
                      reload_interval=0.2, log_level="warning")
    args = {k: getattr(s, k) for k in ("model", "data_dir", "device", "dtype", "kv_cache_gb", "prefix_cache_mb",
                                       "max_batch_size", "cuda_graphs", "response_cache_mb", "reload_interval",
                                       "log_level")}
    args.update(num_replicas=2, replica_cpus=0.5, torch_threads=1)
    port = free_port()
    try:
        # the workers import this checkout (not whatever `server` the environment has installed)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
                 object_store_memory=96 << 20, log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as e:
        ray.shutdown()
        msg = f"RAY SERVE TEST SKIPPED: a local Ray cluster did not start ({type(e).__name__}: {e})"
        warnings.warn(msg)
        pytest.skip(msg)
    try:
        t0 = time.perf_counter()
        serve.run(build_app(args), name="polyprompt", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the Serve app did not become healthy"
            time.sleep(0.5)
        print(f"serve app healthy after {time.perf_counter() - t0:.1f}s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def register(url: str, base, name: str, n: int, seed: int, folder) -> object:
    """Create the task and upload a PEFT-saved adapter through the proxy (any replica); its PeftModel."""
    emb = torch.randn(n, base.config.n_embd, generator=torch.Generator().manual_seed(seed)) * 0.4
    pm = peft_model(base, emb)
    pm.save_pretrained(folder)
    r = httpx.post(f"{url}/v1/tasks", json={"name": name, "num_virtual_tokens": n}, timeout=60)
    assert r.status_code == 201, r.text
    files = {fn: (fn, (folder / fn).read_bytes()) for fn in ("adapter_model.safetensors", "adapter_config.json")}
    r = httpx.post(f"{url}/v1/tasks/{name}/prompt", files=files, timeout=60)
    assert r.status_code == 201, r.text
    UPLOADED_ON[name] = r.headers[REPLICA_HEADER]
    return pm


def complete(url: str, model: str, prompt: str, max_tokens: int = 10, *, headers=None, wait_s: float = 0):
    """A greedy completion; with `wait_s`, a 404 (the task not yet polled in by that replica) is retried."""
    deadline = time.time() + wait_s
    while True:
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=120,
                       json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                             "return_token_ids": True})
        if r.status_code == 404 and time.time() < deadline:
            time.sleep(0.1)
            continue
        assert r.status_code == 200, r.text
        return r.json(), r.headers[REPLICA_HEADER]


@pytest.fixture(scope="module")
def tasks(cluster, base, tmp_path_factory):
    models = {name: register(cluster, base, name, n, seed, tmp_path_factory.mktemp(f"adapter-{name}"))
              for seed, (name, n) in enumerate(TASKS.items())}
    time.sleep(1.0)  # reload_interval 0.2 s: every replica has polled the new tasks in
    return models


def test_mixed_greedy_equals_peft_through_the_proxy(cluster, tasks, tok):
    jobs = [(name, p, 6 + i % 7) for i, (name, p) in enumerate((n, p) for p in PROMPTS for n in TASKS)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: complete(cluster, j[0], j[1], j[2]), jobs))
    bad = []
    for (name, prompt, max_tokens), (res, _) in zip(jobs, results):
        ref = peft_greedy(tasks[name], tok.encode(prompt), max_tokens)
        if res["choices"][0]["token_ids"] != ref:
            bad.append((name, prompt, res["choices"][0]["token_ids"], ref))
    assert not bad, bad
    per_replica = Counter(rep for _, rep in results)
    print("mixed requests per replica:", dict(per_replica),
          "task -> replicas:", {n: sorted({rep for (t, *_), (_, rep) in zip(jobs, results) if t == n}) for n in TASKS})
    assert len(per_replica) == 2, per_replica  # 3 tasks over 2 replicas: each new task to the emptier one


def test_a_tasks_requests_stick_to_one_replica(cluster, base, tok, tmp_path):
    """Fresh tasks (never requested: no replica holds them yet), each requested one at a time:
    after its first request every later one lands on the replica that served it. (A task first
    requested by a concurrent burst may be taken up by several replicas, which then share it.)"""
    fresh = {f"s-{i}": register(cluster, base, f"s-{i}", 4, 20 + i, tmp_path / f"s-{i}") for i in range(4)}
    time.sleep(1.0)  # every replica has polled them in
    homes = {}
    for name in fresh:
        _, first = complete(cluster, name, "warm up")
        time.sleep(0.5)  # the ingress's router has heard which replica took the task
        seen = Counter(complete(cluster, name, p, 4)[1] for p in PROMPTS)
        assert set(seen) == {first}, (name, first, seen)
        homes[name] = first
    print("task -> replica:", homes)
    assert len(set(homes.values())) == 2, homes  # and a new task goes to the replica holding fewer


def test_other_routes_and_streaming_through_the_proxy(cluster, tasks, tok):
    h = httpx.get(f"{cluster}/health", timeout=30)
    assert h.status_code == 200 and REPLICA_HEADER in h.headers
    models = httpx.get(f"{cluster}/v1/models", timeout=30).json()
    assert set(TASKS) <= {m["id"] for m in models["data"]}
    assert set(TASKS) <= {t["name"] for t in httpx.get(f"{cluster}/v1/tasks", timeout=30).json()["data"]}
    name = "r-eight"
    ref = peft_greedy(tasks[name], tok.encode("The weather today is"), 12)
    r = httpx.post(f"{cluster}/v1/generate", timeout=60, json={"requests": [
        {"task": name, "prompt": "The weather today is", "max_tokens": 12, "temperature": 0}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["token_ids"] == ref
    r = httpx.post(f"{cluster}/v1/score", timeout=60, json={"model": name, "prompt": "The weather",
                                                            "candidates": [" today", " is"]})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{cluster}/v1/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    # streaming: server-sent events arrive through the proxy, and add up to the greedy answer
    text, chunks = "", 0
    with httpx.stream("POST", f"{cluster}/v1/completions", timeout=60, json={
            "model": name, "prompt": "The weather today is", "max_tokens": 12, "temperature": 0,
            "stream": True}) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
                text += json.loads(line[6:])["choices"][0].get("text", "")
    assert chunks >= 2 and text == tok.decode(ref)
    err = httpx.post(f"{cluster}/v1/completions", timeout=30, json={"model": "no-such-task", "prompt": "x"})
    assert err.status_code == 404 and "error" in err.json()
    big = httpx.post(f"{cluster}/v1/completions", timeout=30, content=b"x" * (65 << 20),
                     headers={"content-type": "application/json"})  # over --max-body-mb 64: the ingress refuses it
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"


def test_a_task_registered_while_running_is_served_by_both_replicas(cluster, tasks, base, tok, tmp_path):
    """Registered through one replica while the app runs; 1 s later (reload_interval 0.2 s) both
    serve its uploaded prompt. Its requests carry their own routing keys (the header
    serve_multiplexed_model_id: "r-late#k"), each new key going to the replica holding fewer, so
    they land on both replicas."""
    pm = register(cluster, base, LATE, 6, 99, tmp_path)
    time.sleep(1.0)
    seen = Counter()
    for k in range(8):
        prompt = PROMPTS[k % len(PROMPTS)]
        res, rep = complete(cluster, LATE, prompt, 8, headers={"serve_multiplexed_model_id": f"{LATE}#{k}"})
        assert res["choices"][0]["token_ids"] == peft_greedy(pm, tok.encode(prompt), 8), (k, rep)
        seen[rep] += 1
    print(f"{LATE}: uploaded on {UPLOADED_ON[LATE]}, requests per replica {dict(seen)}")
    assert len(seen) == 2, seen
    assert set(seen) > {UPLOADED_ON[LATE]}  # the replica it was not uploaded on serves it too
