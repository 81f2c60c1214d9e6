"""POST /v1/chat/completions (OpenAI chat format) on top of the completions path.

GPT-2 has no chat template, so the messages are rendered to one text with the task's own
template (`chat_template`, set with the task), else the server's `--chat-template`, else a
plain default, by transformers' `apply_chat_template` off the event loop; that text then goes
exactly where a completion's prompt goes (`service.prepare`: context check, the task's soft
prompt in front, its prefix KV), so a chat request gives the tokens a completion of the
rendered text gives. A task's template travels with its entry in the runtime's task table,
so a change goes live with the next registry poll (at once on the server that made it).
"""

from __future__ import annotations

import json
import time
import uuid
from functools import lru_cache, partial
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server import service
from server.api import answers
from server.api.deps import RuntimeDep, User
from server.api.responses import GENERATION
from server.api.schemas import ChatCompletionRequest
from server.errors import APIError
from server.runtime import Runtime

router = APIRouter(dependencies=[User])

# What the model sees by default: one "Role: content" line per message, then "Assistant:" (no
# trailing space: GPT-2's word tokens carry their leading space, so the reply starts " ...").
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateUnreadable(APIError):
    """The server's --chat-template names a file that cannot be read: the operator's to fix."""
    status, type, code = 500, "server_error", "chat_template_unreadable"


@lru_cache(maxsize=8)
def _template(setting: str | None) -> str:
    """The template text for the `chat_template` setting: None is the default; a value holding
    `{` is a template; anything else is the path of a file holding one (read once)."""
    if setting is None:
        return DEFAULT_CHAT_TEMPLATE
    if "{" in setting:
        return setting
    try:
        return Path(setting).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateUnreadable(f"the server's --chat-template {setting!r} is neither a Jinja template nor a "
                                 f"readable UTF-8 file ({type(e).__name__}: {e})") from None


def template_for(rt: Runtime, model: str) -> str:
    """The template a chat request for `model` renders with: the task's own (in its entry of
    the task table), else the server's --chat-template, else the default. The base model and
    unknown names (which `service.prepare` then answers 404) take the server's."""
    own = getattr(rt.tasks.get(model), "chat_template", None) if model != rt.model_id else None
    return own if own is not None else _template(rt.settings.chat_template)


def _apply(rt: Runtime, messages: list[dict], template: str) -> str:
    """`messages` rendered by `template` as transformers does it (the compiled template cached by
    its text). Anything the template raises (syntax, `raise_exception`, an undefined value, a
    division by zero...) comes out as a ValueError with its message: the template is the only
    code that runs here."""
    try:
        text = rt.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    except Exception as e:  # jinja2.TemplateError and whatever a template's expressions raise
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if not isinstance(text, str):  # a template cannot make anything else, but be sure
        raise ValueError("it did not render to text")
    return text


def render(rt: Runtime, body: ChatCompletionRequest) -> str:
    """The messages as the one text the model continues (blocking: call it off the event loop).
    A template that fails on them is a 400 `chat_template_error` with its message."""
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
        return _apply(rt, messages, template_for(rt, body.model))
    except ValueError as e:
        raise APIError(f"the chat template failed on these messages: {e}", code="chat_template_error") from None


# What a task's template must render when it is set: a short conversation, as a request sends it.
SAMPLE_CONVERSATION = (
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "Name a colour."},
)


def check_template(rt: Runtime, template: str) -> None:
    """Refuse (400 `invalid_chat_template`, before anything is stored) a task template that does
    not compile, fails on SAMPLE_CONVERSATION or renders it to no text at all (every request
    would then be an empty prompt). Blocking: call it off the event loop."""
    try:
        text = _apply(rt, [dict(m) for m in SAMPLE_CONVERSATION], template)
    except ValueError as e:
        raise APIError(f"chat_template does not render a sample conversation (user, assistant, user): {e}",
                       code="invalid_chat_template") from None
    if not text:
        raise APIError("chat_template renders a sample conversation (user, assistant, user) to empty text",
                       code="invalid_chat_template")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: a token's characters -> its bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token(rt: Runtime, tid: int) -> dict:
    dec = _byte_decoder()
    piece = rt.tokenizer.convert_ids_to_tokens(tid) or ""
    raw = bytes(dec[c] for c in piece if c in dec) if all(c in dec for c in piece) else piece.encode()
    return {"token": rt.tokenizer.decode([tid]), "bytes": list(raw)}


def chat_logprobs(rt: Runtime, lps) -> dict | None:
    """OpenAI chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    if lps is None:
        return None
    content = [{**_token(rt, lp.token_id), "logprob": lp.logprob,
                "top_logprobs": [{**_token(rt, t), "logprob": v} for t, v in (lp.top or ())]} for lp in lps]
    return {"content": content, "refusal": None}


@router.post("/v1/chat/completions", responses=GENERATION)
async def chat_completions(body: ChatCompletionRequest, rt: RuntimeDep, request: Request):
    if (msg := body.unsupported()) is not None:
        raise APIError(msg)
    service.check_count(rt, body.n)  # before rendering or building anything
    prompt = await anyio.to_thread.run_sync(render, rt, body)
    items = [(body.model, prompt, partial(body.sampling_params, seed_offset=j), body.timeout)
             for j in range(body.n)]
    prepared = await service.prepare(rt, items)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = len(prepared[0].prompt_ids)
    if body.stream:
        submission = service.Submission(rt, prepared, stream=True)  # 503/400 before the 200 goes out
        return StreamingResponse(_stream(body, submission, cid, created, prompt_tokens),
                                 media_type="text/event-stream", background=BackgroundTask(submission.close))
    finals = await service.collect(request, service.Submission(rt, prepared))
    choices = []
    for i, out in enumerate(finals):
        choice = {"index": i, "message": {"role": "assistant", "content": out.text, "refusal": None},
                  "logprobs": chat_logprobs(rt, out.logprobs if body.logprobs else None),
                  "finish_reason": out.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = out.token_ids
        choices.append(choice)
    completion_tokens = sum(len(out.token_ids) for out in finals)
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices, "usage": answers.usage(prompt_tokens, completion_tokens)}


async def _stream(body: ChatCompletionRequest, submission: "service.Submission", cid: str, created: int,
                  prompt_tokens: int):
    """`chat.completion.chunk` events: per choice a `{"role": "assistant"}` delta, then its
    `{"content": ...}` pieces, then an empty delta with its `finish_reason`; with
    `stream_options.include_usage` a last chunk with no choices and the usage; then [DONE]."""
    rt = submission.rt
    usage = bool((body.stream_options or {}).get("include_usage"))

    def event(choices: list[dict], **extra) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                 "choices": choices, **({"usage": None} if usage else {}), **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    completion_tokens = 0
    try:
        for i in range(len(submission.ids)):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for i, out in submission.outputs():
            completion_tokens += len(out.new_token_ids)
            lp = chat_logprobs(rt, out.logprobs if body.logprobs else None)
            if out.text_delta or (lp and lp["content"]) or (body.return_token_ids and out.new_token_ids):
                piece = {"index": i, "delta": {"content": out.text_delta}, "logprobs": lp, "finish_reason": None}
                if body.return_token_ids:
                    piece["token_ids"] = out.new_token_ids
                yield event([piece])
            if out.finished:
                yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])
        if usage:
            yield event([], usage=answers.usage(prompt_tokens, completion_tokens))
    except APIError as e:  # headers are already sent: report in-band
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
