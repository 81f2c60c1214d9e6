"""The centrepiece: a real server over HTTP, many tasks mixed, greedy == PEFT token for token."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from tests.peft_ref import base_greedy, peft_greedy, peft_model
from tests.serverutil import running_server

pytestmark = pytest.mark.slow  # a real `polyprompt serve` subprocess

VIRTUAL = {"t-one": 1, "t-five": 5, "t-eight": 8, "t-twenty": 20, "t-32": 32, "t-three": 3,
           "t-twelve": 12, "t-sixteen": 16}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # small batch and token budget: forces chunked prefill, queueing and rows joining mid-decode
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("exact-data"),
                        "--max-batch-size", "12", "--max-num-batched-tokens", "96") as url:
        yield url


@pytest.fixture(scope="module")
def tasks(server, tiny_model_dir, tmp_path_factory):
    """Eight tasks, each with a PEFT-saved adapter uploaded over HTTP; returns {name: PeftModel}."""
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(7)
    models = {}
    for name, n in VIRTUAL.items():
        emb = torch.randn(n, base.config.n_embd, generator=gen) * 0.4
        pm = peft_model(base, emb)
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        pm.save_pretrained(folder)
        r = httpx.post(f"{server}/v1/tasks", json={"name": name, "num_virtual_tokens": n})
        assert r.status_code == 201, r.text
        files = {fn: (fn, (folder / fn).read_bytes()) for fn in ("adapter_model.safetensors", "adapter_config.json")}
        r = httpx.post(f"{server}/v1/tasks/{name}/prompt", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2 and r.json()["num_virtual_tokens"] == n
        models[name] = pm
    models["__base__"] = base
    return models


def _requests(tokenizer, n: int = 32) -> list[dict]:
    rng = random.Random(3)
    words = [w for w in ("the of and to in is you that it he was for on are as with his they at be this "
                         "from have or by one had not but what all were when we there can an your which "
                         "their said if do will each about how up out them then she many some so these "
                         "would other into has more her two like him see time could no make than first "
                         "been its who now people my made over did down only way find use may water long "
                         "little very after words called just where most know").split()]
    lengths = [1, 2, 60, 59, 3, 45, 7, 30] + [rng.randint(1, 60) for _ in range(n - 8)]
    names = list(VIRTUAL)
    out = []
    for i, length in enumerate(lengths):
        ids = []
        while len(ids) < length:
            ids += tokenizer.encode(" " + rng.choice(words))
        ids = ids[:length]
        task = names[i % len(names)] if i % 11 != 10 else "__base__"
        out.append({"task": task, "ids": ids, "max_tokens": rng.randint(6, 20), "as_text": i % 2 == 0})
    return out


def test_mixed_concurrent_greedy_equals_peft(server, tasks, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reqs = _requests(tok)
    base_id = httpx.get(f"{server}/health").json()["model"]

    def call(r):
        prompt = tok.decode(r["ids"]) if r["as_text"] else r["ids"]
        body = {"model": base_id if r["task"] == "__base__" else r["task"], "prompt": prompt,
                "max_tokens": r["max_tokens"], "temperature": 0, "return_token_ids": True}
        resp = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    with ThreadPoolExecutor(len(reqs)) as pool:
        results = list(pool.map(call, reqs))

    mismatches = []
    for r, res in zip(reqs, results):
        ids = tok.encode(tok.decode(r["ids"])) if r["as_text"] else r["ids"]
        model = tasks[r["task"]]
        ref = (base_greedy(model, ids, r["max_tokens"]) if r["task"] == "__base__"
               else peft_greedy(model, ids, r["max_tokens"]))
        choice = res["choices"][0]
        assert res["usage"]["prompt_tokens"] == len(ids)
        assert len(choice["token_ids"]) == res["usage"]["completion_tokens"]
        if choice["token_ids"] != ref:
            mismatches.append((r["task"], len(ids), choice["token_ids"], ref))
    assert not mismatches, mismatches
    assert {len(r["ids"]) for r in reqs} >= {1, 60}
    assert {r["task"] for r in reqs} >= set(VIRTUAL)


def test_alone_equals_in_mixed_batch_greedy_and_seeded(server, tasks):
    def gen(batch):
        r = httpx.post(f"{server}/v1/generate", json={"requests": batch}, timeout=120)
        assert r.status_code == 200, r.text
        return [x["token_ids"] for x in r.json()["results"]]

    greedy = {"task": "t-twenty", "prompt": "Once upon a time in a land far away", "max_tokens": 16,
              "temperature": 0}
    seeded = {"task": "t-five", "prompt": "The weather today is", "max_tokens": 16, "temperature": 0.9,
              "top_p": 0.95, "top_k": 50, "seed": 1234}
    alone = [gen([greedy])[0], gen([seeded])[0]]
    others = [{"task": name, "prompt": "filler text number %d " % i * (i + 1), "max_tokens": 5 + i,
               "temperature": 0.7 * (i % 2)} for i, name in enumerate(VIRTUAL)]
    mixed = gen(others[:3] + [greedy] + others[3:6] + [seeded] + others[6:])
    assert mixed[3] == alone[0]
    assert mixed[7] == alone[1]
    assert gen([seeded])[0] == alone[1]  # repeatable
    other_seed = gen([{**seeded, "seed": 99}])[0]
    assert other_seed != alone[1]
