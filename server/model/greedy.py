"""Exact greedy from a cheap screen: a bf16 copy of the LM head finds each row's candidates,
fp32 rescoring picks among them, so the answer is exactly fp32's `argmax`."""

from __future__ import annotations

from typing import Callable

import torch

from server.model.linear import Linear, bucketed

BLOCK = 64


def block_max(logits: torch.Tensor):
    """Maxima of `[R, V]` logits per block of 64 and per row, in one pass (bf16 row-wise
    reductions are slow on CPU; these are not). Returns blocks `[R, V//64, 64]` (a view),
    their maxima, the last `V % 64` logits, and the row maxima."""
    r, v = logits.shape
    vm = v // BLOCK * BLOCK
    blocks = logits[:, :vm].reshape(r, -1, BLOCK)
    bmax = blocks.amax(dim=-1)
    tail = logits[:, vm:]
    top = bmax.amax(dim=-1)
    if tail.shape[1]:
        top = torch.maximum(top, tail.amax(dim=-1))
    return blocks, bmax, tail, top


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """`logits.argmax(-1)` (first maximum) by way of `block_max`."""
    blocks, bmax, tail, top = block_max(logits)
    hit = bmax == top[:, None]
    first = hit.int().argmax(dim=-1)  # argmax returns the first of equal maxima
    inner = (blocks[torch.arange(logits.shape[0]), first] == top[:, None]).int().argmax(dim=-1)
    tok = first * BLOCK + inner
    if tail.shape[1]:
        in_tail = (tail == top[:, None]).int().argmax(dim=-1) + blocks.shape[1] * BLOCK
        tok = torch.where(hit.any(dim=-1), tok, in_tail)
    return tok.tolist()


class GreedyScreen:
    """The LM head is 1/4 of a decode step's FLOPs. A bf16 copy (AMX, half the bytes: ~6x
    faster here) screens the vocabulary: by the bound below, the fp32 argmax is among the
    tokens whose bf16 logit is within 2 * bound of the row's best, typically a few dozen.
    Only those are rescored in fp32, and the best fp32 logit wins (ties: lowest id, like
    argmax). If a row has too many candidates, everything falls back to the full fp32 head,
    so the answer never depends on the screen; a screen that falls back on most of its first
    32+ calls turns itself off (`off`)."""

    # |bf16 logit - fp32 logit| <= SCREEN_EPS * ||h|| * max_j ||w_j||: rounding h and w to bf16
    # (2u + u^2, u = 2^-8), fp32 accumulation over C <= 4096 terms (C * 2^-24), and rounding
    # the bf16 output (u * |logit| <= u * ||h|| ||w|| * (1 + 2^-7)): at most 0.0121 in all, with
    # round-to-nearest conversions (oneDNN's and PyTorch's).
    SCREEN_EPS = 0.0125
    MAX_CANDIDATES = 64  # per row on average; beyond that the full fp32 head is cheaper

    def __init__(self, head_weight: torch.Tensor, batch_hint: int = 128):
        w = head_weight.detach()
        self.layer = Linear.frozen(w.to(torch.bfloat16), batch_hint)
        self.bound = float(w.float().norm(dim=1).max())
        self.calls = self.fallbacks = 0
        self.off = False

    def greedy(self, h: torch.Tensor, head_weight: torch.Tensor,
               full_logits: Callable[[torch.Tensor], torch.Tensor]) -> list[int]:
        """Greedy tokens of normed hidden states `h` `[R, C]` (fp32), exactly
        `full_logits(h).argmax(-1)`."""
        r = h.shape[0]
        lb = bucketed(self.layer, h.to(torch.bfloat16))  # [R, V] bf16
        bound = self.SCREEN_EPS * h.norm(dim=-1) * self.bound  # [R]
        blocks, bmax, tail, top = block_max(lb)  # look inside candidate blocks only
        thr = top.float() - 2 * bound  # [R]
        thr = (thr - thr.abs() * 2**-7).to(lb.dtype)  # rounding to bf16 (2^-9) can't raise it past thr
        br, bc = (bmax >= thr[:, None]).nonzero(as_tuple=True)  # candidate blocks
        pi, pj = (blocks[br, bc] >= thr[br][:, None]).nonzero(as_tuple=True)
        tr, tc = (tail >= thr[:, None]).nonzero(as_tuple=True)
        vm = blocks.shape[1] * BLOCK
        rows = torch.cat([br[pi], tr])
        cols = torch.cat([bc[pi] * BLOCK + pj, tc + vm])
        self.calls += 1
        if rows.numel() > self.MAX_CANDIDATES * r:
            self.fallbacks += 1
            if self.calls >= 32 and self.fallbacks * 2 > self.calls:
                # this model's logits are too close for the bound (the bound is worst-case):
                # the screen only adds work here, so stop screening
                self.off = True
            return full_logits(h).max(dim=-1).indices.tolist()
        score = (h[rows] * head_weight[cols]).sum(-1)  # exact fp32 logits of the candidates
        best = torch.full((r,), float("-inf")).scatter_reduce_(0, rows, score, "amax")
        win = score == best[rows]
        vocab = head_weight.shape[0]
        tok = torch.full((r,), vocab, dtype=torch.long).scatter_reduce_(0, rows[win], cols[win], "amin")
        if bool((tok == vocab).any()):  # a row without candidates (non-finite values)
            return full_logits(h).max(dim=-1).indices.tolist()
        return tok.tolist()
