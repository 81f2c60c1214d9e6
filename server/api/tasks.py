"""Task administration: create, list, show, change settings, delete, upload a prompt, activate a version."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response

from adapters.init import initial_prompt
from adapters.peft_format import (
    CONFIG_NAME,
    PICKLED_NAME,
    WEIGHTS_NAME,
    parse_adapter_config,
    parse_prompt_safetensors,
    prompt_shape,
)
from registry.store import check_virtual_tokens
from server.api.chat import check_template
from server.api.deps import Admin, RuntimeDep, User
from server.api.responses import ADMIN_ACTIVATE, ADMIN_CREATE, ADMIN_TASK, ADMIN_UPLOAD, UPLOAD_BODY, USER_TASK, errors
from server.api.schemas import TaskActivate, TaskCreate, TaskUpdate
from server.errors import APIError, Conflict

router = APIRouter()


def _public(task: dict) -> dict:
    return {**task, "object": "task"}


def _version(name: str, version: dict) -> dict:
    return {**version, "task": name, "object": "prompt_version"}


@router.post("/v1/tasks", status_code=201, dependencies=[Admin], responses=ADMIN_CREATE)
async def create_task(body: TaskCreate, rt: RuntimeDep) -> dict:
    if body.name == rt.model_id:
        raise Conflict(f"{body.name!r} is the base model's id; pick another task name")
    if body.init == "text" and not body.init_text:
        raise APIError("init 'text' needs init_text", status=422)

    def work() -> dict:
        if body.chat_template is not None:  # 400 before anything is built or stored
            check_template(rt, body.chat_template)
        wte = rt.model.wte.weight.detach().float().cpu()
        prompt = initial_prompt(init=body.init, num_virtual_tokens=body.num_virtual_tokens, wte=wte,
                                tokenizer=rt.tokenizer, init_text=body.init_text, seed=body.seed)
        # one transaction for the task and its version 1: no one ever sees it without a prompt
        return rt.registry.create_task(body.name, description=body.description, base_model=rt.model_id,
                                       embeddings=prompt, source=f"init:{body.init}",
                                       meta={"init": body.init, "init_text": body.init_text},
                                       chat_template=body.chat_template)

    return _public(await _change(rt, work))


MAX_PAGE, DEFAULT_PAGE = 500, 50
_PAGE_DOC = "with any of limit, offset, q: one page, ordered by name, plus total and has_more"


@router.get("/v1/tasks", dependencies=[User], responses=errors(401, 422))
async def list_tasks(
    rt: RuntimeDep,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE, description=f"page size (default {DEFAULT_PAGE}); "
                                       + _PAGE_DOC)] = None,
    offset: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="tasks to skip; " + _PAGE_DOC)] = None,
    q: Annotated[str | None, Query(max_length=200, description="substring of the name or description, any "
                                   "case; " + _PAGE_DOC)] = None,
) -> dict:
    """Without paging parameters: every task, as always (the contract). With any of them: one page
    filtered and cut in SQL, so a console over thousands of tasks reads only what it shows."""
    if limit is None and offset is None and q is None:
        tasks = await anyio.to_thread.run_sync(rt.registry.list_tasks)
        return {"object": "list", "data": [_public(t) for t in tasks]}
    if q is not None and "\x00" in q:  # no stored name or description holds one; PostgreSQL refuses it
        raise APIError("q: must not contain NUL characters", status=422)
    limit, offset = limit or DEFAULT_PAGE, offset or 0
    page, total = await anyio.to_thread.run_sync(
        lambda: rt.registry.list_tasks_page(limit=limit, offset=offset, q=q or None))
    return {"object": "list", "data": [_public(t) for t in page], "total": total, "limit": limit,
            "offset": offset, "has_more": offset + len(page) < total}


@router.get("/v1/tasks/{name}", dependencies=[User], responses=USER_TASK)
async def get_task(name: str, rt: RuntimeDep) -> dict:
    return _public(await anyio.to_thread.run_sync(rt.registry.get_task, name))


async def _change(rt, fn):
    """Run a registry change off the event loop and make it live (`rt.refresh`). Domain
    errors (unknown task, name taken, bad adapter...) answer through `server.errors`' table."""
    def work():
        out = fn()
        rt.refresh()
        return out

    return await anyio.to_thread.run_sync(work)


@router.patch("/v1/tasks/{name}", dependencies=[Admin], responses=errors(400, 401, 403, 404, 413, 422))
async def update_task(name: str, body: TaskUpdate, rt: RuntimeDep) -> dict:
    """Change a task's settings: only the fields sent (`chat_template`; null: the server's
    template again). A template is checked to render a sample conversation first (400, nothing
    stored); the change is live on this server at once, on the others within a registry poll."""
    fields = {k: getattr(body, k) for k in body.model_fields_set}

    def work() -> dict:
        if fields.get("chat_template") is not None:
            rt.registry.get_task(name)  # 404 before the template is tried
            check_template(rt, fields["chat_template"])
        return rt.registry.update_task(name, **fields)

    return _public(await _change(rt, work))


@router.delete("/v1/tasks/{name}", status_code=204, dependencies=[Admin], responses=ADMIN_TASK)
async def delete_task(name: str, rt: RuntimeDep) -> Response:
    await _change(rt, lambda: rt.registry.delete_task(name))
    return Response(status_code=204)


@router.post("/v1/tasks/{name}/prompt", status_code=201, dependencies=[Admin], responses=ADMIN_UPLOAD,
             openapi_extra=UPLOAD_BODY)
async def upload_prompt(name: str, request: Request, rt: RuntimeDep) -> dict:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(f"send a multipart form with a file field named {WEIGHTS_NAME!r}")
    form = await request.form(max_files=4, max_fields=16, max_part_size=rt.settings.max_body_bytes)
    files = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            files[key] = value
            files.setdefault(getattr(value, "filename", None) or key, value)
    if PICKLED_NAME in files or any(k.endswith((".bin", ".pt", ".pth", ".pkl")) for k in files):
        raise APIError(f"pickled files ({PICKLED_NAME}) are refused: upload {WEIGHTS_NAME} instead")
    if WEIGHTS_NAME not in files:
        raise APIError(f"missing file field {WEIGHTS_NAME!r} (got {sorted(files) or 'no files'})")
    weights = await files[WEIGHTS_NAME].read()
    config_bytes = await files[CONFIG_NAME].read() if CONFIG_NAME in files else None

    def add() -> dict:
        rt.registry.get_task(name)  # 404 before parsing
        check_virtual_tokens(prompt_shape(weights)[0])  # the cap tasks are created with, read from the header
        config = parse_adapter_config(config_bytes) if config_bytes is not None else None
        tensor = parse_prompt_safetensors(weights, expected_hidden=rt.model.spec.n_embd, config=config)
        meta = {"peft_config": config} if config else {}
        return _version(name, rt.registry.add_version(name, tensor, source="upload", meta=meta))

    return await _change(rt, add)


@router.post("/v1/tasks/{name}/activate", dependencies=[Admin], responses=ADMIN_ACTIVATE)
async def activate(name: str, body: TaskActivate, rt: RuntimeDep) -> dict:
    return await _change(rt, lambda: _version(name, rt.registry.activate_version(name, body.version)))
