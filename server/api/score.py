"""POST /v1/score: how likely each candidate continuation of a prompt is, for one task.

What classification with a prompt-tuned task needs: the candidates' summed and mean
log-probs with the task's soft prompt in front, computed in one batched pass that shares
the prompt's keys and values (`server.scoring`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import scoring, service
from server.api import answers
from server.api.deps import RuntimeDep, User
from server.api.responses import BATCH
from server.api.schemas import ScoreRequest

router = APIRouter(dependencies=[User])


@router.post("/v1/score", responses=BATCH)
async def score(body: ScoreRequest, rt: RuntimeDep, request: Request) -> dict:
    """Each candidate's log-prob of continuing the prompt (`logprob`: summed over its
    tokens, `mean_logprob`, `num_tokens`) and `best`, the index of the highest `logprob`.
    A candidate is tokenized on its own and appended to the prompt's tokens: give it its
    leading space (`" Paris"`)."""
    prepared, n_prompt = await scoring.prepare_score(rt, body.model, body.prompt, body.candidates, body.timeout)
    finals = await service.collect(request, service.Submission(rt, prepared))
    answer = scoring.score_results(finals)
    for item, candidate in zip(answer["results"], body.candidates):
        item["candidate"] = candidate
    answer["model"] = body.model
    answer["usage"] = answers.usage(n_prompt + sum(len(p.prompt_ids) - 1 for p in prepared), 0)
    return answer
