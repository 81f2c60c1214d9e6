"""Schemathesis fuzzes every operation in /openapi.json against a real `polyprompt serve`.

Checks: no 5xx ever; every status, media type, header and body the server answers is the one
documented for that operation; a request that breaks the schema is refused. A real HTTP server
(not ASGI in-process) so the answers are what clients get: uvicorn's framing, the engine on its
own thread, the body-size middleware.

Two in three valid cases are steered (`_steer`) to names that exist — a task with a soft prompt,
the base model, a task kept for deletion — so the fuzzer reaches the engine and the registry,
not only the 404s that random names give. Every other value is the fuzzer's (steered completions
leave out the fields accepted only at their neutral values).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, negative_data_rejection, not_a_server_error, \
    response_headers_conformance, response_schema_conformance, status_code_conformance

from tests.serverutil import running_server

TASK, DOOMED = "fuzz", "doomed"
# OpenAI fields /v1/completions takes only at their neutral values: any other value is a 400, and a
# random body nearly always has one, so steered cases leave them out to reach the engine
NEUTRAL_ONLY = {"echo", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix"}
MAX_EXAMPLES = 40  # per operation, besides schemathesis's coverage cases
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Small limits keep the fuzzer's biggest valid requests cheap: 8 running rows, a small KV cache."""
    data = tmp_path_factory.mktemp("data-fuzz")
    with running_server(tiny_model_dir, data, "--max-batch-size", "8", "--max-queue", "256",
                        "--kv-cache-gb", "0.1", "--prefix-cache-mb", "16", "--max-body-mb", "1",
                        "--device", "cpu", "--dtype", "float32") as url:
        for name in (TASK, DOOMED):
            r = httpx.post(f"{url}/v1/tasks", json={"name": name, "num_virtual_tokens": 4}, timeout=30)
            assert r.status_code == 201, r.text
        yield url


@pytest.fixture(scope="module")
def api_schema(server, tiny_model_dir):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    base_id = Path(tiny_model_dir).resolve().name

    @schema.hook
    def map_case(context, case):  # every phase (coverage, fuzzing)
        return _steer(case, base_id)

    import collections, atexit, json
    stats = collections.Counter()

    @schema.hook
    def after_call(context, case, response):
        meta = case.meta
        key = f"{case.operation.method.upper()} {case.operation.path} {response.status_code} {meta.phase.name} {meta.generation.mode.value}"
        stats[key] += 1
        if case.operation.path in ("/v1/completions", "/v1/generate"):
            with open("/tmp/stdbg/samples.txt", "a") as f:
                f.write(f"{key} {getattr(response, 'elapsed', '')} {case.body!r:.300} -> {response.text[:150]!r}\n")

    atexit.register(lambda: open("/tmp/stdbg/stats.json", "w").write(json.dumps(sorted(stats.items()), indent=0)))
    return schema


def _steer(case, base_id: str):
    """Point two in three valid cases at names that exist; which ones follows from the case's own
    content, so a case maps the same way every time (Hypothesis replays and shrinks it).

    Bodies with files are left alone: schemathesis counts any edited body holding bytes as invalid.
    """
    meta = case.meta
    if meta is not None and meta.generation.mode.is_negative:
        return case  # an invalid case stays exactly as invalid as generated
    pick = (None, TASK, base_id)[zlib.crc32(repr((case.body, case.path_parameters)).encode()) % 3]
    if pick is None:
        return case
    method, path = case.operation.method.lower(), case.operation.path
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "name": DOOMED if method == "delete" else TASK}
    body = case.body  # replaced, not changed in place: generated values may be shared between cases
    if path == "/v1/completions" and isinstance(body, dict):
        case.body = {**{k: v for k, v in body.items() if k not in NEUTRAL_ONLY}, "model": pick}
    elif path == "/v1/generate" and isinstance(body, dict) and isinstance(body.get("requests"), list):
        case.body = {**body, "requests": [{**r, "task": pick} if isinstance(r, dict) else r for r in body["requests"]]}
    return case


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=CHECKS, timeout=60)
