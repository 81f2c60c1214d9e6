"""OpenAPI `responses` for the routes: every error status a route can answer, in the error shape.

Clients and the schemathesis test read these: a status the server answers that is not listed
here is a contract bug. Every route lists 503, because every route refuses while the server
drains; the generation routes' 503 is also the overload answer, with `Retry-After`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "code"}}`, as OpenAI's servers answer errors."""
    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying (sent when overloaded)",
                                "schema": {"type": "string"}}}

_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "a body that cannot be parsed (not UTF-8, a broken multipart form), or a value the "
                         "server cannot serve (e.g. prompt + virtual tokens + max_tokens over the context, a "
                         "token id outside the vocabulary, a bad adapter file)"},
    401: {"description": "no valid key: send 'Authorization: Bearer <key>' (only when keys are configured)"},
    403: {"description": "a user key on an admin endpoint (only when an admin key is configured)"},
    404: {"description": "unknown task, model or version"},
    409: {"description": "the name is taken (a task, or the base model's id)"},
    413: {"description": "request body over --max-body-mb"},
    422: {"description": "a field missing, of the wrong type or out of range"},
    500: {"description": "the engine failed while running this request (other requests are unaffected)"},
    503: {"description": "the server is shutting down and refuses new requests"},
    408: {"description": "the request's own `timeout` passed before it finished"},
}

_OVERLOADED = {"description": "overloaded: the queue is full, or the request would wait (or has waited) longer "
                              "than --max-queue-wait; retry after Retry-After seconds. Also: shutting down",
               "headers": _RETRY_AFTER}


def errors(*statuses: int, overload: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering `statuses` (503 always); `overload` documents 503 with Retry-After."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 503}):
        spec = _OVERLOADED if status == 503 and overload else _ERRORS[status]
        out[status] = {"model": ErrorResponse, **spec}
    return out


SYSTEM = errors()
# a text/plain route: FastAPI would file `model=` responses under text/plain, but errors are JSON
PLAIN_SYSTEM = {503: {**_ERRORS[503], "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/ErrorResponse"}}}}}  # the schema is registered by the routes using SYSTEM
USER = errors(401)
USER_TASK = errors(401, 404, 422)  # 422: FastAPI documents one for any route with a path parameter
ADMIN_CREATE = errors(400, 401, 403, 409, 413, 422)
ADMIN_TASK = errors(401, 403, 404, 422)
ADMIN_UPLOAD = errors(400, 401, 403, 404, 413, 422)
ADMIN_ACTIVATE = errors(400, 401, 403, 404, 413, 422)
# one server-sent event, as OpenAPI 3.2 describes events (without `itemSchema`, `schema` is per event)
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk (a text_completion, or an error object), or [DONE]"},
    "event": {"type": "string"}}}
GENERATION = {
    200: {"description": "the result; with `stream: true`, server-sent events `data: {...}` ending with "
                         "`data: [DONE]`",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    **errors(400, 401, 404, 408, 413, 422, 500, overload=True),
}
BATCH = errors(400, 401, 404, 408, 413, 422, 500, overload=True)

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["adapter_model.safetensors"],
    "properties": {
        "adapter_model.safetensors": {"type": "string", "format": "binary",
                                      "description": "PEFT prompt-tuning weights, key `prompt_embeddings`, "
                                                     "shape [num_virtual_tokens, hidden]"},
        "adapter_config.json": {"type": "string", "format": "binary",
                                "description": "optional PEFT adapter_config.json"},
    }}}}}}
