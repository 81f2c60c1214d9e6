"""The response cache (server/response_cache.py, service.Submission): identical deterministic
requests answered without the engine, streamed or not, keyed by version, prompt and every
sampling field; bounded by bytes; versions replaced or deleted drop their entries; only normal
finishes are stored. Counted through /metrics, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server import service
from server.app import create_app
from server.engine.engine import QueueFull
from server.engine.output import RequestOutput
from server.engine.sampler import SamplingParams, TokenLogprob
from server.response_cache import Entry, ResponseCache, deep_size, make_key
from tests.apiutil import adapter_files, complete, make_peft_adapter, peft_greedy, settings, sse

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-rcache")
    with TestClient(create_app(settings(tiny_model_dir, data, response_cache_mb=64.0))) as c:
        for name, n in (("alpha", 5), ("beta", 3), ("gamma", 4), ("doomed", 2)):
            assert c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n}).status_code == 201
        yield c


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def key(name: str, **labels) -> tuple:
    return (f"polyprompt_{name}", frozenset(labels.items()))


class Delta:
    """Metric changes across a block: `with Delta(client) as d: ...; d("generation_tokens_total")`."""

    def __init__(self, client):
        self.client = client

    def __enter__(self):
        self.before = scrape(self.client)
        return self

    def __exit__(self, *exc):
        self.after = scrape(self.client)

    def __call__(self, name: str, **labels) -> float:
        k = key(name, **labels)
        return self.after.get(k, 0.0) - self.before.get(k, 0.0)


def stream(client, path: str = "/v1/completions", **body) -> list:
    """The streamed events without their per-response id and time: what must be equal."""
    events = sse(client.post(path, json={**body, "stream": True}))
    for e in events:
        if isinstance(e, dict):
            e.pop("id", None)
            e.pop("created", None)
    return events


def strip(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def engine_tokens(client) -> int:
    return client.app.state.runtime.engine.stats["generated_tokens"]


# ------------------------------------------------------------------ hits and misses

def test_repeated_greedy_request_is_a_hit_without_engine_work(client):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "return_token_ids": True}
    with Delta(client) as d:
        first = complete(client, **body)
    assert d("response_cache_misses_total", task="alpha") == 1 and d("response_cache_hits_total", task="alpha") == 0
    assert d("generation_tokens_total") == 8 and d("response_cache_entries") == 1
    assert d("response_cache_bytes") > 0
    made = engine_tokens(client)
    with Delta(client) as d:
        second = complete(client, **body)
    assert d("response_cache_hits_total", task="alpha") == 1 and d("response_cache_misses_total", task="alpha") == 0
    # no model work: no engine request at all
    assert d("generation_tokens_total") == 0 and d("prompt_tokens_total") == 0
    assert d("requests_total", task="alpha", finish_reason="length") == 0
    assert d("task_generation_tokens_total", task="alpha") == 0
    assert d("request_latency_seconds_count") == 0
    assert engine_tokens(client) == made
    assert second["id"] != first["id"]
    assert strip(second) == strip(first)  # text, token ids, log-probs, finish reason, usage
    assert second["usage"] == first["usage"] and second["usage"]["completion_tokens"] == 8


def test_generate_and_chat_hit_too(client):
    items = [{"task": "beta", "prompt": "abc def", "max_tokens": 5, "temperature": 0},
             {"task": "gamma", "prompt": "abc def", "max_tokens": 5, "temperature": 0}]
    first = client.post("/v1/generate", json={"requests": items}).json()
    with Delta(client) as d:
        again = client.post("/v1/generate", json={"requests": items}).json()
    assert again == first
    assert d("response_cache_hits_total", task="beta") == 1 and d("response_cache_hits_total", task="gamma") == 1
    assert d("generation_tokens_total") == 0

    chat = {"model": "beta", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
            "temperature": 0}
    a = client.post("/v1/chat/completions", json=chat).json()
    with Delta(client) as d:
        b = client.post("/v1/chat/completions", json=chat).json()
        s = stream(client, "/v1/chat/completions", **chat)
    assert strip(b) == strip(a)
    assert d("response_cache_hits_total", task="beta") == 2 and d("generation_tokens_total") == 0
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in s[:-1] if e["choices"]) == \
        a["choices"][0]["message"]["content"]


def _stop_inside(client, model: str, prompt: str) -> str:
    """A stop string that appears in the middle of the greedy answer, across a token boundary."""
    out = complete(client, model=model, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True,
                   return_token_ids=True)["choices"][0]
    text = out["text"]
    assert len(text) > 8, text
    return text[len(text) // 2 - 1: len(text) // 2 + 2]


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1}, {"stop": "STOP"}, {"max_tokens": 1}],
                         ids=["plain", "logprobs", "stop", "one-token"])
def test_streamed_hit_is_the_engines_stream(client, extra):
    """A hit replays the chunk sequence the engine sends (same deltas, token ids, log-probs and
    finish), whether the entry was filled by a stream or by a non-streaming request; and a
    streamed answer fills the cache for non-streaming requests."""
    rt = client.app.state.runtime
    prompt = f"The {extra and next(iter(extra))} story"
    if extra.get("stop") == "STOP":
        extra = {"stop": _stop_inside(client, "gamma", prompt)}
    body = {"model": "gamma", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}, **extra}
    rt.responses.clear()
    with Delta(client) as d:
        from_engine = stream(client, **body)  # a miss: the engine's own stream, fills the cache
    assert d("response_cache_misses_total", task="gamma") == 1 and d("generation_tokens_total") > 0
    with Delta(client) as d:
        replayed = stream(client, **body)  # from the stream-filled entry
        answer = complete(client, **body)  # non-streaming, from the same entry
    assert d("response_cache_hits_total", task="gamma") == 2 and d("generation_tokens_total") == 0
    assert replayed == from_engine
    chunks = [e["choices"][0] for e in from_engine[:-1] if e["choices"]]
    assert len(chunks) == answer["usage"]["completion_tokens"]  # one chunk a token
    assert "".join(c["text"] for c in chunks) == answer["choices"][0]["text"]
    assert [t for c in chunks for t in c["token_ids"]] == answer["choices"][0]["token_ids"]
    if "stop" in extra:
        assert answer["choices"][0]["finish_reason"] == "stop"

    rt.responses.clear()
    complete(client, **body)  # a non-streaming fill: the deltas are recomputed on the first streamed hit
    with Delta(client) as d:
        assert stream(client, **body) == from_engine
        assert stream(client, **body) == from_engine
    assert d("response_cache_hits_total", task="gamma") == 2 and d("generation_tokens_total") == 0


def test_seeded_sampling_repeats_from_the_cache_unseeded_never(client):
    seeded = {"model": "beta", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "top_k": 40, "seed": 77,
              "ignore_eos": True, "return_token_ids": True}
    first = complete(client, **seeded)
    with Delta(client) as d:
        again = complete(client, **seeded)
    assert strip(again) == strip(first)
    assert d("response_cache_hits_total", task="beta") == 1 and d("generation_tokens_total") == 0

    unseeded = {k: v for k, v in seeded.items() if k != "seed"}
    entries = client.app.state.runtime.responses.stats()["entries"]
    with Delta(client) as d:
        for _ in range(2):
            complete(client, **unseeded)
            stream(client, **unseeded)
    assert d("generation_tokens_total") == 4 * 8  # every one computed
    assert d("response_cache_hits_total", task="beta") == 0 and d("response_cache_misses_total", task="beta") == 0
    assert client.app.state.runtime.responses.stats()["entries"] == entries


def test_n_with_a_seed_keys_each_item_on_its_own_seed(client):
    body = {"model": "alpha", "prompt": "Seeds", "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3,
            "ignore_eos": True, "return_token_ids": True}
    with Delta(client) as d:
        first = complete(client, **body)
    assert d("response_cache_misses_total", task="alpha") == 3
    assert len({tuple(c["token_ids"]) for c in first["choices"]}) > 1  # the items differ (own seeds)
    with Delta(client) as d:
        two = complete(client, **{**body, "n": 2})  # items 0 and 1: seeds 5 and 6, both cached
        again = complete(client, **body)
    assert d("response_cache_hits_total", task="alpha") == 5 and d("generation_tokens_total") == 0
    assert two["choices"] == first["choices"][:2] and again["choices"] == first["choices"]


@pytest.mark.parametrize("change", [{"max_tokens": 7}, {"prompt": PROMPT + "!"}, {"model": "beta"},
                                    {"stop": "zz"}, {"logprobs": 0}, {"top_k": 3}, {"top_p": 0.5},
                                    {"repetition_penalty": 1.2}, {"ignore_eos": False}, {"seed": 1},
                                    {"stop_on_repetition": True}, {"echo": True, "logprobs": 1}],
                         ids=lambda c: "-".join(c))
def test_any_different_field_is_a_miss(client, change):
    base = {"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    complete(client, **base)
    with Delta(client) as d:
        complete(client, **{**base, **change})
    task = change.get("model", "alpha")
    assert d("response_cache_misses_total", task=task) == 1 and d("response_cache_hits_total", task=task) == 0


def test_echo_is_cached_with_its_prompt_logprobs(client):
    """echo's prompt log-probs travel with the entry, in both modes (on a stream's first chunk)."""
    body = {"model": "alpha", "prompt": "Echo me back", "max_tokens": 3, "temperature": 0, "echo": True,
            "logprobs": 1}
    first = complete(client, **body)
    engine_stream = stream(client, **{**body, "prompt": "Echo me back!"})  # a miss: the engine's stream
    with Delta(client) as d:
        again = complete(client, **body)
        replay = stream(client, **{**body, "prompt": "Echo me back!"})
    assert d("response_cache_hits_total", task="alpha") == 2 and d("generation_tokens_total") == 0
    assert strip(again) == strip(first) and replay == engine_stream
    client.app.state.runtime.responses.clear()
    complete(client, **{**body, "prompt": "Echo me back!"})  # filled by a non-streaming answer this time
    assert stream(client, **{**body, "prompt": "Echo me back!"}) == engine_stream


def test_every_sampling_field_is_in_the_key():
    """The key is built from the dataclass's fields, so a field added later is covered too."""
    base = SamplingParams(max_tokens=5, temperature=0.0, stop=("a",))
    k0 = make_key("sha", [1, 2, 3], base)
    assert k0 is not None and hash(k0) == hash(make_key("sha", [1, 2, 3], dataclasses.replace(base)))
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 if v else 1e-6,
             str: lambda v: v + "x", tuple: lambda v: (*v, "b"), type(None): lambda v: 1}
    for f in dataclasses.fields(SamplingParams):
        v = getattr(base, f.name)
        changed = dataclasses.replace(base, **{f.name: other[type(v)](v)})
        if make_key("sha", [1, 2, 3], changed) is not None:  # temperature > 0 without seed: not cached at all
            assert make_key("sha", [1, 2, 3], changed) != k0, f.name
    assert make_key("other", [1, 2, 3], base) != k0 and make_key("sha", [1, 2, 4], base) != k0
    assert make_key("", [1, 2, 3], base) != k0
    # unhashable values (a list where a tuple is expected) are keyed like the tuple; equal
    # numbers alike (a JSON 0 and the 0.0 a test builds), different ones not
    assert make_key("sha", [1], dataclasses.replace(base, stop=["a"])) == make_key("sha", [1], base)
    assert make_key("sha", [1], dataclasses.replace(base, temperature=0)) == make_key("sha", [1], base)
    assert make_key("sha", [1], dataclasses.replace(base, stop=("a,b",))) != \
        make_key("sha", [1], dataclasses.replace(base, stop=("a", "b")))
    assert make_key("sha", [1], dataclasses.replace(base, top_p=0.1)) != \
        make_key("sha", [1], dataclasses.replace(base, top_p=0.1000001))

    class Opaque:  # a type the key cannot write: not cached rather than risk a wrong hit
        pass

    assert make_key("sha", [1], dataclasses.replace(base, stop=(Opaque(),))) is None
    # not deterministic: never keyed
    assert make_key("sha", [1], SamplingParams(temperature=0.7)) is None
    assert make_key("sha", [1], SamplingParams(temperature=0.7, seed=3)) is not None


# ------------------------------------------------------------------ versions, lifecycle

def test_a_new_version_misses_and_answers_with_the_new_prompt(client, tiny_model_dir, tmp_path):
    rt = client.app.state.runtime
    body = {"model": "gamma", "prompt": "Versions", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    old = complete(client, **body)
    complete(client, **body)  # cached
    old_sha = rt.tasks["gamma"].sha256
    assert rt.responses.invalidate("no-such-version") == 0
    held = rt.responses.stats()["entries"]
    pm = make_peft_adapter(tiny_model_dir, tmp_path / "adapter", num_virtual_tokens=4, seed=9)
    r = client.post("/v1/tasks/gamma/prompt", files=adapter_files(tmp_path / "adapter"))
    assert r.status_code == 201, r.text
    assert rt.tasks["gamma"].sha256 != old_sha
    assert old_sha not in rt.responses._by_version  # the old version's entries are freed
    assert rt.responses.stats()["entries"] < held
    with Delta(client) as d:
        new = complete(client, **body)
    assert d("response_cache_misses_total", task="gamma") == 1 and d("generation_tokens_total") == 6
    ids = rt.encode("Versions")
    assert new["choices"][0]["token_ids"] == peft_greedy(pm, ids, 6)  # the new version's own answer
    assert new["choices"][0]["token_ids"] != old["choices"][0]["token_ids"]
    with Delta(client) as d:
        assert strip(complete(client, **body)) == strip(new)
    assert d("response_cache_hits_total", task="gamma") == 1


def test_a_deleted_task_drops_its_entries_and_series(client):
    rt = client.app.state.runtime
    body = {"model": "doomed", "prompt": "Bye", "max_tokens": 4, "temperature": 0}
    complete(client, **body)
    complete(client, **body)
    sha = rt.tasks["doomed"].sha256
    assert sha in rt.responses._by_version
    samples = scrape(client)
    assert samples[key("response_cache_hits_total", task="doomed")] == 1
    assert client.delete("/v1/tasks/doomed").status_code == 204
    assert sha not in rt.responses._by_version
    samples = scrape(client)
    assert key("response_cache_hits_total", task="doomed") not in samples
    assert key("response_cache_misses_total", task="doomed") not in samples


def test_a_version_replaced_while_it_ran_is_not_stored(client):
    """An item prepared on a version that is no longer served when it finishes fills nothing."""
    rt = client.app.state.runtime
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def go():
        prepared = await service.prepare(rt, [("alpha", "Replaced", lambda: params, None)])
        prepared[0] = dataclasses.replace(prepared[0], version="an-old-sha")
        sub = service.Submission(rt, prepared)  # not served: not even looked up
        return [out async for _, out in sub.outputs()]

    entries = rt.responses.stats()["entries"]
    with Delta(client) as d:
        outs = asyncio.run(go())
    assert outs[-1].finish_reason == "length" and rt.responses.stats()["entries"] == entries
    assert d("response_cache_misses_total", task="alpha") == 0


def test_aborted_and_timed_out_requests_are_not_cached(client):
    rt = client.app.state.runtime
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def aborted():
        prepared = await service.prepare(rt, [("alpha", "Abort me", lambda: params, None)])
        sub = service.Submission(rt, prepared, stream=True)
        sub.close()
        while True:
            _, out = await asyncio.wait_for(sub.queue.get(), 30)
            if out.finished:
                return out

    entries = rt.responses.stats()["entries"]
    assert asyncio.run(aborted()).finish_reason == "abort"
    body = {"model": "alpha", "prompt": "Abort me", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "timeout": 0.001}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 408, r.text
    assert rt.responses.stats()["entries"] == entries
    with Delta(client) as d:  # the same request without a timeout: still a miss, computed
        complete(client, **{k: v for k, v in body.items() if k != "timeout"})
    assert d("response_cache_misses_total", task="alpha") == 1 and d("generation_tokens_total") == 200


def test_a_hit_needs_no_room_in_the_queue(client, monkeypatch):
    """Past intake (which refuses an overloaded server before any tokenizing, hit or not), a hit
    takes no queue room: a queue that filled meanwhile refuses only the items the engine computes."""
    rt = client.app.state.runtime
    params = SamplingParams(max_tokens=3, temperature=0)
    complete(client, model="beta", prompt="Queue", max_tokens=3, temperature=0)  # cached

    async def go(prompt):
        prepared = await service.prepare(rt, [("beta", prompt, lambda: params, None)])

        def full(n):
            raise QueueFull("the queue is full", retry_after=1)

        monkeypatch.setattr(rt.engine, "check_admission", full)
        try:
            return [out async for _, out in service.Submission(rt, prepared).outputs()]
        finally:
            monkeypatch.undo()

    outs = asyncio.run(go("Queue"))
    assert outs[-1].finished and len(outs[-1].token_ids) == 3
    with pytest.raises(QueueFull):
        asyncio.run(go("Queue, not cached"))


# ------------------------------------------------------------------ off, size

def test_response_cache_mb_0_turns_it_off(tiny_model_dir, tmp_path):
    import argparse

    from registry.settings import add_flags, from_args
    from server.settings import Settings

    p = argparse.ArgumentParser()
    add_flags(p, Settings)
    assert from_args(Settings, p.parse_args(["--response-cache-mb", "0"])).response_cache_mb == 0
    assert Settings(_env_file=None).response_cache_mb == 64.0
    with TestClient(create_app(settings(tiny_model_dir, tmp_path, response_cache_mb=0))) as c:
        body = {"model": c.get("/v1/models").json()["data"][0]["id"], "prompt": PROMPT, "max_tokens": 4,
                "temperature": 0, "ignore_eos": True}
        with Delta(c) as d:
            a = complete(c, **body)
            b = complete(c, **body)
            stream(c, **body)
        assert a["choices"] == b["choices"]
        assert d("generation_tokens_total") == 3 * 4
        assert d("response_cache_entries") == 0 and d("response_cache_bytes") == 0
        assert not [k for k, v in d.after.items() if k[0].startswith("polyprompt_response_cache_hits")
                    or k[0].startswith("polyprompt_response_cache_misses")]


def _entry(n_tokens: int, text: str = "x", logprobs: bool = False) -> Entry:
    ids = list(range(n_tokens))
    lps = [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids] if logprobs else []
    out = RequestOutput("r", ids, text, True, "length", 3, lps, token_ids=ids, text=text)
    return Entry.from_final(out, "v")


def test_lru_is_bounded_by_its_bytes():
    one = deep_size(_entry(50, "y" * 200))
    assert one > 50 * 4 + 200  # the token ids, the text, and the objects holding them
    assert deep_size(_entry(50, logprobs=True)) > deep_size(_entry(50)) + 50 * 100  # log-probs are counted
    cache = ResponseCache(10 * one)
    keys = [make_key("v", [i], SamplingParams(temperature=0)) for i in range(40)]
    for i, k in enumerate(keys):
        assert cache.put(k, _entry(50, "y" * 200))
        if i == 2:
            assert cache.get(keys[0]) is not None  # used: moves to the back of the line
        assert cache.stats()["bytes"] <= cache.max_bytes
    stats = cache.stats()
    assert 4 <= stats["entries"] < 10 and stats["evictions"] == 40 - stats["entries"]
    assert cache.get(keys[-1]) is not None and cache.get(keys[1]) is None
    assert stats["bytes"] == sum(e.nbytes for e in cache._entries.values())
    # replacing an entry does not count it twice; one over the whole cap is refused
    cache.put(keys[-1], _entry(50, "y" * 200))
    assert cache.stats()["bytes"] == stats["bytes"]
    assert not cache.put(keys[0], _entry(5000, "z" * 100_000))
    assert cache.invalidate("v") == stats["entries"] and cache.stats()["bytes"] == 0
    assert not ResponseCache(0).enabled and not ResponseCache(0).put(keys[0], _entry(1))


def test_lru_over_http_stays_under_its_cap(tiny_model_dir, tmp_path):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path, response_cache_mb=0.01))) as c:  # ~10 KB
        model = c.get("/v1/models").json()["data"][0]["id"]
        for i in range(30):
            complete(c, model=model, prompt=f"Prompt number {i}", max_tokens=8, temperature=0, ignore_eos=True)
        samples = scrape(c)
        cap = c.app.state.runtime.responses.max_bytes
        assert 0 < samples[key("response_cache_bytes")] <= cap
        assert samples[key("response_cache_evictions_total")] > 0
        assert samples[key("response_cache_entries")] < 30
        with Delta(c) as d:  # the first ones were evicted, the last one is still there
            complete(c, model=model, prompt="Prompt number 0", max_tokens=8, temperature=0, ignore_eos=True)
            complete(c, model=model, prompt="Prompt number 29", max_tokens=8, temperature=0, ignore_eos=True)
        assert d("response_cache_misses_total", task=model) == 1 and d("response_cache_hits_total", task=model) == 1
