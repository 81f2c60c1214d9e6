"""/v1/score's requests: each candidate continuing a prompt, all candidates on one shared prefix.

A causal model's keys and values of a prefix depend on nothing after it, so the prefix (the
task's virtual tokens followed by the prompt's tokens but its last) is computed once, in the
prefix cache as a task's soft prompt is, and copied into every candidate's slot. Each
candidate's request is the prompt's last token + the candidate's tokens, asking for those
tokens' log-probs and no new token (`max_tokens` 0); the candidates run as one batched
prefill. A candidate is tokenized on its own (include its leading space: " Paris").
"""

from __future__ import annotations

import anyio
import torch

from common import sha256_bytes
from server.engine.output import RequestOutput
from server.engine.sampler import SamplingParams
from server.errors import APIError
from server.runtime import Runtime
from server.service import Prepared, _count_rejection, _resolve, _tokenize, _too_long, check_count

SCORE_KEY = "score"  # prefix-cache keys of scoring prefixes: "score:<task sha or ''>:<sha256 of the tokens>"


async def prepare_score(rt: Runtime, name: str, prompt: str | list[int], candidates: list,
                        timeout: float | None) -> tuple[list[Prepared], int]:
    """One engine request per candidate (see the module's docstring); returns the requests and
    the prompt's token count. Refusals are counted as `service.prepare`'s are."""
    try:
        check_count(rt, len(candidates))
        info = _resolve(rt, name)
        return await anyio.to_thread.run_sync(_build, rt, name, info, prompt, candidates, timeout)
    except Exception as e:
        _count_rejection(rt, e)
        raise


def _build(rt: Runtime, name: str, info, prompt, candidates: list, timeout) -> tuple[list[Prepared], int]:
    soft = rt.load_prompt(info.sha256) if info is not None else None
    n_virt = 0 if soft is None else int(soft.shape[0])
    ctx = rt.engine.max_len
    ids = _tokenize(rt, prompt, max(0, ctx - n_virt - 1))
    if isinstance(ids, int):
        raise _too_long(ids, n_virt, 1, ctx, at_least=isinstance(prompt, str))
    if not ids:
        raise APIError("the prompt is empty: send at least one token")
    room = ctx - n_virt - len(ids)
    cands = []
    for j, c in enumerate(candidates):
        got = _tokenize(rt, c, room)
        if isinstance(got, int) or len(got) > room:
            n = got if isinstance(got, int) else len(got)
            raise APIError(f"candidate {j} is {'at least ' if isinstance(got, int) else ''}{n} tokens; with the "
                           f"prompt's {len(ids)} and {n_virt} virtual tokens at most {room} fit the {ctx} context",
                           code="context_length_exceeded")
        if not got:
            raise APIError(f"candidate {j} is empty once tokenized: send at least one token")
        cands.append(got)
    head = ids[:-1]
    wte = rt.model.wte.weight
    parts = ([soft.float()] if soft is not None else []) + \
        ([wte[torch.tensor(head, device=wte.device)].detach().float().cpu()] if head else [])
    prefix = torch.cat(parts) if parts else None
    version = info.sha256 if info else ""
    key = f"{SCORE_KEY}:{version}:{sha256_bytes(str(head).encode())}" if prefix is not None else ""
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)
    return [Prepared(name, [ids[-1]] + c, params, key, prefix, timeout, version) for c in cands], len(ids)


def score_results(outputs: list[RequestOutput]) -> dict:
    """`/v1/score`'s answer from the candidates' outputs (each one's prompt log-probs after
    the first: the candidate's tokens)."""
    results = []
    for out in outputs:
        lps = [lp.logprob for lp in (out.prompt_logprobs or [])[1:]]
        total = float(sum(lps))
        results.append({"logprob": total, "mean_logprob": total / len(lps), "num_tokens": len(lps)})
    best = max(range(len(results)), key=lambda i: results[i]["logprob"])
    return {"results": results, "best": best}
