"""Executing a step: a plan's rows through one forward pass to their next tokens, on the
dynamic path or the static (CUDA-graph) decoder, with a failing row found and left out."""

from __future__ import annotations

import logging

import torch

from server.engine.batch import build_step
from server.engine.graphs import StaticDecoder
from server.engine.kv_cache import KVCache
from server.engine.request import Request
from server.engine.sampler import RowSampling, SamplingParams, TokenLogprob, sample, token_logprobs
from server.engine.scheduler import StepPlan
from server.model import GPT2

log = logging.getLogger("polyprompt.engine")


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing else asked of the logits: the argmax is the whole answer."""
    return p.greedy and p.logprobs is None and p.repetition_penalty == 1.0


class Executor:
    def __init__(self, model: GPT2, cache: KVCache, static: StaticDecoder | None):
        self.model, self.cache, self.static = model, cache, static

    def run(self, plan: StepPlan, failed: set[str]) -> tuple[list[Request], list, list]:
        """One forward pass over the plan's rows and their next tokens. If it raises, the rows
        are re-run in halves down to single rows; a row that fails alone joins `failed`. Each
        row reads and writes only its own slot, so a re-run computes exactly the same."""
        try:
            return self._forward(plan)
        except Exception:
            rows = plan.rows()
            if len(rows) == 1:
                log.exception("request %s failed in the forward pass; ending it", rows[0].req_id)
                failed.add(rows[0].req_id)
                return [], [], []
            log.warning("a step of %d rows failed; re-running it in halves to find the row", len(rows))
            out: tuple[list, list, list] = ([], [], [])
            for half in plan.halves():
                for acc, part in zip(out, self.run(half, failed)):
                    acc.extend(part)
            return out

    def _forward(self, plan: StepPlan) -> tuple[list[Request], list, list]:
        step = build_step(plan, self.cache)
        sampled = step.sampled
        if self.static is not None and not plan.prefill:
            greedy = all(_plain_greedy(r.params) for r in sampled)
            tokens, logits = self.static.decode(step, greedy=greedy)
            tokens, lps = (tokens, [None] * len(tokens)) if greedy else sample(logits, [r.sampling for r in sampled])
            return sampled, tokens, lps
        batch = step.to_device(self.cache.k[0].device)
        hidden = self.model.forward_step(batch.ids, batch.positions, batch.meta, self.cache)
        prompt_lps = [(r, self._prompt_logprobs(hidden, r, i, start, n)) for r, i, start, n in step.prompt_rows]
        tokens, lps = self._pick(hidden[batch.sample_rows], [r.sampling for r in sampled]) if sampled else ([], [])
        for r, got in prompt_lps:  # kept only once the whole step succeeded (a failed one is re-run)
            r.prompt_logprobs.extend(got)
        return sampled, tokens, lps

    PROMPT_LOGPROB_ROWS = 128  # rows of full-vocabulary logits at a time (128 x 50257 float32: 26 MB)

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request, first: int, start: int,
                         n: int) -> list[TokenLogprob]:
        """Log-probs of prompt tokens start+1 .. start+n, from the hidden states of the tokens
        before each (rows first .. first+n-1 of the step)."""
        out: list[TokenLogprob] = []
        k = req.params.prompt_logprobs or 0
        for a in range(0, n, self.PROMPT_LOGPROB_ROWS):
            b = min(n, a + self.PROMPT_LOGPROB_ROWS)
            logits = self.model.logits(hidden[first + a:first + b])
            out.extend(token_logprobs(logits, req.prompt_ids[start + 1 + a:start + 1 + b], k))
        return out

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

