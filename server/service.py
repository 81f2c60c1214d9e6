"""From validated bodies to engine requests and back, shared by /v1/completions and /v1/generate.

Work is refused before it is done: the item count is checked against the queue before any
item is built, a prompt's length is bounded before it is tokenized, and the building and
tokenizing run off the event loop (`prepare`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

import anyio
import torch

from server.engine.engine import QueueFull, Request
from server.engine.output import RequestOutput
from server.engine.sampler import SamplingParams
from server.errors import APIError, ClientGone, EngineFailure, NotFound, Overloaded, RequestTimeout, ShuttingDown
from server.response_cache import CACHED_REASONS, Entry, Recorder, make_key, stream_offsets
from server.runtime import Runtime

# An item: (task or model name, prompt, a builder of its SamplingParams, its timeout in seconds)
Item = tuple[str, "str | list[int]", Callable[[], SamplingParams], "float | None"]


@dataclass
class Prepared:
    task: str  # the `model`/`task` the client named
    prompt_ids: list[int]
    params: SamplingParams
    prefix_key: str = ""
    soft_prompt: torch.Tensor | None = None
    timeout: float | None = None
    # the task version (sha256; "" = the base model) the request runs on, where its prefix_key
    # is a prefix built on it (scoring); None: prefix_key is the version. Response-cache entries
    # are kept while this version is the task's active one.
    version: str | None = None

    @property
    def served_version(self) -> str:
        return self.prefix_key if self.version is None else self.version


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


def _too_long(n_tokens: int, n_virt: int, max_tokens: int, ctx: int, *, at_least: bool = False) -> APIError:
    total = n_tokens + n_virt + max_tokens
    over = total - ctx
    qual = "at least " if at_least else ""
    return APIError(
        f"prompt is {qual}{n_tokens} tokens + {n_virt} virtual + {max_tokens} max_tokens = {qual}{total} > "
        f"{ctx} context; shorten the prompt by {qual}{over} tokens or lower max_tokens",
        code="context_length_exceeded")


def _tokenize(rt: Runtime, prompt: str | list[int], room: int) -> list[int] | int:
    """The prompt's ids, or (when it is sure not to fit in `room` tokens) a lower bound on its
    token count, found without tokenizing all of it (`Runtime.encode_bounded`)."""
    if isinstance(prompt, str):
        return rt.encode_bounded(prompt, room)
    if len(prompt) > room:
        return len(prompt)
    vocab = rt.model.spec.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return list(prompt)


def with_server_defaults(rt: Runtime, params: SamplingParams) -> SamplingParams:
    """What a request left to the server: loop truncation (`--stop-on-repetition`, None in
    the request) and its thresholds (`--loop-max-period` etc.)."""
    s = rt.settings
    stop = s.stop_on_repetition if params.stop_on_repetition is None else params.stop_on_repetition
    return replace(params, stop_on_repetition=stop,
                   loop_thresholds=(s.loop_max_period, s.loop_min_repeats, s.loop_min_span))


def check_count(rt: Runtime, count: int) -> None:
    """Refuse a request of `count` items before building any: over the queue's size it can
    never be served (400); over what the queue has room for now, or over the queue-wait
    bound, it is a 503 with Retry-After."""
    limit = rt.engine.config.max_queue
    try:
        if count > max(1, limit):  # one item is never too many: an empty queue's answer is the 503 below
            raise APIError(f"this request has {count} completions (prompts x n); at most {limit} fit the "
                           "server's queue: split it into smaller requests", code="too_many_items")
        rt.engine.check_admission(count)  # QueueFull: 503 with Retry-After (server/errors.py)
    except Exception as e:
        _count_rejection(rt, e)
        raise


def _count_rejection(rt: Runtime, e: BaseException) -> None:
    """Count a request refused at intake by why (`polyprompt_rejected_requests_total{reason}`):
    the two QueueFull causes told apart by the engine's message, an APIError by its code; once
    per error, however many of the intake steps it passes through."""
    if getattr(e, "_counted", False):
        return
    try:
        e._counted = True  # type: ignore[attr-defined]
    except AttributeError:
        return
    if isinstance(e, QueueFull):
        rt.metrics.reject("queue_full" if str(e).startswith("the queue is full") else "queue_wait")
    elif isinstance(e, ShuttingDown):
        rt.metrics.reject("shutting_down")
    elif isinstance(e, APIError):
        rt.metrics.reject(e.code or "invalid_request")


async def prepare(rt: Runtime, items: list[Item], *, per_item: bool = False) -> list:
    """Resolve tasks, build and tokenize (off the event loop), check every item fits the context.
    `per_item`: an item's own error (unknown task, too long, empty, a bad token id) takes its
    place in the list instead of failing them all, unless every item fails (/v1/generate)."""
    try:
        out = await _prepare(rt, items, per_item)
    except Exception as e:
        _count_rejection(rt, e)
        raise
    errors = [x for x in out if isinstance(x, APIError)]
    for e in errors:
        _count_rejection(rt, e)
    if errors and len(errors) == len(out):
        raise errors[0]  # nothing to run: the call fails as a single item's would
    return out


async def _prepare(rt: Runtime, items: list[Item], per_item: bool) -> list:
    check_count(rt, len(items))
    infos: dict[str, object] = {}
    for name in {it[0] for it in items}:
        try:
            infos[name] = _resolve(rt, name)
        except APIError as e:
            if not per_item:
                raise
            infos[name] = e

    def work() -> list:
        out: list = []
        tokenized: dict[tuple, list[int]] = {}  # n > 1 repeats each prompt
        for item in items:
            try:
                out.append(_prepare_one(rt, item, infos[item[0]], tokenized))
            except APIError as e:
                if not per_item:
                    raise
                out.append(e)
        return out

    if _quick(rt, items, infos):  # nothing here can block: a thread hop would cost more
        return work()
    return await anyio.to_thread.run_sync(work)


INLINE_CHARS = 4096  # text prompts up to this many characters in all are tokenized on the loop


def _quick(rt: Runtime, items: list[Item], infos: dict) -> bool:
    """True when preparing `items` reads no file and tokenizes little (every soft prompt in
    memory, prompts given as token ids or short texts): tens of microseconds."""
    chars = sum(len(it[1]) for it in items if isinstance(it[1], str))
    return chars <= INLINE_CHARS and all(
        info is None or isinstance(info, APIError) or rt.has_prompt(info.sha256) for info in infos.values())


def _prepare_one(rt: Runtime, item: Item, info, tokenized: dict) -> Prepared:
    if isinstance(info, APIError):
        raise info
    name, prompt, make_params, timeout = item
    ctx = rt.engine.max_len
    params = with_server_defaults(rt, make_params())
    soft = rt.load_prompt(info.sha256) if info is not None else None  # cached by sha256
    n_virt = 0 if soft is None else int(soft.shape[0])
    room = max(0, ctx - n_virt - params.max_tokens)
    key = (prompt if isinstance(prompt, str) else tuple(prompt), room)
    if key not in tokenized:
        got = _tokenize(rt, prompt, room)
        if isinstance(got, int):
            raise _too_long(got, n_virt, params.max_tokens, ctx, at_least=isinstance(prompt, str))
        tokenized[key] = got
    ids = list(tokenized[key])
    if not ids:
        raise APIError("the prompt is empty: send at least one token")
    if len(ids) > room:
        raise _too_long(len(ids), n_virt, params.max_tokens, ctx)
    return Prepared(name, ids, params, info.sha256 if info else "", soft, timeout)


def _error_for(reason: str) -> APIError | None:
    """The error a request that ended from outside gives its client."""
    if reason == "error":
        return EngineFailure("the server failed while computing this request (other requests are unaffected); "
                             "retry it, and report it if it keeps failing")
    if reason == "queue_timeout":
        return Overloaded("the request waited longer than the server's queue-wait bound (--max-queue-wait); "
                          "retry later", headers={"Retry-After": "1"}, code="queue_timeout")
    if reason == "timeout":
        return RequestTimeout("the request's own timeout passed before it finished")
    if reason == "shutdown":
        return ShuttingDown("the server shut down before this request finished; retry it",
                            headers={"Retry-After": "1"})
    if reason == "abort":
        return ClientGone("the client left")
    return None


def _still_served(rt: Runtime, p: Prepared) -> bool:
    """Whether the version `p` runs on is still the one its task serves (the base model always is)."""
    version = p.served_version
    if not version:
        return True
    info = rt.tasks.get(p.task)
    return info is not None and info.sha256 == version


class Submission:
    """`prepared` handed to the engine at construction, so a full queue (503) or a refused
    request (400) is raised before any response starts, streaming included. `outputs()`
    yields `(index, output)` as they come and aborts the unfinished ones if the caller leaves.

    Response cache (`server/response_cache.py`): a deterministic item (greedy, seeded, or
    `max_tokens` 0) found in `rt.responses` is answered from it and never reaches the engine
    (it needs no room in the queue either); the others go to the engine, and those of them
    that are deterministic and finish normally fill the cache, streamed or not."""

    def __init__(self, rt: Runtime, prepared: list[Prepared], *, stream: bool = False):
        self.rt = rt
        self.stream = stream
        self.prepared = prepared
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        base = uuid.uuid4().hex
        self.ids = [f"{base}-{i}" for i in range(len(prepared))]
        self.pending = set(range(len(prepared)))
        self._hits: dict[int, Entry] = {}  # items answered from the response cache
        self._keys: dict[int, tuple] = {}  # engine items whose answer may fill it
        self._recorders: dict[int, Recorder] = {}  # ... and, streaming, what they were sent
        if rt.responses.enabled:
            for i, p in enumerate(prepared):
                if not _still_served(rt, p) or (key := make_key(p.prefix_key, p.prompt_ids, p.params)) is None:
                    continue
                if (entry := rt.responses.get(key)) is not None:
                    self._hits[i] = entry
                else:
                    self._keys[i] = key
        self._engine_items = [i for i in range(len(prepared)) if i not in self._hits]
        if self._engine_items:  # the queue may have filled while this one was tokenized; hits need no room
            check_count(rt, len(self._engine_items))
        for i in self._keys:
            rt.metrics.response_cache_lookup(prepared[i].task, hit=False)
        for i in self._hits:
            rt.metrics.response_cache_lookup(prepared[i].task, hit=True)
        if stream:
            self._recorders = {i: Recorder() for i in self._keys}
        submitted: list[int] = []
        now = time.monotonic()
        try:
            for i in self._engine_items:
                p = prepared[i]

                def cb(out: RequestOutput, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))  # raises once the loop closed

                req = Request(self.ids[i], p.prompt_ids, p.params, task=p.task, prefix_key=p.prefix_key,
                              soft_prompt=p.soft_prompt, on_output=cb, stream=stream, arrival=now,
                              deadline=None if p.timeout is None else now + p.timeout)
                rt.engine.add_request(req)  # prepare() checked what it refuses; QueueFull: 503
                submitted.append(i)
        except BaseException as e:
            for i in submitted:
                rt.engine.abort(self.ids[i])
            _count_rejection(rt, e)
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for i, entry in self._hits.items():  # answered at once, in the engine's output shape
                if self.stream and entry.offsets is None:  # filled by a non-streaming request
                    entry.offsets = await anyio.to_thread.run_sync(
                        stream_offsets, entry, self.prepared[i].params, self.rt.tokenizer,
                        self.rt.model.spec.eos_token_id)
                for out in entry.outputs(self.ids[i], stream=self.stream):
                    if out.finished:
                        self.pending.discard(i)
                    yield i, out
            while self.pending:
                i, out = await self.queue.get()
                if (rec := self._recorders.get(i)) is not None:
                    rec.add(out)
                if out.finished:
                    self.pending.discard(i)
                    err = _error_for(out.finish_reason or "")
                    if err is not None:
                        raise err
                    self._fill(i, out)
                yield i, out
        finally:
            self.close()

    def _fill(self, i: int, out: RequestOutput) -> None:
        """Store a deterministic item that finished normally, if its version is still served."""
        key = self._keys.get(i)
        if key is None or out.finish_reason not in CACHED_REASONS:
            return
        p = self.prepared[i]
        if not _still_served(self.rt, p):  # replaced or deleted while it ran: never asked for again
            return
        rec = self._recorders.get(i)
        version = p.served_version
        entry = rec.entry(out, version) if rec is not None else Entry.from_final(out, version)
        self.rt.responses.put(key, entry)

    def close(self) -> None:
        """Abort what has not finished (the caller left; a no-op once all are done). Also
        the response's background task, for a client gone before `outputs()` started."""
        for i in self.pending:
            if i not in self._hits:
                self.rt.engine.abort(self.ids[i])
        self.pending.clear()


async def collect(request, submission: Submission) -> list[RequestOutput]:
    """The final output of every item, in order, for a non-streaming answer. While waiting,
    the connection is watched: a client that leaves (closed the socket, timed out) has its
    items aborted at the engine's next step, queued or running, instead of running on."""
    finals: list[RequestOutput | None] = [None] * len(submission.ids)
    gone = False
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal gone
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            async for i, out in submission.outputs():
                finals[i] = out
        except Exception as e:  # raised after the group, not wrapped in an ExceptionGroup
            error = e
        finally:
            tg.cancel_scope.cancel()
    if gone:
        submission.close()
        raise ClientGone("the client left before the answer was ready")
    if error is not None:
        raise error
    return finals  # type: ignore[return-value]
