"""/health, /metrics, /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from server.api.deps import RuntimeDep, User
from server.api.responses import PLAIN_SYSTEM, SYSTEM, USER

router = APIRouter()
_STARTED = int(time.time())


@router.get("/health", responses=SYSTEM)
def health(rt: RuntimeDep) -> dict:
    return {
        "status": "ok", "model": rt.model_id, "device": str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."), "tasks": len(rt.tasks),
        "running": rt.engine.num_running, "waiting": rt.engine.num_waiting,
        "memory": rt.memory_report(),
    }


@router.get("/metrics", response_class=PlainTextResponse, responses=PLAIN_SYSTEM)
def metrics(rt: RuntimeDep) -> str:
    mem = rt.memory_report()
    pc = mem["prefix_cache"]
    return rt.metrics.render(
        waiting=rt.engine.num_waiting, running=rt.engine.num_running, tasks=len(rt.tasks),
        extra={"prefix_cache_entries": pc["entries"], "prefix_cache_bytes": pc["bytes"],
               "prefix_cache_hits_total": pc["hits"], "prefix_cache_misses_total": pc["misses"],
               "prefix_cache_computed_total": pc["computed"],
               "kv_cache_bytes": mem["kv_cache_bytes"],
               "per_task_prefix_kv_bytes": mem["per_task_prefix_kv_bytes"]},
    )


@router.get("/v1/models", dependencies=[User], responses=USER)
def models(rt: RuntimeDep) -> dict:
    data = [{"id": rt.model_id, "object": "model", "created": _STARTED, "owned_by": "polyprompt",
             "root": rt.model_id, "parent": None}]
    for name in sorted(rt.tasks):
        if rt.tasks[name].sha256 is not None:
            data.append({"id": name, "object": "model", "created": _STARTED, "owned_by": "polyprompt",
                         "root": rt.model_id, "parent": rt.model_id})
    return {"object": "list", "data": data}
