"""From validated bodies to engine requests and back, shared by /v1/completions and /v1/generate."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import anyio
import torch

from server.engine.engine import QueueFull, Request
from server.engine.output import RequestOutput
from server.engine.sampler import SamplingParams
from server.errors import APIError, NotFound, Overloaded
from server.runtime import Runtime


@dataclass
class Prepared:
    task: str  # the `model`/`task` the client named
    prompt_ids: list[int]
    params: SamplingParams
    prefix_key: str = ""
    soft_prompt: torch.Tensor | None = None


def _resolve(rt: Runtime, name: str):
    if name == rt.model_id:
        return None
    info = rt.tasks.get(name)
    if info is None:
        raise NotFound(f"model/task {name!r} not found; GET /v1/models lists what is served",
                       code="model_not_found")
    if info.sha256 is None:
        raise NotFound(f"task {name!r} has no soft prompt yet; upload one to "
                       f"POST /v1/tasks/{name}/prompt", code="model_not_found")
    return info


def _tokenize(rt: Runtime, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return rt.encode(prompt)
    vocab = rt.model.spec.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return list(prompt)


async def prepare(rt: Runtime, items: list[tuple[str, str | list[int], SamplingParams]]) -> list[Prepared]:
    """Resolve tasks, tokenize (off the event loop) and check every request fits the context."""
    infos = [_resolve(rt, name) for name, _, _ in items]

    def work() -> list[Prepared]:
        out = []
        tokenized: dict[str | tuple[int, ...], list[int]] = {}  # n > 1 repeats each prompt
        for (name, prompt, params), info in zip(items, infos):
            key = prompt if isinstance(prompt, str) else tuple(prompt)
            if key not in tokenized:
                tokenized[key] = _tokenize(rt, prompt)
            ids = list(tokenized[key])
            if not ids:
                raise APIError("the prompt is empty: send at least one token")
            soft = rt.load_prompt(info.sha256) if info is not None else None  # cached by sha256
            n_virt = 0 if soft is None else int(soft.shape[0])
            total = len(ids) + n_virt + params.max_tokens
            ctx = rt.engine.max_len
            if total > ctx:
                over = total - ctx
                raise APIError(
                    f"prompt is {len(ids)} tokens + {n_virt} virtual + {params.max_tokens} max_tokens = "
                    f"{total} > {ctx} context; shorten the prompt by {over} tokens or lower max_tokens",
                    code="context_length_exceeded")
            out.append(Prepared(name, ids, params, info.sha256 if info else "", soft))
        return out

    return await anyio.to_thread.run_sync(work)


class Submission:
    """`prepared` handed to the engine at construction, so a full queue (503) or a refused
    request (400) is raised before any response starts, streaming included. `outputs()`
    yields `(index, output)` as they come and aborts the unfinished ones if the caller leaves."""

    def __init__(self, rt: Runtime, prepared: list[Prepared], *, stream: bool = False):
        self.rt = rt
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        base = uuid.uuid4().hex
        self.ids = [f"{base}-{i}" for i in range(len(prepared))]
        self.pending = set(range(len(prepared)))
        submitted = 0
        try:
            for i, p in enumerate(prepared):
                def cb(out: RequestOutput, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))

                req = Request(self.ids[i], p.prompt_ids, p.params, task=p.task, prefix_key=p.prefix_key,
                              soft_prompt=p.soft_prompt, on_output=cb, stream=stream)
                try:
                    rt.engine.add_request(req)
                except QueueFull as e:
                    raise Overloaded(f"{e}; retry later", headers={"Retry-After": "1"}) from None
                except ValueError as e:
                    raise APIError(str(e)) from None
                submitted += 1
        except BaseException:
            for rid in self.ids[:submitted]:
                rt.engine.abort(rid)
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self.pending:
                i, out = await self.queue.get()
                if out.finished:
                    self.pending.discard(i)
                    if out.finish_reason == "error":
                        raise APIError("the engine failed while running this request", status=500,
                                       code="engine_error")
                yield i, out
        finally:
            self.close()

    def close(self) -> None:
        """Abort what has not finished (the caller left; a no-op once all are done). Also
        the response's background task, for a client gone before `outputs()` started."""
        for i in self.pending:
            self.rt.engine.abort(self.ids[i])
        self.pending.clear()


async def run(rt: Runtime, prepared: list[Prepared], *, stream: bool = False) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit all, yield `(index, output)` as they come; aborts the rest if the caller leaves."""
    async for item in Submission(rt, prepared, stream=stream).outputs():
        yield item


def logprobs_json(rt: Runtime, out_logprobs, text_offset: int = 0) -> dict | None:
    """OpenAI legacy completions `logprobs` object."""
    if out_logprobs is None:
        return None
    dec = rt.tokenizer.decode
    tokens, lps, tops, offsets = [], [], [], []
    pos = text_offset
    for lp in out_logprobs:
        s = dec([lp.token_id])
        tokens.append(s)
        lps.append(lp.logprob)
        tops.append({dec([t]): v for t, v in lp.top} if lp.top else None)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
