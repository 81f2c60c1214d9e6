"""polyprompt over HTTP: `polyprompt serve` in a subprocess on a free loopback port.

Throughput: N concurrent clients send the workload to POST /v1/completions (greedy,
ignore_eos), tokens/s = completion tokens / wall time. Latency: Poisson arrivals at a
fixed rate with `stream: true`; time to first token and inter-token gaps from the SSE
chunks. Prompts go as token ids so every method sees exactly the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import httpx
from safetensors.torch import save as st_save

from bench.baselines import Workload

HOST = "127.0.0.1"  # loopback only
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`polyprompt serve` with a temp data dir; a context manager."""

    def __init__(self, model_dir: Path, *, dtype: str, max_batch_size: int, max_num_batched_tokens: int,
                 threads: int = 0, startup_timeout: float = 300.0, max_queue: int = 100000,
                 extra_args: Sequence[str] = ()):
        self.model_dir, self.dtype = model_dir, dtype
        self.max_queue, self.extra_args = max_queue, list(extra_args)
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.startup_timeout = startup_timeout
        self.threads = threads
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def _dtype_args(self) -> list[str]:
        """`--dtype D`, and for "D+int8" (bench.engine_bench.DTYPES) `--quantize int8` too,
        for "...+kv8" `--kv-cache-dtype int8`."""
        from bench.engine_bench import kv_cache_dtype, split_dtype

        base, quantize = split_dtype(self.dtype)
        return ["--dtype", base] + (["--quantize", quantize] if quantize else []) + \
            (["--kv-cache-dtype", "int8"] if kv_cache_dtype(self.dtype) == "int8" else [])

    def __enter__(self) -> "Server":
        self.tmp = tempfile.mkdtemp(prefix="polyprompt-bench-")
        exe = shutil.which("polyprompt")
        cmd = [exe] if exe else [sys.executable, "-m", "server.cli"]
        cmd += ["serve", "--model", str(self.model_dir), "--data-dir", os.path.join(self.tmp, "data"),
                "--host", HOST, "--port", str(self.port), "--device", "cpu", *self._dtype_args(),
                "--max-batch-size", str(self.max_batch_size),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--max-queue", str(self.max_queue), "--log-level", "warning", *self.extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYPROMPT_")}  # no keys, no db
        if self.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.log_path = os.path.join(self.tmp, "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_health()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_health(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(base_url=self.url, trust_env=False, timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"polyprompt serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if c.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"polyprompt serve not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def register(self, tasks: dict) -> None:
        """POST /v1/tasks, then upload each task's prompt (PEFT safetensors, key prompt_embeddings)."""
        with httpx.Client(base_url=self.url, trust_env=False, timeout=120) as c:
            for name, soft in tasks.items():
                r = c.post("/v1/tasks", json={"name": name, "num_virtual_tokens": int(soft.shape[0])})
                if r.status_code != 201:
                    raise RuntimeError(f"create task {name}: {r.status_code} {r.text}")
                data = st_save({"prompt_embeddings": soft.float().contiguous()}, metadata={"format": "pt"})
                r = c.post(f"/v1/tasks/{name}/prompt", files={
                    "adapter_model.safetensors": ("adapter_model.safetensors", data, "application/octet-stream")})
                if r.status_code != 201:
                    raise RuntimeError(f"upload prompt {name}: {r.status_code} {r.text}")
            health = c.get("/health").json()
            if health.get("tasks", len(tasks)) < len(tasks):
                raise RuntimeError(f"server reports {health.get('tasks')} tasks, registered {len(tasks)}")


def _body(task: str, ids: list[int], new_tokens: int, stream: bool = False) -> dict:
    return {"model": task, "prompt": list(ids), "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": stream}


def _client(n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(base_url="", limits=limits, timeout=httpx.Timeout(600.0), trust_env=False)


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the whole response.

    The throughput load generator must stay light: client and server share this machine's
    2 cores. httpx's connection pool costs O(connections) per request; at 64 connections
    a profile of the client (py-spy) showed it CPU-bound for the whole run, mostly in
    httpcore's pool bookkeeping, taking a core from the server. Like wrk or vLLM's
    benchmark client, one plain connection per simulated user avoids that (the figures:
    bench/README.md, `http`).
    """

    def __init__(self, url: str):
        hostport = url.split("://", 1)[1].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post_json(self, path: str, obj: dict) -> tuple[int, bytes]:
        status, _, data = await self.request("POST", path, obj)
        return status, data

    async def read_head(self) -> tuple[int, dict[str, str], int | None, bool, bool]:
        """The status line and headers of an answer: (status, headers with lower-case names,
        Content-Length or None, chunked, Connection: close)."""
        status = int((await self.reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        length = headers.get("content-length")
        return (status, headers, None if length is None else int(length),
                "chunked" in headers.get("transfer-encoding", "").lower(),
                headers.get("connection", "").lower() == "close")

    async def request(self, method: str, path: str, obj: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request (a JSON body when `obj` is given); (status, headers with lower-case
        names, body). The connection stays open unless the server said `Connection: close`."""
        await self.connect()
        body = b"" if obj is None else json.dumps(obj).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if obj is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write((head + "\r\n").encode() + body)
        status, headers, length, chunked, close = await self.read_head()
        if chunked:
            parts = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            data = b"".join(parts)
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data, close = await self.reader.read(), True
        if close:
            await self.aclose()
        return status, headers, data

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def _throughput(url: str, wl: Workload, clients: int) -> dict:
    """`clients` simulated users, each on its own connection, each sending its next request
    as soon as its previous answer is back (a closed loop), until all are sent."""
    conns = [Connection(url) for _ in range(clients)]

    async def one(conn: Connection, task: str, ids: list[int]) -> list[int]:
        status, data = await conn.post_json("/v1/completions", _body(task, ids, wl.new_tokens))
        if status != 200:
            raise RuntimeError(f"completion failed: {status} {data[:500]!r}")
        return json.loads(data)["choices"][0]["token_ids"]

    try:
        await asyncio.gather(*(c.connect() for c in conns))  # users are connected before the clock starts
        await asyncio.gather(*(one(conns[k], t, ids) for k, (t, ids) in enumerate(wl.requests[:clients])))
        outs: list[list[int] | None] = [None] * len(wl.requests)
        todo = list(range(len(wl.requests)))
        todo.reverse()

        async def worker(conn: Connection):
            while todo:
                i = todo.pop()
                outs[i] = await one(conn, *wl.requests[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        seconds = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.aclose()
    return {"outputs": outs, "seconds": seconds, "tokens": sum(len(o) for o in outs)}


def run_http_throughput(server: Server, wl: Workload, clients: int) -> dict:
    """One untimed request per client first (a full batch, so the server's KV-cache pages
    are touched before the clock starts, as in any server that has been up a while)."""
    return asyncio.run(_throughput(server.url, wl, clients))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _latency(url: str, wl: Workload, rate: float, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    at, arrivals = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        arrivals.append(at)
    reqs = [wl.requests[i % len(wl.requests)] for i in range(n)]
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    async with _client(n) as c:
        r = await c.post(f"{url}/v1/completions", json=_body(*reqs[0], wl.new_tokens))  # warm-up
        r.raise_for_status()
        t0 = time.perf_counter()

        async def one(i: int):
            nonlocal tokens
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            start = last = time.perf_counter()
            first = True
            async with c.stream("POST", f"{url}/v1/completions", json=_body(*reqs[i], wl.new_tokens, True)) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"stream failed: {r.status_code} {(await r.aread())[:500]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"in-band error: {chunk['error']}")
                    k = sum(len(ch.get("token_ids") or []) for ch in chunk.get("choices", []))
                    if not k:
                        continue
                    now = time.perf_counter()
                    tokens += k
                    if first:
                        ttft.append(now - start)
                        first = False
                    else:
                        itl.append(now - last)
                    last = now

        await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - t0
    return {"rate": rate, "requests": n, "seconds": seconds, "tokens": tokens,
            "ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99),
            "itl_p50": _pct(itl, 0.5), "itl_p99": _pct(itl, 0.99)}


def run_http_latency(server: Server, wl: Workload, rate: float, n: int, seed: int) -> dict:
    return asyncio.run(_latency(server.url, wl, rate, n, seed))
