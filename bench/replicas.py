"""Two replicas x 1,000 tasks: task-affine routing against round-robin, in the same run.

    python -m bench.replicas                       # 124M-shape random GPT-2, bfloat16
    python -m bench.replicas --size tiny --tasks 200 --requests 400 --warmup 200   # smoke

Two `polyprompt serve` processes share one registry (a SQLite file and a data folder), as
replicas behind a load balancer do. The tasks are registered once through the first
replica (random soft prompts of `--virtual-tokens` rows); each trial starts both replicas
fresh (empty prefix caches), sends an untimed warm-up (one request per task, then `--warmup`
random ones), then the
timed `--requests`, both uniformly over the tasks, from `--clients` closed-loop users. A
request goes to a replica by its policy:

- `affine`: a stable hash of the task name (what `server.ray_serve`'s ingress does with
  Ray Serve's model multiplexing, and what any consistent-hashing load balancer gives), so
  each replica sees half the tasks;
- `round-robin`: by arrival, so each replica sees every task.

Each replica's prefix cache (`--prefix-cache-mb`, default: 60 % of the whole task set's
prefix KV) holds more than its half of the tasks but not all of them. Reported per policy:
the prefix-cache hit rate over the timed requests (from both replicas' /metrics), the
completion tokens/s and requests/s, and the ratio affine / round-robin. Trials alternate
(affine, round-robin, round-robin, affine, ...), `--rounds` pairs; the report gives every
trial and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import httpx

from bench import http_bench as H
from bench.baselines import ensure_model

POLICIES = ("affine", "round-robin")
IDLE_MAX_S = 2.0


def _metric(text: str, name: str) -> float:
    """The sum of a metric family's samples in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prefix_counts(urls: list[str]) -> tuple[float, float]:
    hits = misses = 0.0
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
        hits += _metric(text, "polyprompt_prefix_cache_hits_total")
        misses += _metric(text, "polyprompt_prefix_cache_misses_total")
    return hits, misses


def register(url: str, n_tasks: int, n_virtual: int) -> list[str]:
    names = [f"task-{i:04d}" for i in range(n_tasks)]
    with httpx.Client(base_url=url, trust_env=False, timeout=60) as c:
        for i, name in enumerate(names):
            r = c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": n_virtual, "seed": i})
            if r.status_code != 201:
                raise RuntimeError(f"create {name}: {r.status_code} {r.text}")
    return names


def wait_tasks(urls: list[str], n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while httpx.get(f"{url}/health", timeout=10, trust_env=False).json().get("tasks", 0) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} does not serve {n} tasks")
            time.sleep(0.2)


def route(policy: str, task: str, i: int, n: int) -> int:
    if policy == "affine":
        return zlib.crc32(task.encode()) % n
    return i % n


async def drive(urls: list[str], policy: str, reqs: list[tuple[str, list[int]]], clients: int,
                new_tokens: int) -> tuple[float, int]:
    """Closed loop: `clients` users, each on one connection per replica; (seconds, tokens)."""
    queue = list(enumerate(reqs))
    queue.reverse()
    tokens = 0

    async def user():
        nonlocal tokens
        conns = [H.Connection(u) for u in urls]
        used = [0.0] * len(urls)
        try:
            while queue:
                i, (task, ids) = queue.pop()
                k = route(policy, task, i, len(urls))
                conn = conns[k]
                if time.monotonic() - used[k] > IDLE_MAX_S:  # uvicorn drops keep-alive connections idle 5 s
                    await conn.aclose()
                status, data = await conn.post_json("/v1/completions", {
                    "model": task, "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True})
                used[k] = time.monotonic()
                if status != 200:
                    raise RuntimeError(f"{status}: {data[:300]!r}")
                tokens += json.loads(data)["usage"]["completion_tokens"]
        finally:
            for c in conns:
                await c.aclose()

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(clients)))
    return time.perf_counter() - t0, tokens


def requests_for(names: list[str], n: int, prompt_len: int, rng: random.Random) -> list[tuple[str, list[int]]]:
    return [(rng.choice(names), [rng.randrange(256, 50000) for _ in range(prompt_len)]) for _ in range(n)]


def trial(model_dir: Path, shared: Path, args, policy: str, names: list[str] | None, seed: int) -> tuple[dict, list]:
    flags = ["--db", f"sqlite:///{shared / 'registry.db'}", "--data-dir", str(shared / "data"),
             "--prefix-cache-mb", str(args.prefix_cache_mb), "--response-cache-mb", "0",
             "--max-queue-wait", "0", "--reload-interval", "0.5"]
    with H.Server(model_dir, dtype=args.dtype, max_batch_size=args.max_batch_size,
                  max_num_batched_tokens=args.max_num_batched_tokens, extra_args=flags, threads=1) as a, \
            H.Server(model_dir, dtype=args.dtype, max_batch_size=args.max_batch_size,
                     max_num_batched_tokens=args.max_num_batched_tokens, extra_args=flags, threads=1) as b:
        urls = [a.url, b.url]
        if names is None:
            names = register(a.url, args.tasks, args.virtual_tokens)
        wait_tasks(urls, len(names))
        rng = random.Random(seed)  # the same requests for both policies of a round
        warm = [(t, ids) for t, (_, ids) in zip(rng.sample(names, len(names)),  # every task once, then random
                                                 requests_for(names, len(names), args.prompt_len, rng))]
        warm += requests_for(names, args.warmup, args.prompt_len, rng)
        timed = requests_for(names, args.requests, args.prompt_len, rng)
        asyncio.run(drive(urls, policy, warm, args.clients, args.new_tokens))
        h0, m0 = prefix_counts(urls)
        secs, toks = asyncio.run(drive(urls, policy, timed, args.clients, args.new_tokens))
        h1, m1 = prefix_counts(urls)
        hits, misses = h1 - h0, m1 - m0
        return {"policy": policy, "seconds": round(secs, 2), "tokens_per_s": round(toks / secs, 1),
                "requests_per_s": round(len(timed) / secs, 2),
                "prefix_hit_rate": round(hits / max(1, hits + misses), 4),
                "prefix_hits": int(hits), "prefix_misses": int(misses)}, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=500, help="random requests after one per task")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--prefix-cache-mb", type=float, default=None,
                    help="per replica (default: 60 %% of the whole task set's prefix KV)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of trials (affine + round-robin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    model_dir = ensure_model(args.size)
    cfg = json.loads((model_dir / "config.json").read_text())
    per_task = cfg["n_layer"] * 2 * args.virtual_tokens * cfg["n_embd"] * (2 if args.dtype in ("bfloat16", "float16")
                                                                            else 4)
    if args.prefix_cache_mb is None:
        args.prefix_cache_mb = round(0.6 * per_task * args.tasks / 2**20, 1)
    trials = []
    names = None
    with tempfile.TemporaryDirectory(prefix="polyprompt-replicas-") as tmp:
        for r in range(args.rounds):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for policy in order:
                got, names = trial(model_dir, Path(tmp), args, policy, names, args.seed + r)
                got["round"] = r
                print(json.dumps(got), flush=True)
                trials.append(got)
    by = {p: [t for t in trials if t["policy"] == p] for p in POLICIES}
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(by["affine"], by["round-robin"])]
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "per_task_prefix_kv_bytes": per_task, "trials": trials,
              "median_hit_rate": {p: statistics.median(t["prefix_hit_rate"] for t in by[p]) for p in POLICIES},
              "median_tokens_per_s": {p: statistics.median(t["tokens_per_s"] for t in by[p]) for p in POLICIES},
              "throughput_ratio_affine_over_round_robin": {"median": round(statistics.median(ratios), 3),
                                                           "each_round": [round(x, 3) for x in ratios]}}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
