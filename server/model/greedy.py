"""Exact greedy from a cheap screen: a cheaper copy of the LM head (bf16, or int8 where the
CPU has VNNI) finds each row's candidates, exact rescoring picks among them, so the answer is
exactly the full head's `argmax` (fp32's; for a bf16 model, bf16-rounded logits')."""

from __future__ import annotations

from typing import Callable

import torch

from server import cpu_kernels, cpu_matmul
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
               full_greedy: Callable[[torch.Tensor], list[int]]) -> list[int]:
        """Greedy tokens of normed hidden states `h` `[R, C]` (fp32), exactly `full_greedy(h)`
        (the full fp32 head's argmax)."""
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
            return full_greedy(h)
        score = (h[rows] * head_weight[cols]).sum(-1)  # exact fp32 logits of the candidates
        best = torch.full((r,), float("-inf")).scatter_reduce_(0, rows, score, "amax")
        win = score == best[rows]
        vocab = head_weight.shape[0]
        tok = torch.full((r,), vocab, dtype=torch.long).scatter_reduce_(0, rows[win], cols[win], "amin")
        if bool((tok == vocab).any()):  # a row without candidates (non-finite values)
            return full_greedy(h)
        return tok.tolist()


class Int8Screen:
    """The greedy screen on the native int8 kernel (AVX512-VNNI or AMX-INT8: twice bf16's
    rate, half its bytes), for fp32 and bf16 models. Its int8 logits `y_j = s_h s_j q_h . q_j`
    (`h`, `w_j` quantized per row / per token, symmetric) are off the exact `h . w_j` by at
    most `||h - h^|| ||w_j|| + ||h^|| ||w_j - w^_j||` (Cauchy-Schwarz, the first norm computed
    for each row exactly as the kernel quantizes it; an fp32 model's rows are rounded to bf16
    first, and that is counted in), plus float rounding, and the bf16 rounding of the int8
    logits (half the bytes to write and scan), which the pick allows for.
    The vocabulary is stored sorted by that weight error, so each block of 64 tokens (one
    kernel panel) shares a tight bound; a block is searched only if its best int8 logit plus
    its bound reaches the best lower bound found. The candidates are rescored exactly (fp32
    from the model's own weights; a bf16 model's logits rounded to bf16, as its head's are,
    every token within that rounding of the best kept), and the best wins, lowest id on ties.
    The pick is one native call (`cpu_kernels.screen_pick`). A row with too many candidates
    goes to the full head, and a screen that sends over a quarter of its rows there (after 32+
    calls) turns itself off (`off`)."""

    layer = None  # no oneDNN layer: the int8 weight is all it keeps (`Backend.linears`)
    # a row with more candidates goes to the full head: each costs one exact dot product
    # (~0.1 us), one row of the full head about as much as ~10,000 of them
    MAX_ROW_CANDIDATES = 2048
    BF16_SLACK = 2.0**-6  # a bf16 logit's rounding, twice over (the best's and a rival's), with room

    def __init__(self, head_weight: torch.Tensor, lib):
        w = head_weight.detach()
        self.lib, self.k = lib, w.shape[1]
        wf = w.float()
        q, scale = cpu_matmul.quantize_int8(wf)
        wq = q.float() * scale[:, None]
        err, norm, qnorm = (wf - wq).norm(dim=1), wf.norm(dim=1), wq.norm(dim=1)
        self.perm = torch.sort(err + norm * 2**-7, stable=True).indices  # weight error, and a typical row's share
        self.weight = cpu_matmul.pack_int8(w[self.perm])
        self.err, self.norm, self.qnorm = (self._blocks(t[self.perm]) for t in (err, norm, qnorm))
        self.calls = self.rows = self.fallbacks = 0  # fallbacks: rows sent to the full head
        self.off = False

    @staticmethod
    def _blocks(t: torch.Tensor) -> torch.Tensor:
        """Per-block maxima of a per-token vector, in `block_max`'s order (whole blocks, then the tail)."""
        vm = t.shape[0] // BLOCK * BLOCK
        parts = [t[:vm].reshape(-1, BLOCK).amax(dim=1)] + ([t[vm:].amax()[None]] if t.shape[0] > vm else [])
        return torch.cat(parts).double()

    def _bounds(self, hf: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """`[R, blocks]` bounds (float64) on |int8 logit - exact logit| for float32 rows `hf`,
        with `x` (default `hf`; a bf16 copy) the rows the kernel quantizes, before the rounding
        of its output."""
        xf = hf if x is None else x.float()
        s = xf.abs().amax(dim=1) / 127.0  # as the kernel: amax / 127 and its float32 inverse
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = torch.round(xf * inv[:, None]).clamp_(-127, 127).double()  # round half to even, as vcvtps2dq
        hq = q * s.double()[:, None]
        eh = (hf.double() - hq).norm(dim=1)[:, None]
        nq = hq.norm(dim=1)[:, None]
        # + the kernel's float epilogue (3 roundings of |y| <= nq * qnorm) and the exact
        # reference's own fp32 accumulation (K terms), both with room to spare
        b = eh * self.norm + nq * self.err + (4 + 2 * self.k) * 2.0**-24 * nq * self.qnorm
        return b * (1 + 2.0**-10)

    def greedy(self, h: torch.Tensor, head_weight: torch.Tensor,
               full_greedy: Callable[[torch.Tensor], list[int]]) -> list[int]:
        """Greedy tokens of normed hidden states `h` `[R, C]` (the model's dtype), exactly
        `full_greedy(h)`: the argmax of the full head's logits (a bf16 model's rounded to bf16).
        Rows the screen cannot decide (too many candidates, non-finite values) go to `full_greedy`."""
        r = h.shape[0]
        hf = h.float().contiguous()
        x = h.to(torch.bfloat16).contiguous()  # bf16 in, bf16 out: half the logits' bytes
        y = cpu_matmul.linear_int8(self.lib, x, self.weight)  # [R, V], sorted vocabulary
        tok, _ = cpu_kernels.screen_pick(self.lib, y, self._bounds(hf, x), self.perm, hf, head_weight.detach(),
                                         h.dtype == torch.bfloat16, self.BF16_SLACK, self.MAX_ROW_CANDIDATES)
        self.calls += 1
        self.rows += r
        bad = (tok < 0).nonzero().flatten()
        if bad.numel():
            self.fallbacks += bad.numel()
            if self.calls >= 32 and self.fallbacks * 4 > self.rows:
                self.off = True  # the bound is worst-case; for this model it only adds work
            tok[bad] = torch.tensor(full_greedy(h[bad]), dtype=torch.long)
        return tok.tolist()
