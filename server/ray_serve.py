"""polyprompt as a Ray Serve application: N replicas, one engine each, behind Ray's HTTP proxy.

    serve run server.ray_serve:build_app model=gpt2 db=postgresql://... \
        num_replicas=2

Two deployments:

- `PolypromptReplica` (N replicas): each builds its own app and Runtime from `Settings`
  (`server.app.create_app`, its lifespan run here), so each holds one engine and its own
  prefix-KV cache. It is not an HTTP ingress: `asgi(request)` runs one request through the
  app in process and streams the ASGI messages back. Every replica uses the same registry
  (`db` + `data_dir`); its poll (`reload_interval`) brings a task registered through any
  replica to the others. Each answer carries `x-polyprompt-replica: <replica id>`.
- `PolypromptIngress` (1 replica, the route `/`): reads the body, takes the routing key (the
  JSON body's `model`, or `task`, or the one task of a /v1/generate batch; a client's own
  `serve_multiplexed_model_id` header wins) and forwards through a DeploymentHandle with
  `.options(multiplexed_model_id=key, stream=True)`, so Ray's model multiplexing sends a
  task's requests to the replica that already served it (its soft prompt's prefix KV is
  there), and a new task to the replica holding the fewest. Requests without a key (admin
  routes, /v1/models, /health, a mixed /v1/generate batch) go to any replica. Responses,
  streamed ones included, are passed through as they arrive.

A client spreads one hot task over several replicas by keying it itself, e.g. the header
`serve_multiplexed_model_id: summarize#3`.
"""

# no `from __future__ import annotations`: Serve rebuilds the ingress method's signature and
# FastAPI must see `Request` itself, not a string
import asyncio
import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.app import create_app
from server.errors import error_body
from server.settings import Settings

log = logging.getLogger("polyprompt.ray")

REPLICA_HEADER = "x-polyprompt-replica"
ROUTE_HEADER = "serve_multiplexed_model_id"  # Ray's own header name for the multiplexing key
# the tasks one replica is counted as holding for routing (least recently used forgotten);
# what it really keeps is bounded by its prefix cache (--prefix-cache-mb)
MAX_TASKS_PER_REPLICA = int(os.environ.get("POLYPROMPT_RAY_TASKS_PER_REPLICA", "1024"))
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def routing_key(path: str, headers: dict[str, str], body: bytes) -> str:
    """The multiplexing key of a request: the header if the client set one, else its task
    (the JSON body's `model` or `task`, or the one task of a /v1/generate batch); "" for none."""
    if explicit := headers.get(ROUTE_HEADER, "").strip():
        return explicit
    if not path.startswith("/v1/") or "json" not in headers.get("content-type", "json") or not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""  # the replica answers the error
    if not isinstance(doc, dict):
        return ""
    for field in ("model", "task"):
        if isinstance(doc.get(field), str):
            return doc[field]
    items = doc.get("requests")
    if isinstance(items, list):
        tasks = {i.get("task") for i in items if isinstance(i, dict)}
        if len(tasks) == 1 and isinstance(t := tasks.pop(), str):
            return t
    return ""


def _replica_id() -> str:
    rid = serve.get_replica_context().replica_id
    return getattr(rid, "unique_id", None) or str(rid)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class PolypromptReplica:
    """One polyprompt server (app + Runtime + engine) inside a Serve replica."""

    async def __init__(self, settings: Settings | dict[str, Any], torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        from server.lifecycle import keep_freed_memory

        if heap := keep_freed_memory():  # the replica's process is the server's: as `polyprompt serve` does
            log.info(heap)
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        self.replica_id = _replica_id()
        self.app = create_app(self.settings)
        # the app's lifespan (Runtime built, engine and registry poll started), kept open until __del__
        self._life_in: asyncio.Queue = asyncio.Queue()
        self._life_out: asyncio.Queue = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._life = asyncio.create_task(self.app(scope, self._life_in.get, self._life_out.put))
        await self._life_in.put({"type": "lifespan.startup"})
        msg = await self._life_out.get()
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"polyprompt replica failed to start: {msg.get('message', msg)}")
        log.info("polyprompt replica %s ready", self.replica_id)

    async def __del__(self):
        if getattr(self, "_life", None) is None or self._life.done():
            return
        await self._life_in.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._life_out.get(), timeout=30)
        except asyncio.TimeoutError:
            log.warning("polyprompt replica %s: shutdown timed out", self.replica_id)

    def check_health(self) -> None:
        if self._life.done():
            raise RuntimeError("the app's lifespan ended")

    @serve.multiplexed(max_num_models_per_replica=MAX_TASKS_PER_REPLICA)
    async def _hold(self, task: str) -> str:
        """Loading a "model" is only being counted as holding the task: the prefix KV is computed
        (or found in the prefix cache) by the engine on the request itself."""
        return task

    async def asgi(self, request: dict[str, Any]):
        """Run one HTTP request through the app; yields the `http.response.start` message, then
        the body's chunks (bytes) as the app sends them."""
        if key := serve.get_multiplexed_model_id():
            await self._hold(key)
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request["method"], "scheme": request.get("scheme", "http"), "path": request["path"],
            "raw_path": request["path"].encode(), "query_string": request.get("query_string", b""),
            "root_path": request.get("root_path", ""), "headers": [tuple(h) for h in request["headers"]],
            "client": request.get("client"), "server": request.get("server"), "state": {},
        }
        body: bytes = request.get("body", b"")
        out: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        sent_body = False

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await out.put(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)

        task = asyncio.create_task(run())
        started = False
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    started = True
                    headers = [(bytes(k), bytes(v)) for k, v in msg.get("headers", [])]
                    headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
                    yield {"status": msg["status"], "headers": headers}
                elif msg["type"] == "http.response.body" and msg.get("body"):
                    yield bytes(msg["body"])
            try:
                await task
            except Exception:
                if not started:  # nothing answered: the ingress answers 503
                    raise
                log.exception("the app raised after answering (its 500 was sent)")
        finally:
            disconnected.set()  # the client went away (or the answer is complete)
            if not task.done():
                task.cancel()


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class PolypromptIngress:
    """Every route, forwarded to a replica chosen by the request's task."""

    def __init__(self, replica: DeploymentHandle, max_body_bytes: int):
        self.replica, self.max_body_bytes = replica, max_body_bytes

    def _too_large(self, size: str) -> JSONResponse:
        return JSONResponse(error_body(f"request body is {size} bytes, over the {self.max_body_bytes}-byte limit",
                                       "invalid_request_error", "body_too_large"), status_code=413)

    async def _body(self, request: Request) -> bytes | None:
        """The whole body (the task is in it), or None once it crosses the replicas' limit."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, seen = [], 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @ingress_app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def forward(self, request: Request, path: str):
        body = await self._body(request)
        if body is None:  # what the replica's BodyLimit would answer, without holding it here first
            return self._too_large(request.headers.get("content-length") or f"more than {self.max_body_bytes}")
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = routing_key(request.url.path, headers, body)
        payload = {
            "method": request.method, "scheme": request.url.scheme, "path": request.url.path,
            "query_string": request.url.query.encode(), "root_path": request.scope.get("root_path", ""),
            "headers": list(request.headers.raw), "body": body,
            "client": tuple(request.client) if request.client else None,
            "server": request.scope.get("server"),
        }
        gen = self.replica.options(multiplexed_model_id=key, stream=True).asgi.remote(payload)
        try:
            start = await gen.__anext__()
        except Exception as e:  # no replica could take it, or it died before answering
            log.exception("forward to a polyprompt replica failed")
            return JSONResponse(error_body(f"no replica answered: {type(e).__name__}", "server_error",
                                           "replica_unavailable"), status_code=503)

        async def rest():
            async for chunk in gen:
                yield chunk

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = list(start["headers"])  # as the app sent them (repeats kept)
        return response


def build_app(args: dict[str, Any] | None = None):
    """The application for `serve run server.ray_serve:build_app key=value ...`: `num_replicas`
    (default 2), `replica_cpus` (CPUs reserved per replica, default 1), `replica_gpus` (default 0),
    `torch_threads` (CPU threads per replica, default: torch's), every other key a `Settings`
    field (`model`, `db`, `data_dir`, `device`, `kv_cache_gb`, ...; keys stay environment-only,
    POLYPROMPT_API_KEY / POLYPROMPT_ADMIN_KEY in the replicas' environment)."""
    args = dict(args or {})
    num_replicas = int(args.pop("num_replicas", 2))
    actor = {"num_cpus": float(args.pop("replica_cpus", 1)), "num_gpus": float(args.pop("replica_gpus", 0))}
    threads = args.pop("torch_threads", None)
    settings = Settings(**args)  # validated here, so a bad value fails the deploy at once
    replica = PolypromptReplica.options(num_replicas=num_replicas, ray_actor_options=actor)
    # the given values only: the rest (keys included) each replica reads from its own environment
    return PolypromptIngress.bind(replica.bind(args, threads), settings.max_body_bytes)
