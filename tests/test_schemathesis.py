"""Schemathesis fuzzes every operation in /openapi.json against a real `polyprompt serve`.

Checks: no 5xx ever; every status, media type, header and body the server answers is the one
documented for that operation; a request that breaks the schema is refused; a wrong method is a
405. A real HTTP server (not ASGI in-process) so the answers are what clients get: uvicorn's
framing, the engine on the main thread and HTTP on another, the body-size and drain middleware.

Two in three valid cases are steered (`_steer`) so the fuzzer reaches the engine and the registry,
not only the 404s that random names and the 400s that empty prompts give: names that exist (a task
with a soft prompt, the base model, a task kept for deletion), a one-token prompt for an empty one,
no fields accepted only at their neutral values, `1` for `1.0`. Every other value is the fuzzer's,
and invalid (negative) cases are never touched."""

from __future__ import annotations

import zlib
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.serverutil import running_server

TASK, DOOMED = "fuzz", "doomed"
# OpenAI fields /v1/completions takes only at their neutral values: any other value is a 400, and a
# random body nearly always has one
NEUTRAL_ONLY = {"echo", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix"}
MAX_EXAMPLES = 100  # per operation, besides schemathesis's coverage cases (~1 min in all on 2 cores)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Small limits keep the fuzzer's biggest valid requests cheap: 8 running rows, a small KV cache, at
    most 64 completions a request (more is a 400 at once). The expected-wait bound is off: this one
    sequential client, reading every answer to its end, never queues behind itself, so any 503 is a bug
    (a full queue cannot happen either: a request over --max-queue is a 400)."""
    data = tmp_path_factory.mktemp("data-fuzz")
    with running_server(tiny_model_dir, data, "--max-batch-size", "8", "--max-queue", "64", "--max-queue-wait", "0",
                        "--kv-cache-gb", "0.1", "--prefix-cache-mb", "16", "--max-body-mb", "1",
                        "--device", "cpu", "--dtype", "float32") as url:
        for name in (TASK, DOOMED):
            r = httpx.post(f"{url}/v1/tasks", json={"name": name, "num_virtual_tokens": 4}, timeout=30)
            assert r.status_code == 201, r.text
        yield url


@pytest.fixture(scope="module")
def api_schema(server, tiny_model_dir):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    # read event streams to their end (the default stops after 20 events and hangs up, leaving the rest
    # of the request to be aborted while the next case already arrives)
    schema.config.max_stream_events = 1_000_000
    schema.config.output.sanitization.update(enabled=False)  # no secrets here; it hides `max_tokens` ("token")
    base_id = Path(tiny_model_dir).resolve().name

    @schema.hook
    def map_case(context, case):  # every phase (coverage, fuzzing)
        return _steer(case, base_id)

    return schema


def _steer(case, base_id: str):
    """Steer two in three valid cases past the cheap refusals (see the module docstring); which ones
    follows from the case's own content, so a case maps the same way every time (Hypothesis replays
    and shrinks it). Multipart bodies are left alone: schemathesis counts any edited body holding
    bytes as invalid."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_negative:
        return case  # an invalid case stays exactly as invalid as generated
    pick = (None, TASK, base_id)[zlib.crc32(repr((case.body, case.path_parameters)).encode()) % 3]
    if pick is None:
        return case
    method, path = case.operation.method.lower(), case.operation.path
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "name": DOOMED if method == "delete" else TASK}
    if case.media_type != "application/json" or not isinstance(case.body, dict):
        return case
    body = case.body = _whole(case.body)  # a copy: generated values may be shared between cases
    if path == "/v1/completions":
        kept = {k: v for k, v in body.items() if k not in NEUTRAL_ONLY}
        case.body = {**kept, "model": pick, "prompt": _nonempty(body.get("prompt"))}
    elif path == "/v1/generate" and isinstance(body.get("requests"), list):
        case.body = {**body, "requests": [{**r, "task": pick, "prompt": _nonempty(r.get("prompt"))}
                                          if isinstance(r, dict) else r for r in body["requests"]]}
    return case


def _nonempty(prompt):
    """Empty prompts ("" and [], schemathesis's first pick for every coverage case) made one token long,
    so the boundary values of the other fields reach the engine instead of the empty-prompt 400."""
    if prompt == "" or prompt == []:
        return "Hi"
    if isinstance(prompt, list):
        return [_nonempty(p) if p == "" or p == [] else p for p in prompt]
    return prompt


def _whole(value):
    """`value` with integral floats as ints (`1.0` -> `1`), copied. JSON Schema counts 1.0 as an integer and
    schemathesis sends it for integer fields, but the server's strict parsing answers 422; steered cases are
    meant to get past validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=CHECKS, timeout=60)
