"""Per-row sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Greedy rows take one batched argmax. Sampled rows draw with their own
`torch.Generator` (seeded per request), so a seeded request gives the same tokens
whatever shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    stop_on_repetition: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    """Pick one token per row of `logits` `[R, V]` (any float dtype)."""
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
            tokens[i] = _draw(logits[i], r.params, r.generator)
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        if r.params.logprobs is not None:
            lp = torch.log_softmax(logits[i], dim=-1)
            k = max(0, min(r.params.logprobs, 20))
            top = lp.topk(k) if k else None
            logprobs[i] = TokenLogprob(
                tokens[i], float(lp[tokens[i]]),
                list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            )
    return tokens, logprobs


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
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
