"""The engine: one loop owns the device; each step is schedule -> execute -> update.

Requests arrive from any thread (`add_request`), results leave through each request's
`on_output` callback, called on the engine thread. The engine imports neither FastAPI
nor SQLAlchemy, so it runs alone on a GPU box (see `bench/`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapters.prefix_cache import PrefixCache
from server.engine.batch import build_step
from server.engine.graphs import StaticDecoder
from server.engine.kv_cache import KVCache, slot_bytes
from server.engine.output import Detokenizer, RequestOutput, detect_loop
from server.engine.sampler import RowSampling, SamplingParams, TokenLogprob, sample
from server.engine.scheduler import Scheduler, SeqState, StepPlan
from server.model import GPT2

log = logging.getLogger("polyprompt.engine")


class QueueFull(RuntimeError):
    pass


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing else asked of the logits: the argmax is the whole answer."""
    return p.greedy and p.logprobs is None and p.repetition_penalty == 1.0


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue: int = 4096
    kv_cache_bytes: int = 6 << 30
    prefix_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # default: the model's n_positions
    # An idle engine that just got a request waits until arrivals pause for this long
    # (at most `admission_max_wait_s`) so that a burst prefills together in one step
    # instead of trickling in: a lone request waits one window, a burst ends its wait
    # as soon as it stops growing.
    admission_window_s: float = 0.01
    admission_max_wait_s: float = 0.2
    # decode-only steps at padded static shapes, captured as CUDA graphs on GPU.
    # None = on for CUDA, off for CPU (where eager dynamic shapes are cheaper).
    static_decode: bool | None = None
    # KV-cache memory order (see `KVCache`); None = token-major for 2-byte dtypes on CPU
    kv_token_major: bool | None = None


@dataclass
class Request:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    task: str = ""  # for metrics and logs
    prefix_key: str = ""  # the prompt version's sha256; "" = no soft prompt
    soft_prompt: torch.Tensor | None = None  # [n, C] float32 (CPU), needed on a cache miss
    on_output: Callable[[RequestOutput], None] | None = None
    stream: bool = False
    arrival: float = field(default_factory=time.monotonic)
    # engine state
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    slot: int = -1
    sampling: RowSampling | None = None
    detok: Detokenizer | None = None
    first_token_time: float | None = None

    @property
    def num_virtual(self) -> int:
        return 0 if self.soft_prompt is None else int(self.soft_prompt.shape[0])

    @property
    def prefix_len(self) -> int:
        """Cache positions before the prompt: the soft prompt's virtual tokens."""
        return self.num_virtual


class Engine:
    def __init__(self, model: GPT2, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        spec = model.spec
        self.max_len = min(self.config.max_model_len or spec.n_positions, spec.n_positions)
        per_slot = slot_bytes(n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim,
                              max_len=self.max_len, dtype=self.dtype)
        num_slots = min(self.config.max_num_seqs, self.config.kv_cache_bytes // per_slot)
        self.cache = KVCache(n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim,
                             max_len=self.max_len, num_slots=num_slots, device=self.device, dtype=self.dtype,
                             token_major=self.config.kv_token_major)
        self.scheduler = Scheduler(max_num_seqs=num_slots,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens)
        self.prefixes = PrefixCache(self.config.prefix_cache_bytes)
        static = self.config.static_decode
        if static is None:
            static = self.device.type == "cuda"
        self.static = StaticDecoder(model, self.cache, capture=True) if static else None
        self.requests: dict[str, Request] = {}
        self._inbox: deque[Request] = deque()
        self._aborts: deque[str] = deque()
        self._warm: deque[tuple[str, torch.Tensor]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "generated_tokens": 0, "prompt_tokens": 0, "finished": 0}
        self.listeners: list[Callable[[Request, RequestOutput], None]] = []

    # ------------------------------------------------------------------ intake (any thread)
    def add_request(self, req: Request) -> None:
        need = req.num_virtual + len(req.prompt_ids) + req.params.max_tokens
        if need > self.max_len:
            raise ValueError(f"request needs {need} positions > context {self.max_len}")
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(self._inbox) + self.scheduler.num_waiting >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} waiting)")
        self._inbox.append(req)
        self._wake.set()

    def warm_prefix(self, key: str, soft_prompt: torch.Tensor) -> None:
        """Compute a prompt version's prefix KV ahead of its first request (engine thread)."""
        self._warm.append((key, soft_prompt))
        self._wake.set()

    def abort(self, req_id: str) -> None:
        self._aborts.append(req_id)
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

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
        while not self._stop.is_set():
            if until():
                return
            if not (self._inbox or self._aborts or self._warm or self.scheduler.has_work()):
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            if self._inbox and not self.scheduler.has_work():
                self._await_burst()
            try:
                self.step()
            except Exception:  # keep serving: fail what was running, carry on
                log.exception("engine step failed; failing the running requests")
                for rid in list(self.scheduler.running):
                    self._retire(rid, "error")

    def _await_burst(self) -> None:
        window = self.config.admission_window_s
        deadline = time.monotonic() + self.config.admission_max_wait_s
        seen = len(self._inbox)
        while window > 0 and seen < self.scheduler.max_num_seqs and time.monotonic() < deadline:
            time.sleep(window)
            if len(self._inbox) == seen:
                return
            seen = len(self._inbox)

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
        self._drain()
        if self._warm:
            self._warm_some(64)
        plan = self.scheduler.schedule()
        if not plan:
            return
        admitted = [self.requests[rid] for rid in plan.admitted]
        fresh = self._compute_prefixes({r.prefix_key: r.soft_prompt for r in admitted if r.soft_prompt is not None},
                                       for_request=True)
        share: dict[str, tuple[torch.Tensor, list[int]]] = {}  # by prefix: one copy into all its new slots
        for req in admitted:
            prefix = self._admit(req, fresh)
            if prefix is not None:
                share.setdefault(req.prefix_key, (prefix, []))[1].append(req.slot)
        for prefix, slots in share.values():
            self.cache.write_prefix(slots, prefix)
        if self.static is not None and not plan.prefill:
            sample_ids = plan.decode
            sampled_reqs = [self.requests[rid] for rid in sample_ids]
            greedy = all(_plain_greedy(r.params) for r in sampled_reqs)
            tokens, logits = self.static.decode(
                [r.slot for r in sampled_reqs],
                [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1] for r in sampled_reqs],
                [r.prefix_len + self.scheduler.running[r.req_id].num_computed for r in sampled_reqs],
                greedy=greedy)
            tokens, lps = (tokens, [None] * len(tokens)) if greedy else \
                sample(logits, [r.sampling for r in sampled_reqs])
        else:
            batch = build_step(plan, self.requests, self.scheduler.running, self.cache)
            hidden = self.model.forward_step(batch.ids, batch.positions, batch.meta, self.cache)
            sample_ids = batch.sample_ids
            sampled_reqs = [self.requests[rid] for rid in sample_ids]
            tokens, lps = self._pick(hidden[batch.sample_rows], [r.sampling for r in sampled_reqs]) \
                if sampled_reqs else ([], [])
        finished = set()
        for req, tok, lp in zip(sampled_reqs, tokens, lps):
            if self._append(req, tok, lp):
                finished.add(req.req_id)
        self.scheduler.on_step_done(plan, set(sample_ids), finished)
        for rid in finished:
            self._release(self.requests.pop(rid))
        self.stats["steps"] += 1

    def _pick(self, hidden: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list]:
        """Next tokens from final hidden states `[R, C]`. Plain greedy rows (no logprobs, no
        penalty) go through `GPT2.greedy` (on CPU: an exact bf16-screened argmax for fp32
        models, a block-wise argmax for bf16); the others get full logits and `sample`."""
        if not self.model.has_fast_greedy:
            return sample(self.model.logits(hidden), rows)
        plain: list[int] = []
        rest: list[int] = []
        for i, r in enumerate(rows):
            (plain if _plain_greedy(r.params) else rest).append(i)
        if not rest:
            return self.model.greedy(hidden), [None] * len(rows)
        tokens: list[int] = [0] * len(rows)
        lps: list = [None] * len(rows)
        if plain:
            for i, tok in zip(plain, self.model.greedy(hidden[torch.tensor(plain)])):
                tokens[i] = tok
        got, got_lps = sample(self.model.logits(hidden[torch.tensor(rest)]), [rows[i] for i in rest])
        for i, tok, lp in zip(rest, got, got_lps):
            tokens[i], lps[i] = tok, lp
        return tokens, lps

    def _drain(self) -> None:
        while self._inbox:
            req = self._inbox.popleft()
            self.requests[req.req_id] = req
            self.scheduler.add(SeqState(req.req_id, len(req.prompt_ids), req.params.max_tokens))
        while self._aborts:
            self._retire(self._aborts.popleft(), "abort")

    def _retire(self, rid: str, reason: str) -> None:
        """End a request from outside the normal finish (abort, failed step): tell its
        caller, drop it from the scheduler, free its slot and prefix reference."""
        req = self.requests.get(rid)
        if req is not None and self.scheduler.abort(rid) is not None:
            self._finish(req, reason)
            self.requests.pop(rid)
            self._release(req)

    def _warm_some(self, limit: int) -> None:
        batch = {}
        while self._warm and len(batch) < limit:
            key, soft = self._warm.popleft()
            batch[key] = soft
        self._compute_prefixes(batch)

    def _compute_prefixes(self, prompts: dict[str, torch.Tensor], *,
                          for_request: bool = False) -> dict[str, torch.Tensor]:
        """Prefix KV of every prompt new to the cache, in one batched forward; returns them
        (a later `put` of the same batch may evict an earlier one when the cache is full).
        `for_request`: computed for requests admitted now (they count as misses)."""
        missing = {k: p for k, p in prompts.items() if k not in self.prefixes}
        if not missing:
            return {}
        computed = dict(zip(missing, self.model.prefix_kv_batch(list(missing.values()))))
        for key, kv in computed.items():
            self.prefixes.put(key, kv, for_request=for_request)
        return computed

    def _admit(self, req: Request, fresh: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Give a new request its slot and sampling state; returns its prefix KV (held
        until `_release`) for the caller to copy into the slot, None without a soft prompt."""
        req.slot = self.cache.allocate()
        self.cache.prepare(req.slot, req.prefix_len + len(req.prompt_ids) + req.params.max_tokens)
        prefix = None
        if req.soft_prompt is not None:
            key, sp = req.prefix_key, req.soft_prompt
            prefix = self.prefixes.acquire(
                key, lambda: fresh[key] if key in fresh else self.model.prefix_kv(sp))
        gen = None
        if not req.params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.params.seed if req.params.seed is not None
                            else int(torch.randint(0, 2**62, ()).item()))
        seen = set(req.prompt_ids) if req.params.repetition_penalty != 1.0 else set()
        req.sampling = RowSampling(req.params, gen, seen)
        req.detok = Detokenizer(self.tokenizer, req.params.stop, eos_token_id=self.model.spec.eos_token_id)
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        return prefix

    def _release(self, req: Request) -> None:
        if req.slot >= 0:
            self.cache.free(req.slot)
            req.slot = -1
            if req.soft_prompt is not None:
                self.prefixes.release(req.prefix_key)

    def _append(self, req: Request, tok: int, lp: TokenLogprob | None) -> bool:
        """Add a sampled token; emit output; True when the request is finished."""
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(tok)
        if lp is not None:
            req.logprobs.append(lp)
        if req.params.repetition_penalty != 1.0:
            req.sampling.seen.add(tok)
        self.stats["generated_tokens"] += 1
        p = req.params
        reason = None
        if tok == self.model.spec.eos_token_id and not p.ignore_eos:
            reason = "stop"
        elif req.detok.add(tok):
            reason = "stop"  # a stop string appeared
        elif p.stop_on_repetition and detect_loop(req.output_ids):
            reason = "repetition"
        elif len(req.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
            return True
        if req.stream and req.on_output is not None:
            req.on_output(RequestOutput(req.req_id, [tok], req.detok.delta(), False, None,
                                        len(req.prompt_ids), lp and [lp]))
        return False

    def _finish(self, req: Request, reason: str) -> None:
        self.stats["finished"] += 1
        text = req.detok.final_text() if req.detok is not None else ""
        out = RequestOutput(req.req_id, req.output_ids[-1:] if req.stream else list(req.output_ids),
                            req.detok.delta(final=True) if (req.stream and req.detok) else text, True, reason,
                            len(req.prompt_ids), req.logprobs[-1:] if req.stream else req.logprobs,
                            token_ids=list(req.output_ids), text=text)
        for fn in self.listeners:
            fn(req, out)
        if req.on_output is not None:
            req.on_output(out)

    def warm_kernels(self) -> int:
        """Build the CPU matmul kernels of every step size this engine can run (see
        `GPT2.warm_kernels`); a second or two at startup instead of on live requests."""
        return self.model.warm_kernels(self.config.max_num_batched_tokens, self.cache.num_slots)

    # ------------------------------------------------------------------ introspection
    def memory_report(self) -> dict:
        return {"kv_cache_bytes": self.cache.nbytes, "kv_slots": self.cache.num_slots,
                "prefix_cache": self.prefixes.stats()}
