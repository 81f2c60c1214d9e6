"""/health, /metrics, /v1/models, /v1/models/{id}."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from starlette.convertors import PathConvertor, register_url_convertor

from server.api.deps import RuntimeDep, User
from server.api.responses import PLAIN_SYSTEM, SYSTEM, USER, USER_TASK
from server.errors import NotFound
from server.metrics import CONTENT_TYPE

router = APIRouter()


class _ModelId(PathConvertor):
    """A model id: one or more path segments (a hub base model's id holds a slash,
    `openai-community/gpt2`), never empty, so `/v1/models/` stays a plain 404."""
    regex = "[^/].*"


register_url_convertor("model_id", _ModelId())
_STARTED = int(time.time())


@router.get("/health", responses=SYSTEM)
def health(rt: RuntimeDep) -> dict:
    """`utilisation` (the engine's busy share of the last ~10 s) next to `target_utilisation`, so a
    readiness probe or an autoscaler can act before the queue grows; the status stays "ok" (a
    busy replica still serves). With the task registry's database unreachable, `status` is
    "degraded" and `registry` says why and for how long, still with 200: the tasks loaded
    keep serving (admin writes answer 503 `registry_unavailable` meanwhile)."""
    registry = rt.registry_status()
    return {
        "status": "ok" if registry["status"] == "ok" else "degraded", "registry": registry,
        "model": rt.model_id, "device": str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."), "quantize": rt.model.backend.quantize or "none",
        "kv_cache_dtype": "int8" if rt.engine.cache.quantized else "auto", "tasks": len(rt.tasks),
        "running": rt.engine.num_running, "waiting": rt.engine.num_waiting,
        "utilisation": round(rt.engine.meter.utilisation(), 4), "target_utilisation": rt.settings.target_utilisation,
        "memory": rt.memory_report(), "paths": rt.paths,
    }


@router.get("/metrics", response_class=PlainTextResponse, responses=PLAIN_SYSTEM)
def metrics(rt: RuntimeDep) -> PlainTextResponse:
    """Prometheus text exposition of this app's own registry (server/metrics.py)."""
    return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)


def _model(rt, name: str, created: int) -> dict:
    base = name == rt.model_id
    return {"id": name, "object": "model", "created": created, "owned_by": "polyprompt",
            "root": rt.model_id, "parent": None if base else rt.model_id}


# sync routes: FastAPI runs them in its thread pool, so the registry query is off the event loop
@router.get("/v1/models", dependencies=[User], responses=USER)
def models(rt: RuntimeDep) -> dict:
    """The base model, then every task with a soft prompt, `created` = the task's creation time
    (one two-column query over the registry: milliseconds at thousands of tasks)."""
    created = rt.registry.created_times()
    data = [_model(rt, rt.model_id, _STARTED)]
    data += [_model(rt, name, created.get(name, _STARTED)) for name in sorted(rt.tasks)
             if rt.tasks[name].sha256 is not None]
    return {"object": "list", "data": data}


@router.get("/v1/models/{name:model_id}", dependencies=[User], responses=USER_TASK)
def model(name: str, rt: RuntimeDep) -> dict:
    """One model object, as `models.retrieve` reads it: the base model (created = server start),
    or a task with a soft prompt (created = its creation time); 404 `model_not_found` otherwise."""
    if name == rt.model_id:
        return _model(rt, name, _STARTED)
    info = rt.tasks.get(name)
    if info is None or info.sha256 is None:
        why = "has no soft prompt yet" if info is not None else "not found"
        raise NotFound(f"model {name!r} {why}; GET /v1/models lists what is served", code="model_not_found")
    created = rt.registry.created_times(name).get(name, _STARTED)
    return _model(rt, name, created)
