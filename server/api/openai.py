"""POST /v1/completions (OpenAI) and POST /v1/generate (mixed-task batch)."""

from __future__ import annotations

import json
import time
import uuid
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server import service
from server.api import answers
from server.api.deps import RuntimeDep, User
from server.api.responses import BATCH, GENERATION
from server.api.schemas import CompletionRequest, GenerateRequest
from server.errors import APIError

router = APIRouter(dependencies=[User])


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be an empty list")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


@router.post("/v1/completions", responses=GENERATION)
async def completions(body: CompletionRequest, rt: RuntimeDep, request: Request):
    if (msg := body.unsupported()) is not None:
        raise APIError(msg)
    prompts = _prompts(body.prompt)
    service.check_count(rt, len(prompts) * body.n)  # before building a single item
    items = [(body.model, p, partial(body.sampling_params, seed_offset=j), body.timeout)
             for p in prompts for j in range(body.n)]
    prepared = await service.prepare(rt, items)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(prepared[i * body.n].prompt_ids) for i in range(len(prompts)))
    if body.stream:
        submission = service.Submission(rt, prepared, stream=True)  # 503/400 before the 200 goes out
        return StreamingResponse(_stream(body, submission, cid, created, prompt_tokens, prompts, prepared),
                                 media_type="text/event-stream", background=BackgroundTask(submission.close))
    choices: list[dict | None] = [None] * len(prepared)
    completion_tokens = 0
    finals = await service.collect(request, service.Submission(rt, prepared))
    for i, out in enumerate(finals):
        completion_tokens += len(out.token_ids)
        lp = answers.logprobs_json(rt, out.logprobs if body.logprobs is not None else None)
        text = out.text
        if body.echo:
            echoed = _echo_text(rt, prompts[i // body.n])
            lp = answers.echo_logprobs(rt, prepared[i].prompt_ids, out.prompt_logprobs, lp, len(echoed)) \
                if body.logprobs is not None else None
            text = echoed + text
        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = out.token_ids
        choices[i] = choice
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
            "choices": choices, "usage": answers.usage(prompt_tokens, completion_tokens)}


def _echo_text(rt, prompt: str | list[int]) -> str:
    """The prompt as echoed back: the string sent, or the token ids decoded."""
    return prompt if isinstance(prompt, str) else rt.tokenizer.decode(prompt)


async def _stream(body: CompletionRequest, submission: "service.Submission", cid: str, created: int,
                  prompt_tokens: int, prompts: list, prepared: list):
    rt = submission.rt
    completion_tokens = 0
    offsets = [0] * len(submission.ids)
    echoed = [not body.echo] * len(submission.ids)  # whether item i's prompt went out (its first chunk)
    try:
        async for i, out in submission.outputs():
            completion_tokens += len(out.new_token_ids)
            text = out.text_delta
            lp = answers.logprobs_json(rt, out.logprobs if body.logprobs is not None else None, offsets[i])
            if not echoed[i]:
                echoed[i] = True
                prefix = _echo_text(rt, prompts[i // body.n])
                lp = answers.echo_logprobs(rt, prepared[i].prompt_ids, out.prompt_logprobs, lp, len(prefix)) \
                    if body.logprobs is not None else None
                offsets[i] += len(prefix)
                text = prefix + text
            offsets[i] += len(out.text_delta)
            choice = {"index": i, "text": text, "logprobs": lp,
                      "finish_reason": out.finish_reason if out.finished else None}
            if body.return_token_ids:
                choice["token_ids"] = out.new_token_ids
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if (body.stream_options or {}).get("include_usage"):
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [], "usage": answers.usage(prompt_tokens, completion_tokens)}
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIError as e:  # headers are already sent: report in-band
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/v1/generate", responses=BATCH)
async def generate(body: GenerateRequest, rt: RuntimeDep, request: Request) -> dict:
    """Many requests, tasks mixed, in one call. An item that cannot run (an unknown task, a
    prompt too long, empty or with a bad token id) gets its own `error` in its place while
    the others run; only a call none of whose items can run fails as a whole."""
    items = [(r.task, r.prompt, r.sampling_params, r.timeout) for r in body.requests]
    prepared = await service.prepare(rt, items, per_item=True)
    runnable = [i for i, p in enumerate(prepared) if not isinstance(p, APIError)]
    results: list[dict] = [{"task": r.task, "status": p.status, **p.body()} if isinstance(p, APIError) else {}
                           for r, p in zip(body.requests, prepared)]
    finals = await service.collect(request, service.Submission(rt, [prepared[i] for i in runnable]))
    for i, out in zip(runnable, finals):
        n_prompt = len(prepared[i].prompt_ids)
        results[i] = {"task": body.requests[i].task, "text": out.text, "token_ids": out.token_ids,
                      "finish_reason": out.finish_reason, "usage": answers.usage(n_prompt, len(out.token_ids))}
        if body.requests[i].logprobs is not None:
            results[i]["logprobs"] = answers.logprobs_json(rt, out.logprobs)
    return {"results": results}
