"""Everything a running server holds: model, tokenizer, engine, registry, live task table.

The task table is a snapshot of the registry, swapped whole whenever the registry's
change counter moves (polled every `reload_interval` seconds, at once after a change made
through this server, and on PostgreSQL at once on the NOTIFY every registry write sends:
`Registry.listen`), so lookups are one dict access and a new version trained elsewhere goes
live within a poll interval at most, without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from registry import Registry
from registry.paths import default_db_url, model_id_for
from server.engine import openmp
from server.engine.engine import Engine
from server.engine.kv_cache import slot_bytes
from server.metrics import Metrics
from server.model import GPT2
from server.response_cache import ResponseCache
from server.settings import Settings

log = logging.getLogger("polyprompt.runtime")

PROBE_CHARS_PER_TOKEN = 8  # a long prompt is first tokenized this many characters per token of room
WARM_LIMIT = 256  # versions warmed at startup and per registry change (a bulk import warms lazily beyond)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    num_virtual_tokens: int
    active_version: int | None
    sha256: str | None
    chat_template: str | None = None  # the task's own chat template (None: the server's)


def check_quantize(quantize: str, device: torch.device) -> None:
    from server import cpu_kernels, cpu_matmul
    from server.model.backend import QUANTIZE

    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    if quantize == "int8" and device.type != "cpu":
        raise ValueError("--quantize int8 runs on the CPU (--device cpu); on CUDA, float16 is the fast path")
    if quantize == "int8" and not cpu_matmul.int8(cpu_kernels.load()):
        raise ValueError("--quantize int8 needs the native CPU kernels with AVX512-VNNI (a C compiler, AVX-512 "
                         "and VNNI); this machine has not got them, or POLYPROMPT_CPU_KERNELS=0 switched them off")


def check_kv_cache_dtype_flag(kv_cache_dtype: str, device: torch.device) -> None:
    """`--kv-cache-dtype` refused before anything loads where it cannot run (the engine checks
    the model itself again: `server.engine.kv_cache.check_kv_cache_dtype`)."""
    from server import cpu_kernels
    from server.engine.kv_cache import KV_CACHE_DTYPES

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")
    if kv_cache_dtype == "int8" and device.type != "cpu":
        raise ValueError("--kv-cache-dtype int8 runs on the CPU's native kernels (--device cpu)")
    if kv_cache_dtype == "int8" and cpu_kernels.load() is None:
        raise ValueError("--kv-cache-dtype int8 needs the native CPU kernels (AVX-512 and a C compiler); this "
                         "machine has not got them, or POLYPROMPT_CPU_KERNELS=0 switched them off")


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        check_quantize(settings.quantize, self.device)  # before migrations: a bad flag fails in one line
        check_kv_cache_dtype_flag(settings.kv_cache_dtype, self.device)
        if self.device.type == "cuda" and self.dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.registry = Registry(settings.db or default_db_url(settings.data_dir), settings.data_dir)
        self.registry.upgrade()
        self.model_id = model_id_for(settings.model)
        self.model = GPT2.from_pretrained(settings.model, device=self.device, dtype=self.dtype,
                                         quantize=settings.quantize)
        self._model_bytes = sum(p.nbytes for p in self.model.parameters())
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self._encoder = self.tokenizer.backend_tokenizer
        # the most characters one token can stand for: a text of L characters is at least
        # L / max_token_chars tokens (byte-level BPE: a token's string is one char per byte)
        self.max_token_chars = max(1, max(map(len, self._encoder.get_vocab())))
        self.engine = Engine(self.model, self.tokenizer, settings.engine_config())
        t0 = time.perf_counter()
        if warmed := self.engine.warm_kernels():
            log.info("built CPU matmul kernels for %d step sizes in %.1fs", warmed, time.perf_counter() - t0)
        self.paths = self.model.backend.describe(self.model)
        self.paths["kv-cache"] = self.engine.describe_cache()
        log.info("serving paths: %s", "; ".join(f"{k}: {v}" for k, v in self.paths.items()))
        self.metrics = Metrics()
        self.engine.listeners.append(self.metrics.on_finish)
        # answers of identical deterministic requests (server/response_cache.py, service.Submission)
        self.responses = ResponseCache(int(settings.response_cache_mb * (1 << 20)))
        self.metrics.attach(self)  # gauges read from this runtime at scrape time
        self.tasks: dict[str, TaskInfo] = {}
        self._generation = -1
        self._refresh_lock = threading.Lock()
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_bytes = 0
        self._prompts_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.registry_error: str | None = None  # set while the registry cannot be read (`_poll`)
        self.registry_down_since: float | None = None
        self.engine_on_caller_thread = False  # `polyprompt serve` runs the engine on the main thread
        self.refresh(force=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self.engine_on_caller_thread:
            self.engine.start()
            openmp.release()  # this thread's OpenMP workers would slow the engine's (openmp.py)
        self._poller = threading.Thread(target=self._poll, name="polyprompt-registry-poll", daemon=True)
        self._poller.start()
        # PostgreSQL: LISTEN for the NOTIFY every registry write sends, and reload at once (the
        # poll above stays the fallback, and the only way on SQLite); None elsewhere
        self._listener = self.registry.listen(self.refresh)

    def stop(self) -> None:
        self._stop.set()
        self.engine.shutdown()
        if self._poller is not None:
            self._poller.join(5)
        if (listener := getattr(self, "_listener", None)) is not None:
            listener.stop()
        self.registry.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.reload_interval):
            try:
                self.refresh()
            except Exception as e:  # the database may be unavailable: serve what is loaded, try again next tick
                self._registry_failed(e)
            else:
                self._registry_recovered()

    def _registry_failed(self, e: Exception) -> None:
        """The registry could not be read: the tasks loaded keep serving, `/health` says the
        registry is degraded, admin writes answer 503 (server.errors); logged once per outage."""
        first = self.registry_error is None
        self.registry_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if first:
            self.registry_down_since = time.monotonic()
            log.error("the task registry (database) is unreachable; serving the %d tasks loaded until it "
                      "returns: %s", len(self.tasks), self.registry_error)

    def _registry_recovered(self) -> None:
        if self.registry_error is not None:
            log.warning("the task registry is reachable again after %.1f s",
                        time.monotonic() - (self.registry_down_since or time.monotonic()))
            self.registry_error = None
            self.registry_down_since = None

    def registry_status(self) -> dict:
        """For /health: "ok", or "unreachable" with the error and for how long."""
        if self.registry_error is None:
            return {"status": "ok"}
        return {"status": "unreachable", "error": self.registry_error,
                "seconds": round(time.monotonic() - (self.registry_down_since or time.monotonic()), 1)}

    def _prefix_bytes_per_token(self) -> int:
        spec = self.model.spec
        return slot_bytes(n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim, max_len=1,
                          dtype=self.dtype)

    def _warm(self, infos: list[TaskInfo]) -> None:
        """Queue the prefix KV of these versions (up to WARM_LIMIT, within half the prefix
        cache) so their first requests find it computed; the engine computes them in
        batches between steps. At startup every active version is new."""
        per_token = self._prefix_bytes_per_token()
        budget = self.engine.prefixes.max_bytes // 2
        queued = 0
        for info in [i for i in infos if i.sha256][:WARM_LIMIT]:
            cost = info.num_virtual_tokens * per_token
            if cost > budget:
                continue
            try:
                self.engine.warm_prefix(info.sha256, self.load_prompt(info.sha256))
            except Exception:  # a missing/corrupt file shows up on the first request instead
                log.exception("could not warm prompt %s", info.sha256)
                continue
            budget -= cost
            queued += 1
        if queued:
            log.info("computing the prefix KV of %d version(s) in the background", queued)

    # ------------------------------------------------------------------ tasks
    def refresh(self, force: bool = False) -> None:
        """Reload the task table if the registry changed."""
        with self._refresh_lock:
            gen = self.registry.generation()
            if gen == self._generation and not force:
                return
            tasks = {name: TaskInfo(name, n, version, sha, template)
                     for name, (n, version, sha, template) in self.registry.serving_index().items()}
            old = self.tasks
            self.tasks = tasks
            self._generation = gen
        live = {i.sha256 for i in tasks.values()}
        for name, info in old.items():  # versions replaced or tasks deleted: drop their prefixes
            new = tasks.get(name)
            if info.sha256 and (new is None or new.sha256 != info.sha256):
                self.engine.prefixes.invalidate(info.sha256)
                if info.sha256 not in live:  # and their cached answers (kept if another task serves it)
                    self.responses.invalidate(info.sha256)
        self.metrics.forget_tasks(set(old) - set(tasks))  # deleted tasks: their per-task series go
        # new versions (at startup: all of them): compute their prefix before the first request
        self._warm([i for n, i in tasks.items() if n not in old or old[n].sha256 != i.sha256])
        if old or tasks:
            log.info("task table reloaded: %d tasks (generation %d)", len(tasks), gen)

    def has_prompt(self, sha256: str) -> bool:
        """Whether `load_prompt(sha256)` would answer from memory (no disk read)."""
        with self._prompts_lock:
            return sha256 in self._prompts

    def load_prompt(self, sha256: str) -> torch.Tensor:
        """The soft prompt of a version (CPU float32), cached in memory by sha256."""
        with self._prompts_lock:
            t = self._prompts.get(sha256)
            if t is not None:
                self._prompts.move_to_end(sha256)
                return t
        t = self.registry.load_prompt(sha256)
        with self._prompts_lock:
            if sha256 not in self._prompts:
                self._prompts[sha256] = t
                self._prompt_bytes += t.nbytes
            while self._prompt_bytes > (256 << 20) and len(self._prompts) > 1:
                _, old = self._prompts.popitem(last=False)
                self._prompt_bytes -= old.nbytes
        return t

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text, add_special_tokens=False).ids

    def encode_bounded(self, text: str, room: int) -> list[int] | int:
        """`text`'s ids if it may fit in `room` tokens; else a lower bound (> room) on its token
        count, found from its length or from a probe of its start, never tokenizing more than
        `room * max_token_chars` characters (a 60 MB prompt is refused in microseconds)."""
        if len(text) > room * self.max_token_chars:
            return -(-len(text) // self.max_token_chars)
        probe_chars = (room + 2) * PROBE_CHARS_PER_TOKEN
        pre = self._encoder.pre_tokenizer
        if len(text) > probe_chars and pre is not None:
            probe = text[:probe_chars]
            words = pre.pre_tokenize_str(probe)
            if len(words) > 2:  # the probe's last two pre-tokens may end differently in the whole text
                cut = words[-2][1][0]
                lower = sum(1 for _, end in self._encoder.encode(probe, add_special_tokens=False).offsets
                            if end <= cut)
                if lower > room:
                    return lower
        return self.encode(text)

    def memory_report(self) -> dict:
        n = [t.num_virtual_tokens for t in self.tasks.values()] or [0]
        avg = sum(n) / len(n)
        return {
            **self.engine.memory_report(),
            "model_bytes": self._model_bytes,
            "per_task_prompt_bytes": int(avg * self.model.spec.n_embd * 4),
            "per_task_prefix_kv_bytes": int(avg * self._prefix_bytes_per_token()),
            "prompt_store_bytes": self._prompt_bytes,
        }
