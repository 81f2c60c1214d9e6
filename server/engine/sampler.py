"""Per-row sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Greedy rows take one batched argmax. Sampled rows draw with their own
`torch.Generator` (seeded per request), so a seeded request gives the same tokens
whatever shares its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("polyprompt.engine")

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS): logits / 1e-300 would be
# inf, and the argmax is what such a temperature asks for anyway.
SAMPLING_EPS = 1e-5
SEED_SPACE = 1 << 64  # torch.Generator.manual_seed takes [-2**63, 2**64); -s and 2**64 - s seed alike


def reduce_seed(seed: int) -> int:
    """Any integer seed as one the generator takes, deterministically (seed mod 2**64): every
    seed that was valid before keeps its stream (torch maps a negative s to 2**64 + s)."""
    return int(seed) % SEED_SPACE


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives to report per token
    stop_on_repetition: bool | None = False  # None: the server's setting decides (HTTP), else off
    loop_thresholds: tuple[int, int, int] = (16, 4, 32)  # detect_loop's max_period, min_repeats, min_span
    # Log-probs of the prompt's own tokens (echo, scoring), with this many top alternatives
    # each; None: not computed. Only such a request may ask for max_tokens 0.
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError("max_tokens must be >= 1 (0 only with prompt log-probs)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class RowSampling:
    params: SamplingParams
    generator: torch.Generator | None
    seen: set[int] = field(default_factory=set)  # ids in prompt + output, for the penalty


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits` `[R, V]` (any float dtype). A row whose own draw
    fails gets the token None (its caller retires that row); the other rows are unaffected."""
    logits = logits.float()  # CPU reductions over bf16 are slower than the upcast; edited in place
    for i, r in enumerate(rows):
        p = r.params.repetition_penalty
        if p != 1.0 and r.seen:
            ids = torch.tensor(sorted(r.seen), device=logits.device)
            sel = logits[i, ids]
            logits[i, ids] = torch.where(sel > 0, sel / p, sel * p)
    tokens = logits.max(dim=-1).indices.tolist()  # first maximum, like argmax; faster on CPU
    for i, r in enumerate(rows):
        if not r.params.greedy:
            try:
                tokens[i] = _draw(logits[i], r.params, r.generator)
            except Exception as e:  # e.g. a probability row with inf/nan
                log.warning("sampling failed for one row (%s: %s); retiring that row", type(e).__name__, e)
                tokens[i] = None
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        if r.params.logprobs is not None and tokens[i] is not None:
            try:
                logprobs[i] = _logprob(logits[i], tokens[i], r.params.logprobs)
            except Exception as e:
                log.warning("log-probs failed for one row (%s: %s); retiring that row", type(e).__name__, e)
                tokens[i] = None
    return tokens, logprobs


def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    return token_logprobs(logits.unsqueeze(0), [token], k)[0]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each row's log-prob of its token in `logits` `[R, V]` (float32 log-softmax), with the
    row's `k` (at most 20) most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(0, min(k, 20))
    if not k:
        return [TokenLogprob(t, v, []) for t, v in zip(tokens, chosen)]
    top = lp.topk(k, dim=-1)
    return [TokenLogprob(t, v, list(zip(i, x))) for t, v, i, x in
            zip(tokens, chosen, top.indices.tolist(), top.values.tolist())]


def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    x = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > params.top_p  # keep the smallest set reaching top_p
        drop[0] = False  # the top token always stays (a top_p of 1e-300 is top-1)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
