"""A request's state in the engine, the engine's configuration, and its intake refusals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.output import Detokenizer, RequestOutput, detect_loop
from server.engine.sampler import RowSampling, SamplingParams, TokenLogprob
from server.engine.scheduler import Status

# How a request ends (RequestOutput.finish_reason). The first three are OpenAI's; the
# others end a request from outside: its client left, the engine failed on its row, its
# own timeout or the queue-wait bound passed, the server shut down.
FINISH_REASONS = ("stop", "length", "repetition", "abort", "error", "timeout", "queue_timeout", "shutdown")


class QueueFull(RuntimeError):
    """Refused at intake: the queue is full, or the expected wait is over the bound."""

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class EngineConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_queue: int = 1024
    kv_cache_bytes: int = 10 << 30
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
    # "auto": keys and values in the model's dtype; "int8": int8 with a float32 scale per head
    # and position (CPU with the native kernels only; `KVCache`)
    kv_cache_dtype: str = "auto"
    # Refuse a request at intake whose expected queue wait is over this (seconds), and end
    # one still queued after it with "queue_timeout". None = only the queue length bounds.
    max_queue_wait_s: float | None = None


@dataclass
class Request:
    """The one state of a request, from intake to its end: what the client asked, what the
    scheduler counts (`num_computed`, `status`: `scheduler.Seq`), and what the engine holds
    for it (slot, prefix reference, sampling state, detokenizer)."""

    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    task: str = ""  # for metrics and logs
    prefix_key: str = ""  # the prompt version's sha256; "" = no soft prompt
    soft_prompt: torch.Tensor | None = None  # [n, C] float32 (CPU), needed on a cache miss
    on_output: Callable[[RequestOutput], None] | None = None
    stream: bool = False
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time at which it ends with "timeout"
    # scheduler state
    num_computed: int = 0  # prompt + output tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    # engine state
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # the prompt's own log-probs (params.prompt_logprobs), one per prompt token, the first None:
    # filled as its prefill runs, sent with its first output
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    slot: int = -1
    holds_prefix: bool = False  # a reference on the prefix cache entry, dropped on release
    admitted_time: float | None = None
    sampling: RowSampling | None = None
    detok: Detokenizer | None = None
    first_token_time: float | None = None

    def append_token(self, tok: int, lp: TokenLogprob | None, eos_token_id: int) -> str | None:
        """Add a sampled token; returns why the request is done (EOS or a stop string: "stop",
        a loop: "repetition", `max_tokens`: "length"), None while it goes on."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_ids.append(tok)
        if lp is not None:
            self.logprobs.append(lp)
        p = self.params
        if p.repetition_penalty != 1.0:
            self.sampling.seen.add(tok)
        if tok == eos_token_id and not p.ignore_eos:
            return "stop"
        if self.detok.add(tok):
            return "stop"  # a stop string appeared
        if p.stop_on_repetition and detect_loop(self.output_ids, *p.loop_thresholds):
            return "repetition"
        if len(self.output_ids) >= p.max_tokens:
            return "length"
        return None

    def take_prompt_logprobs(self, *, again: bool = False) -> list[TokenLogprob | None] | None:
        """The prompt's log-probs for the first output that carries them (None after that
        unless `again`, and None if not asked for)."""
        if self.params.prompt_logprobs is None or (self.prompt_logprobs_sent and not again):
            return None
        self.prompt_logprobs_sent = True
        return list(self.prompt_logprobs)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def cache_len(self) -> int:
        """Cache positions in use: the virtual tokens and every computed token."""
        return self.prefix_len + self.num_computed

    @property
    def last_token(self) -> int:
        """The token a decode step feeds: the latest output, or the prompt's last after chunking."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_virtual(self) -> int:
        return 0 if self.soft_prompt is None else int(self.soft_prompt.shape[0])

    @property
    def prefix_len(self) -> int:
        """Cache positions before the prompt: the soft prompt's virtual tokens."""
        return self.num_virtual
