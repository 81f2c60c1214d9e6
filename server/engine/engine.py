"""The engine: one loop owns the device; each step is schedule -> execute -> update.

Requests arrive from any thread (`add_request`), results leave through each request's
`on_output` callback, called on the engine thread. The engine imports neither FastAPI
nor SQLAlchemy, so it runs alone on a GPU box (see `bench/`).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from server.engine import openmp
from server.engine.execute import Executor
from server.engine.graphs import StaticDecoder
from server.engine.kv_cache import KVCache, check_kv_cache_dtype, slot_bytes
from server.engine.output import Detokenizer, RequestOutput
from server.engine.prefix_cache import PrefixCache
from server.engine.request import EngineConfig, QueueFull, Request
from server.engine.sampler import RowSampling, TokenLogprob, reduce_seed
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.utilisation import BusyMeter
from server.model import GPT2

__all__ = ["Engine", "EngineConfig", "QueueFull", "Request"]

SLOT_TIME_ALPHA = 0.05  # weight of each finished request in the slot-holding-time average

log = logging.getLogger("polyprompt.engine")


def _ids(plan: StepPlan) -> set[str]:
    return {r.req_id for r in plan.rows()}


class Engine:
    def __init__(self, model: GPT2, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        spec = model.spec
        self.max_len = min(self.config.max_model_len or spec.n_positions, spec.n_positions)
        quantized = check_kv_cache_dtype(self.config.kv_cache_dtype, model)
        per_slot = slot_bytes(n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim,
                              max_len=self.max_len, dtype=torch.int8 if quantized else self.dtype)
        num_slots = min(self.config.max_num_seqs, self.config.kv_cache_bytes // per_slot)
        if num_slots < self.config.max_num_seqs:
            log.warning("the KV-cache budget (%.1f GiB) holds %d slots of %d positions, fewer than the %d "
                        "sequences asked for: at most %d run at once (raise --kv-cache-gb)",
                        self.config.kv_cache_bytes / (1 << 30), num_slots, self.max_len,
                        self.config.max_num_seqs, num_slots)
        self.cache = KVCache(n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim,
                             max_len=self.max_len, num_slots=num_slots, device=self.device, dtype=self.dtype,
                             token_major=self.config.kv_token_major, quantized=quantized)
        self.scheduler = Scheduler(max_num_seqs=num_slots,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens)
        self.prefixes = PrefixCache(self.config.prefix_cache_bytes)
        static = self.config.static_decode
        if static is None:
            static = self.device.type == "cuda"
        self.static = StaticDecoder(model, self.cache, capture=True) if static else None
        self.executor = Executor(model, self.cache, self.static)
        self._inbox: deque[Request] = deque()
        self._aborts: deque[tuple[str, str]] = deque()  # (req_id, finish reason)
        self._abort_all: str | None = None  # a reason: end every request (shutdown)
        self._deadlines: list[tuple[float, str]] = []  # heap of per-request timeouts (engine thread)
        self._warm: deque[tuple[str, torch.Tensor]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.slot_seconds: float | None = None  # moving average of how long a request holds a slot
        self.stats = {"steps": 0, "generated_tokens": 0, "prompt_tokens": 0, "finished": 0, "row_failures": 0}
        self.listeners: list[Callable[[Request, RequestOutput], None]] = []
        self.meter = BusyMeter()  # time inside step() in `_loop` (server/engine/utilisation.py)
        self.threads = torch.get_num_threads()  # the loop's OpenMP team (server/engine/openmp.py)

    # ------------------------------------------------------------------ intake (any thread)
    def add_request(self, req: Request) -> None:
        need = req.num_virtual + len(req.prompt_ids) + req.params.max_tokens
        if need > self.max_len:
            raise ValueError(f"request needs {need} positions > context {self.max_len}")
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_admission(1)
        self._inbox.append(req)
        self._wake.set()

    def check_admission(self, count: int) -> None:
        """Raise QueueFull if `count` more requests would overfill the queue or wait longer
        than `max_queue_wait_s` (refused at once, before any of them is built or queued)."""
        waiting = self.num_waiting
        if waiting + count > self.config.max_queue:
            raise QueueFull(f"the queue is full ({waiting} of {self.config.max_queue} waiting, "
                            f"this request adds {count})")
        bound = self.config.max_queue_wait_s
        if bound is not None:
            wait = self.expected_wait(count)
            if wait > bound:
                raise QueueFull(f"the expected queue wait is {wait:.1f}s, over the {bound:g}s bound",
                                retry_after=min(60.0, max(1.0, wait - bound)))

    def expected_wait(self, count: int = 1) -> float:
        """Seconds the last of `count` new requests would wait for a slot: the requests ahead
        of it beyond the free slots, each slot freeing once per measured `slot_seconds`.
        0 until a request has finished (nothing measured yet)."""
        held = self.slot_seconds
        if held is None:
            return 0.0
        slots = self.cache.num_slots
        backlog = self.num_waiting + count - (slots - self.scheduler.num_running)
        return 0.0 if backlog <= 0 else backlog * held / slots

    def warm_prefix(self, key: str, soft_prompt: torch.Tensor) -> None:
        """Compute a prompt version's prefix KV ahead of its first request (engine thread)."""
        self._warm.append((key, soft_prompt))
        self._wake.set()

    def abort(self, req_id: str, reason: str = "abort") -> None:
        """End a request wherever it is (queued or running) at the next step."""
        self._aborts.append((req_id, reason))
        self._wake.set()

    def abort_all(self, reason: str = "shutdown") -> None:
        """End every request, queued or running, at the next step (drain timeout)."""
        self._abort_all = reason
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.has_work())

    @property
    def requests(self) -> dict[str, Request]:
        """Every request the engine holds (running, then waiting), by id: a view for tests."""
        return {r.req_id: r for r in [*self.scheduler.running.values(), *self.scheduler.waiting]}

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="polyprompt-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Serve on the calling thread until `shutdown()` or `until()` (checked when idle)."""
        self._loop(until)

    def _loop(self, until: Callable[[], bool] = lambda: False) -> None:
        openmp.claim(self.threads)  # the only team with more than one thread: see its module
        while not self._stop.is_set():
            if until():
                return
            if not (self._inbox or self._aborts or self._abort_all or self._warm or self.scheduler.has_work()):
                self._wake.wait(0.05)
                self._wake.clear()
                self.meter.tick()
                continue
            if self._inbox and not self.scheduler.has_work():
                self._await_burst()
            self.meter.begin()
            try:
                self.step()
            except Exception:  # outside any row (rows are contained in `step`): fail what runs
                log.exception("engine step failed outside a row; failing the running requests")
                for req in list(self.scheduler.running.values()):
                    self._end(req, "error")
            finally:
                self.meter.end()

    def _await_burst(self) -> None:
        """An idle engine with new arrivals: wait until they pause for the window (woken by each
        arrival, so the wait ends one window after the last, not up to two), at most the max
        wait, and not at all once they fill the batch (nothing more could join the first step)."""
        window = self.config.admission_window_s
        now = time.monotonic()
        deadline, quiet_at = now + self.config.admission_max_wait_s, now + window
        seen = len(self._inbox)
        while window > 0 and seen < self.scheduler.max_num_seqs:
            self._wake.clear()
            if len(self._inbox) == seen:  # (an arrival before the clear is seen here, not lost)
                left = min(quiet_at, deadline) - time.monotonic()
                if left <= 0 or not self._wake.wait(left):
                    return
            now = time.monotonic()
            if now >= deadline or self._stop.is_set():
                return
            if len(self._inbox) != seen:
                seen, quiet_at = len(self._inbox), now + window

    def generate(self, reqs: list[Request]) -> list[RequestOutput]:
        """Run `reqs` to completion on the calling thread (tests, benchmarks)."""
        finals: dict[str, RequestOutput] = {}
        for r in reqs:
            user_cb = r.on_output

            def cb(out: RequestOutput, _cb=user_cb):
                if out.finished:
                    finals[out.req_id] = out
                if _cb is not None:
                    _cb(out)

            r.on_output = cb
            self.add_request(r)
        while len(finals) < len(reqs):
            self.step()
        return [finals[r.req_id] for r in reqs]

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> None:
        """schedule -> admit -> execute -> update. A row that fails (its admission, its part
        of the forward pass, its sampling or its output) ends alone, with "error"."""
        self._drain()
        if self._warm:
            self._warm_some(64)
        plan = self.scheduler.schedule()
        if not plan:
            return
        failed = self._admit_all(plan)
        live = plan.only(_ids(plan) - failed)
        sampled, tokens, lps = self.executor.run(live, failed) if live else ([], [], [])
        self._update(plan, sampled, tokens, lps, failed)
        self.stats["steps"] += 1

    def _update(self, plan: StepPlan, sampled: list[Request], tokens: list, lps: list, failed: set[str]) -> None:
        """Append each row's token, then end the rows that finished or failed."""
        finished: dict[str, str] = {}  # req_id -> finish reason
        for req, tok, lp in zip(sampled, tokens, lps):
            try:
                if req.params.max_tokens == 0:  # the prompt alone was asked for (echo, scoring)
                    finished[req.req_id] = "length"
                    continue
                if tok is None:
                    raise RuntimeError("sampling failed")
                if (reason := self._append(req, tok, lp)) is not None:
                    finished[req.req_id] = reason
            except Exception:
                log.exception("request %s failed in its update; ending it", req.req_id)
                failed.add(req.req_id)
        self.scheduler.on_step_done(plan.only(_ids(plan) - failed), set(finished) - failed)
        for req in plan.rows():
            if req.req_id in failed:
                self.stats["row_failures"] += 1
                self._end(req, "error")
            elif req.req_id in finished:
                self._end(req, finished[req.req_id])

    def _admit_all(self, plan: StepPlan) -> set[str]:
        """Slots, sampling state and prefix KV for the plan's new rows (one prefix write per
        task, broadcast over its new slots); returns the ids whose admission failed."""
        failed: set[str] = set()
        admitted = plan.admitted
        try:
            fresh = self._compute_prefixes({r.prefix_key: r.soft_prompt for r in admitted
                                            if r.soft_prompt is not None}, for_request=True)
        except Exception:  # each request computes its own below, contained to it
            log.exception("batched prefix computation failed; computing prefixes one by one")
            fresh = {}
        share: dict[str, tuple[torch.Tensor, list[Request]]] = {}  # by prefix: one copy into all its slots
        for req in admitted:
            try:
                prefix = self._admit(req, fresh)
            except Exception:
                log.exception("admitting request %s failed; retiring it", req.req_id)
                failed.add(req.req_id)
                continue
            if prefix is not None:
                share.setdefault(req.prefix_key, (prefix, []))[1].append(req)
        for prefix, reqs in share.values():
            try:
                self.cache.write_prefix([r.slot for r in reqs], prefix)
            except Exception:
                log.exception("writing a prefix into %d slots failed; retiring those requests", len(reqs))
                failed.update(r.req_id for r in reqs)
        return failed

    def _drain(self) -> None:
        while self._inbox:
            req = self._inbox.popleft()
            self.scheduler.add(req)
            if req.deadline is not None:
                heapq.heappush(self._deadlines, (req.deadline, req.req_id))
        if self._abort_all is not None:
            reason, self._abort_all = self._abort_all, None
            for req in [*self.scheduler.running.values(), *self.scheduler.waiting]:
                self._end(req, reason)
        while self._aborts:
            rid, reason = self._aborts.popleft()
            if (req := self.scheduler.find(rid)) is not None:
                self._end(req, reason)
        self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        """End requests past their own timeout, and queued ones past the queue-wait bound
        (the estimate at intake was wrong): the queue's head is its oldest request."""
        while self._deadlines and self._deadlines[0][0] <= now:
            if (req := self.scheduler.find(heapq.heappop(self._deadlines)[1])) is not None:
                self._end(req, "timeout")
        bound = self.config.max_queue_wait_s
        waiting = self.scheduler.waiting
        while bound is not None and waiting and waiting[0].arrival + bound < now:
            self._end(waiting[0], "queue_timeout")

    def _end(self, req: Request, reason: str) -> None:
        """The one way a request ends, whatever the reason (finished, aborted, timed out,
        failed, shut down): out of the scheduler, its slot and prefix reference freed, its
        final output to its caller and the listeners (metrics)."""
        self.scheduler.abort(req.req_id)  # a no-op once `on_step_done` let it go
        self._release(req)
        self._finish(req, reason)

    def _warm_some(self, limit: int) -> None:
        batch = {}
        while self._warm and len(batch) < limit:
            key, soft = self._warm.popleft()
            batch[key] = soft
        try:
            self._compute_prefixes(batch)
        except Exception:  # a warm-up is an optimisation: the first request computes it instead
            log.exception("computing %d prefixes ahead of their requests failed", len(batch))

    def _compute_prefixes(self, prompts: dict[str, torch.Tensor], *,
                          for_request: bool = False) -> dict[str, torch.Tensor]:
        """Prefix KV of every prompt new to the cache, in one batched forward; returns them
        (a later `put` of the same batch may evict an earlier one when the cache is full).
        `for_request`: computed for requests admitted now (they count as misses)."""
        missing = {k: p for k, p in prompts.items() if k not in self.prefixes}
        if not missing:
            return {}
        computed = {key: self.cache.prefix_form(kv)
                    for key, kv in zip(missing, self.model.prefix_kv_batch(list(missing.values())))}
        for key, kv in computed.items():
            self.prefixes.put(key, kv, for_request=for_request)
        return computed

    def _admit(self, req: Request, fresh: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Give a new request its slot and sampling state; returns its prefix KV (held
        until `_release`) for the caller to copy into the slot, None without a soft prompt."""
        req.slot = self.cache.allocate()
        req.admitted_time = time.monotonic()
        self.cache.prepare(req.slot, req.prefix_len + len(req.prompt_ids) + req.params.max_tokens)
        prefix = None
        if req.soft_prompt is not None:
            key, sp = req.prefix_key, req.soft_prompt
            prefix = self.prefixes.acquire(
                key, lambda: fresh[key] if key in fresh else self.cache.prefix_form(self.model.prefix_kv(sp)))
            req.holds_prefix = True
        gen = None
        if not req.params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(reduce_seed(req.params.seed) if req.params.seed is not None
                            else int(torch.randint(0, 2**62, ()).item()))
        seen = set(req.prompt_ids) if req.params.repetition_penalty != 1.0 else set()
        req.sampling = RowSampling(req.params, gen, seen)
        req.prompt_logprobs = [None] if req.params.prompt_logprobs is not None else []  # the first has no context
        req.detok = Detokenizer(self.tokenizer, req.params.stop, eos_token_id=self.model.spec.eos_token_id)
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        return prefix

    def _release(self, req: Request) -> None:
        """Free the slot and prefix reference, and fold the time the slot was held into
        `slot_seconds` (what `expected_wait` divides the queue by)."""
        if req.slot >= 0:
            self.cache.free(req.slot)
            req.slot = -1
        if req.holds_prefix:
            self.prefixes.release(req.prefix_key)
            req.holds_prefix = False
        if req.admitted_time is not None:
            held = time.monotonic() - req.admitted_time
            prev = self.slot_seconds
            self.slot_seconds = held if prev is None else prev + SLOT_TIME_ALPHA * (held - prev)
            req.admitted_time = None

    def _append(self, req: Request, tok: int, lp: TokenLogprob | None) -> str | None:
        """Add a sampled token (streamed at once); returns the finish reason once it is done."""
        reason = req.append_token(tok, lp, self.model.spec.eos_token_id)
        self.stats["generated_tokens"] += 1
        if reason is None and req.stream and req.on_output is not None:
            self._emit(req, RequestOutput(req.req_id, [tok], req.detok.delta(), False, None,
                                          len(req.prompt_ids), lp and [lp],
                                          prompt_logprobs=req.take_prompt_logprobs()))
        return reason

    def _finish(self, req: Request, reason: str) -> None:
        self.stats["finished"] += 1
        text = req.detok.final_text() if req.detok is not None else ""
        out = RequestOutput(req.req_id, req.output_ids[-1:] if req.stream else list(req.output_ids),
                            req.detok.delta(final=True) if (req.stream and req.detok) else text, True, reason,
                            len(req.prompt_ids), req.logprobs[-1:] if req.stream else req.logprobs,
                            token_ids=list(req.output_ids), text=text,
                            prompt_logprobs=req.take_prompt_logprobs(again=not req.stream))
        for fn in self.listeners:
            try:
                fn(req, out)
            except Exception:  # a listener (metrics) must not end the request or the step
                log.exception("finish listener failed for request %s", req.req_id)
        self._emit(req, out)

    def _emit(self, req: Request, out: RequestOutput) -> None:
        """Hand an output to the request's caller; a caller that cannot take it (its event
        loop closed, the client gone) has its request aborted, nothing else."""
        if req.on_output is None:
            return
        try:
            req.on_output(out)
        except Exception:
            log.warning("request %s: its caller did not take an output; aborting it", req.req_id, exc_info=True)
            if not out.finished:
                self.abort(req.req_id)

    def warm_kernels(self) -> int:
        """Build the CPU matmul kernels of every step size this engine can run (see
        `GPT2.warm_kernels`); a second or two at startup instead of on live requests."""
        return self.model.warm_kernels(self.config.max_num_batched_tokens, self.cache.num_slots)

    # ------------------------------------------------------------------ introspection
    def describe_cache(self) -> str:
        """The KV cache's form, for the startup log and /health `paths`."""
        c = self.cache
        if c.quantized:
            return "int8 (a float32 scale per head and position), token-major, %d slots" % c.num_slots
        return "%s, %s, %d slots" % (str(self.dtype).removeprefix("torch."),
                                     "token-major" if c.token_major else "head-major", c.num_slots)

    def memory_report(self) -> dict:
        return {"kv_cache_bytes": self.cache.nbytes, "kv_slots": self.cache.num_slots,
                "kv_cache_dtype": "int8" if self.cache.quantized else str(self.dtype).removeprefix("torch."),
                "prefix_cache": self.prefixes.stats()}
