"""Overload: `polyprompt serve --max-queue-wait` at a multiple of its own measured capacity.

Issue 13: with more work arriving than it can do, a server should refuse the excess at
once (503 + Retry-After) rather than let every wait grow, keep doing useful work at about
its full rate, and not grow its memory. One server process answers a closed-loop capacity
phase and then open-loop Poisson arrivals at `factor` x that capacity, some clients
abandoning (closing the connection aborts the request); its RSS is read between phases.
bench/README.md ("Overload") says what is measured and how.

The load generator is bench.http_bench.Connection (plain asyncio streams, idle
connections reused) rather than httpx: client and server share the machine's cores, and
httpx's pool costs O(connections) per request. Every prompt is unique (a workload prompt
rotated once more on each pass), so no response cache can answer without doing the work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import http_bench as H
from bench.baselines import Workload

IDLE_MAX_S = 2.0  # reuse an idle connection only if younger than this (uvicorn drops idle ones after 5 s)
CAPACITY_TIMEOUT_S = 300.0  # a capacity request is an error after this long
# A capacity client retries a refused request soon (the queue must stay full), backing off
# to at most RETRY_MAX_S while refusals go on, so the refusals do not eat the server's CPU.
RETRY_SLEEP_S, RETRY_MAX_S = 0.05, 1.0


def serve_flags() -> set[str]:
    """The long flags `polyprompt serve --help` lists (this tree's server, whatever it supports)."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], cwd=H.REPO,
                         capture_output=True, text=True, timeout=120).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", out))


def rss(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of one process, MiB (the server process; it has no workers)."""
    got = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key.lower()[2:] + "_mib"] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return got


def _unique(wl: Workload, i: int) -> tuple[str, list[int]]:
    """Request i: the workload's prompts in turn, rotated by one more position on every pass,
    so all are distinct at the same length and cost."""
    task, ids = wl.requests[i % len(wl.requests)]
    k = (i // len(wl.requests)) % max(1, len(ids))
    return task, ids[k:] + ids[:k]


def _pct(xs: list[float], q: float) -> float | None:
    return H._pct(xs, q) if xs else None


def _count(d: dict, key) -> None:
    d[key] = d.get(key, 0) + 1


class _Pool:
    """Idle keep-alive connections, most recently used first; a new one when none is fresh."""

    def __init__(self, url: str):
        self.url, self.idle = url, []

    def get(self) -> H.Connection:
        now = time.monotonic()
        while self.idle:
            conn, since = self.idle.pop()
            if now - since < IDLE_MAX_S:
                return conn
            self._drop(conn)
        return H.Connection(self.url)

    def put(self, conn: H.Connection) -> None:
        if conn.writer is not None:
            self.idle.append((conn, time.monotonic()))

    @staticmethod
    def _drop(conn: H.Connection) -> None:
        if conn.writer is not None:
            conn.writer.close()
        conn.reader = conn.writer = None

    def close(self) -> None:
        while self.idle:
            self._drop(self.idle.pop()[0])


async def _sample_metrics(url: str, stop: asyncio.Event, out: list[dict], every: float = 0.5) -> None:
    """Queue depth and running batch size from GET /metrics, every `every` s until `stop`."""
    conn = H.Connection(url)
    try:
        while not stop.is_set():
            try:
                status, _, data = await asyncio.wait_for(conn.request("GET", "/metrics"), 10)
                if status == 200:
                    vals = dict(re.findall(r"^polyprompt_(queue_depth|running_batch_size) (\S+)$",
                                           data.decode(), re.M))
                    out.append({"t": time.perf_counter(), **{k: float(v) for k, v in vals.items()}})
            except Exception:  # a sample lost under load is no result lost
                await conn.aclose()
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass
    finally:
        await conn.aclose()


def _mean(samples: list[dict], key: str, t0: float, t1: float) -> float | None:
    xs = [s[key] for s in samples if key in s and t0 <= s["t"] <= t1]
    return sum(xs) / len(xs) if xs else None


async def _capacity(url: str, wl: Workload, clients: int, seconds: float, slots: int) -> dict:
    """Closed loop: `clients` users for `seconds` after one untimed request each.

    The answers of a full batch of equal requests come back in waves; counting the ones
    inside a fixed window would be off by up to a wave. The rate is instead taken between
    the first completion and the completion a whole number of `slots` later (the same
    phase of a later wave, or anywhere when the waves have blurred): completions / span.
    """
    conns = [H.Connection(url) for _ in range(clients)]
    counter = itertools.count()
    done: list[tuple[float, float, int]] = []  # (end time, latency, completion tokens)
    refused, other, errors = 0, {}, {}
    stop_at = float("inf")

    async def user(conn: H.Connection, warm_up: bool) -> None:
        """Requests until the clock runs out (or, warming up, until one is answered)."""
        nonlocal refused
        backoff = RETRY_SLEEP_S
        while time.perf_counter() < stop_at:
            task, ids = _unique(wl, next(counter))
            t = time.perf_counter()
            try:
                status, _, data = await asyncio.wait_for(
                    conn.request("POST", "/v1/completions", H._body(task, ids, wl.new_tokens)), CAPACITY_TIMEOUT_S)
            except Exception as e:  # a timeout too: a broken server must not hang the bench
                _count(errors, "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__)
                await conn.aclose()
                status = None
            end = time.perf_counter()
            if status == 200 and warm_up:
                return
            if status == 200:
                done.append((end, end - t, len(json.loads(data)["choices"][0]["token_ids"])))
                backoff = RETRY_SLEEP_S
                continue
            if status == 503:
                refused += 1
            elif status is not None:
                _count(other, status)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_MAX_S)

    try:
        await asyncio.gather(*(c.connect() for c in conns))
        await asyncio.gather(*(user(c, True) for c in conns))  # warm-up: KV pages touched, prefixes used
        stats: list[dict] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_metrics(url, stop, stats))
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(user(c, False) for c in conns))
        stop.set()
        await sampler
    finally:
        for c in conns:
            await c.aclose()
    done.sort()
    n = len(done)
    m = slots * ((n - 1) // slots) if n > slots else 0
    if m and done[m][0] > done[0][0]:
        t_a, t_b = done[0][0], done[m][0]
        rate, basis = m / (t_b - t_a), f"{m} completions from answer #1 to #{m + 1}"
    else:  # too few answers for a whole wave (a smoke run): plain count over the window
        t_a, t_b = t0, t0 + seconds
        rate, basis = n / seconds, f"{n} completions / {seconds:g} s"
    tokens = sum(d[2] for d in done) / n if n else 0.0
    running = _mean(stats, "running_batch_size", t_a, t_b)
    lat = [d[1] for d in done]
    return {"clients": clients, "seconds": seconds, "ok": n, "refused_503": refused, "other": other,
            "client_errors": errors, "req_s": rate, "tok_s": rate * tokens, "tokens_per_request": tokens,
            "rate_basis": basis, "mean_running": running, "mean_queue": _mean(stats, "queue_depth", t_a, t_b),
            "latency_p50": _pct(lat, 0.5), "latency_p99": _pct(lat, 0.99),
            # Little's law: the mean time a request spends in the batch = running / throughput
            "service_time_s": (running if running else slots) / rate if rate else None,
            "service_time_basis": "mean running (GET /metrics) / req/s" if running else "max_num_seqs / req/s",
            "next_index": next(counter)}


async def _overload(url: str, wl: Workload, *, rate: float, seconds: float, abandon: float, abandon_max_s: float,
                    patient_s: float, warm_s: float, seed: int, first_index: int) -> dict:
    """Poisson arrivals at `rate` for `seconds`; each request is its own task with its own timeout."""
    rng = random.Random(seed)
    plan, at = [], rng.expovariate(rate)
    while at < seconds:
        quits = rng.random() < abandon
        plan.append((at, quits, rng.uniform(0.1, 1.0) * abandon_max_s if quits else patient_s))
        at += rng.expovariate(rate)
    pool = _Pool(url)
    ok: list[tuple[float, float, int]] = []  # (end time since t0, latency, tokens)
    lat503: list[float] = []
    retry_after: list[float] = []
    c = {"abandoned": 0, "503": 0, "503_without_retry_after": 0}
    other: dict[int, int] = {}
    errors: dict[str, int] = {}
    lags: list[float] = []

    async def one(i: int, quits: bool, timeout: float) -> None:
        task, ids = _unique(wl, first_index + i)
        conn = pool.get()
        t = time.perf_counter()
        try:
            status, headers, data = await asyncio.wait_for(
                conn.request("POST", "/v1/completions", H._body(task, ids, wl.new_tokens)), timeout)
        except asyncio.TimeoutError:  # gave up: closing the connection is how a client aborts
            await conn.aclose()
            if quits:
                c["abandoned"] += 1
            else:
                _count(errors, "timeout")
            return
        except Exception as e:
            await conn.aclose()
            _count(errors, type(e).__name__)
            return
        end = time.perf_counter()
        pool.put(conn)
        if status == 200:
            ok.append((end - t0, end - t, len(json.loads(data)["choices"][0]["token_ids"])))
        elif status == 503:
            c["503"] += 1
            lat503.append(end - t)
            if "retry-after" in headers:
                try:
                    retry_after.append(float(headers["retry-after"]))
                except ValueError:
                    pass
            else:
                c["503_without_retry_after"] += 1
        else:
            _count(other, status)

    stats: list[dict] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_metrics(url, stop, stats, every=1.0))
    t0 = time.perf_counter()
    tasks = []
    for i, (at, quits, timeout) in enumerate(plan):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - t0 - at)
        tasks.append(asyncio.create_task(one(i, quits, timeout)))
    send_s = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    drain_s = time.perf_counter() - t0 - send_s
    stop.set()
    await sampler
    pool.close()
    lat = [x[1] for x in ok]
    steady = [x for x in ok if warm_s <= x[0] <= seconds]
    span = seconds - warm_s
    return {"target_req_s": rate, "seconds": seconds, "sent": len(plan), "ok": len(ok), "503": c["503"],
            "503_with_retry_after": c["503"] - c["503_without_retry_after"],
            "503_without_retry_after": c["503_without_retry_after"], "other": other, "client_errors": errors,
            "abandoned": c["abandoned"], "abandoners_planned": sum(p[1] for p in plan),
            "planned_req_s": len(plan) / plan[-1][0] if plan else None,  # this Poisson draw's rate
            "achieved_send_req_s": len(plan) / send_s if send_s else None,
            "send_lag_p50": _pct(lags, 0.5), "send_lag_p99": _pct(lags, 0.99), "send_lag_max": max(lags, default=None),
            "drain_s": drain_s,
            "latency_ok_p50": _pct(lat, 0.5), "latency_ok_p90": _pct(lat, 0.9), "latency_ok_p99": _pct(lat, 0.99),
            "latency_ok_max": max(lat, default=None), "latency_503_p50": _pct(lat503, 0.5),
            "latency_503_p99": _pct(lat503, 0.99), "retry_after_min": min(retry_after, default=None),
            "retry_after_max": max(retry_after, default=None),
            "goodput_window_s": [warm_s, seconds], "goodput_req_s": len(steady) / span,
            "goodput_tok_s": sum(x[2] for x in steady) / span,
            "ok_req_s_whole_window": sum(1 for x in ok if x[0] <= seconds) / seconds,
            "mean_queue": _mean(stats, "queue_depth", t0, t0 + seconds),
            "max_queue_seen": max((s["queue_depth"] for s in stats if "queue_depth" in s), default=None),
            "mean_running": _mean(stats, "running_batch_size", t0, t0 + seconds)}


def _finish_reasons(url: str) -> dict[str, int]:
    """The server's finished requests by finish reason so far (polyprompt_requests_total)."""
    import httpx

    got: dict[str, int] = {}
    try:
        text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    except httpx.HTTPError:
        return got
    for reason, n in re.findall(r'^polyprompt_requests_total\{.*finish_reason="([^"]*)"\} (\S+)$', text, re.M):
        got[reason] = got.get(reason, 0) + int(float(n))
    return got


def _raise_fd_limit() -> None:
    """One socket per in-flight request: hundreds at once on a slow model."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _log_errors(server: H.Server) -> int:
    """Tracebacks in the server's log (it runs at --log-level warning)."""
    try:
        return Path(server.log_path).read_text(errors="replace").count("Traceback")
    except OSError:
        return -1


def run_overload(model_dir: Path, wl: Workload, *, dtype: str, max_num_seqs: int, max_num_batched_tokens: int,
                 threads: int, seconds: float, factor: float, abandon: float, max_queue_wait: float,
                 max_queue: int, capacity_seconds: float, capacity_clients: int, seed: int, log=print) -> dict:
    """Capacity, then overload at `factor` x capacity, against one `polyprompt serve`.

    `max_queue_wait` <= 0, or a server without the flag, runs without the bound (recorded as
    `max_queue_wait: null`), so the scenario also shows what the server does without it.
    """
    _raise_fd_limit()
    flags = serve_flags()
    mqw = max_queue_wait if max_queue_wait > 0 and "--max-queue-wait" in flags else None
    if max_queue_wait > 0 and mqw is None:
        log("overload: this server has no --max-queue-wait; running without the bound")
    extra = ["--max-queue-wait", f"{mqw:g}"] if mqw is not None else []
    if "--response-cache-mb" in flags:
        extra += ["--response-cache-mb", "0"]  # every answer computed (the prompts are unique anyway)
    clients = capacity_clients or 2 * max_num_seqs
    res: dict = {"dtype": dtype, "factor": factor, "abandon": abandon, "max_queue_wait": mqw, "max_queue": max_queue,
                 "max_num_seqs": max_num_seqs, "server_args": extra}
    with H.Server(model_dir, dtype=dtype, max_batch_size=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  threads=threads, max_queue=max_queue, extra_args=extra) as srv:
        srv.register(wl.tasks)
        pid = srv.proc.pid
        res["rss_before"] = rss(pid)
        log(f"overload {dtype}: capacity, {clients} clients in a closed loop for {capacity_seconds:g} s")
        cap = asyncio.run(_capacity(srv.url, wl, clients, capacity_seconds, max_num_seqs))
        res["capacity"] = cap
        res["rss_after_capacity"] = rss(pid)
        if not cap["req_s"]:
            raise RuntimeError(f"capacity phase completed no request: {cap}\n{srv.log_tail()}")
        service = cap["service_time_s"]
        bound = (mqw or 0.0) + service
        rate = factor * cap["req_s"]
        log(f"overload {dtype}: capacity {cap['req_s']:.2f} req/s ({cap['tok_s']:.0f} tok/s), service time "
            f"{service:.2f} s; now {rate:.2f} req/s (x{factor:g}) for {seconds:g} s, {100 * abandon:.0f}% abandoning")
        before = _finish_reasons(srv.url)
        ov = asyncio.run(_overload(srv.url, wl, rate=rate, seconds=seconds, abandon=abandon, abandon_max_s=bound,
                                   patient_s=max(120.0, 4 * bound), warm_s=min(seconds / 3, bound), seed=seed + 13,
                                   first_index=cap["next_index"]))
        res["overload"] = ov
        # what the server says it finished during the overload: the abandoned ones show as aborted
        ov["server_finish_reasons"] = {k: v - before.get(k, 0) for k, v in _finish_reasons(srv.url).items()
                                       if v - before.get(k, 0)}
        res["rss_after_overload"] = rss(pid)
        res["server_tracebacks"] = _log_errors(srv)
        res["server_alive"] = srv.proc.poll() is None
    share = ov["goodput_req_s"] / cap["req_s"]
    p99 = ov["latency_ok_p99"]
    fives = {k: v for k, v in ov["other"].items() if 500 <= int(k) < 600}
    res["goodput_share"] = share
    res["checks"] = {
        "p99_bound_s": bound if mqw is not None else None,
        "p99_within_bound": (p99 is not None and p99 <= bound) if mqw is not None else None,
        "goodput_at_least_90pct": share >= 0.9,
        "no_5xx_but_503": not fives and ov["503_without_retry_after"] == 0,
        # every request left within 100 ms of its planned time (p99), at the planned rate
        "client_kept_up": ov["send_lag_p99"] is not None and ov["send_lag_p99"] < 0.1
        and ov["achieved_send_req_s"] >= 0.95 * ov["planned_req_s"],
    }
    return res


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.0f} ms"


def _num(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report_lines(name: str, r: dict) -> list[str]:
    """The scenario's lines under the bench table."""
    cap, ov, ck = r["capacity"], r["overload"], r["checks"]
    other = ", ".join(f"{k}: {v}" for k, v in sorted(ov["other"].items())) or "none"
    errs = ", ".join(f"{k}: {v}" for k, v in sorted(ov["client_errors"].items())) or "none"
    mib = [_num(r[k].get("rss_mib")) for k in ("rss_before", "rss_after_capacity", "rss_after_overload")]
    bound = "no --max-queue-wait" if r["max_queue_wait"] is None else f"--max-queue-wait {r['max_queue_wait']:g} s"
    return [
        f"{name}: {bound}, --max-queue {r['max_queue']}, x{r['factor']:g} capacity, "
        f"{100 * r['abandon']:.0f}% of clients abandoning",
        f"  capacity ({cap['clients']} clients, closed loop, {cap['seconds']:g} s): {cap['req_s']:.2f} req/s, "
        f"{cap['tok_s']:.0f} tok/s ({cap['rate_basis']}); 503s retried: {cap['refused_503']}; service time "
        f"{cap['service_time_s']:.2f} s ({cap['service_time_basis']}); closed-loop latency p50 "
        f"{_ms(cap['latency_p50'])}",
        f"  overload {ov['seconds']:g} s at {ov['target_req_s']:.2f} req/s (this draw {_num(ov['planned_req_s'], 2)}, "
        f"sent at {_num(ov['achieved_send_req_s'], 2)}, send lag p99 {_ms(ov['send_lag_p99'])}): sent {ov['sent']}, "
        f"ok {ov['ok']}, 503 {ov['503']} ({ov['503_without_retry_after']} without Retry-After), other {other}, "
        f"abandoned {ov['abandoned']}, client errors {errs}",
        f"  accepted latency p50 {_ms(ov['latency_ok_p50'])}, p90 {_ms(ov['latency_ok_p90'])}, "
        f"p99 {_ms(ov['latency_ok_p99'])}, max {_ms(ov['latency_ok_max'])}; 503 answered in p50 "
        f"{_ms(ov['latency_503_p50'])}, p99 {_ms(ov['latency_503_p99'])}; the server finished "
        + (", ".join(f"{k}: {v}" for k, v in sorted(ov["server_finish_reasons"].items())) or "none"),
        f"  goodput {ov['goodput_req_s']:.2f} req/s, {ov['goodput_tok_s']:.0f} tok/s = {100 * r['goodput_share']:.0f}% "
        f"of capacity (answers in {ov['goodput_window_s'][0]:.1f}-{ov['goodput_window_s'][1]:g} s); queue mean "
        f"{_num(ov['mean_queue'])} max {_num(ov['max_queue_seen'])}, running mean {_num(ov['mean_running'])}",
        f"  server RSS MiB: before {mib[0]}, after capacity {mib[1]}, after overload {mib[2]} (peak "
        f"{_num(r['rss_after_overload'].get('hwm_mib'))}); tracebacks in its log: {r['server_tracebacks']}",
        "  checks: " + ", ".join(f"{k} {round(v, 2) if isinstance(v, float) else v}" for k, v in ck.items()),
    ]
