"""FastAPI app factory: no import-time singletons; errors in OpenAI's JSON shape."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api import chat, console, openai, score, system, tasks
from server.errors import DOMAIN_ERRORS, APIError, error_body, to_api_error
from server.lifecycle import DrainGate, Lifecycle
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger("polyprompt.http")
SWAGGER_DIR = Path(__file__).parent / "static" / "swagger"  # swagger-ui-dist 5.35.0 from npm; LICENSE beside it


class BodyTooLarge(APIError):
    """A body read that crossed the limit; `BodyLimit` answers 413 in its place."""
    status, code = 413, "body_too_large"


class BodyLimit:
    """413 for a body over the limit (pure ASGI, before parsing).

    A declared Content-Length over the limit is refused before anything is read. A body
    sent without one (chunked) is counted as it arrives: the read that crosses the limit
    fails, so no route ever holds more than the limit, and whatever the app answers to
    that failure is replaced by the same 413.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refuse(self, size: str) -> JSONResponse:
        return JSONResponse(error_body(f"request body is {size} bytes, over the {self.max_bytes}-byte limit",
                                       "invalid_request_error", "body_too_large"), status_code=413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await self._refuse(str(int(v)))(scope, receive, send)
        seen = 0
        over = False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge(f"request body over the {self.max_bytes}-byte limit")
            return message

        async def guarded(message):
            if not over:
                return await send(message)
            if message["type"] == "http.response.start":  # the app's answer to the failed read
                await self._refuse(f"more than {self.max_bytes}")(scope, receive, send)

        await self.app(scope, counted, guarded)


def _add_docs(app: FastAPI) -> None:
    """/docs from the Swagger UI files shipped in the package, so it works offline (FastAPI's default
    loads them from a CDN); no validator badge, which would send the schema's URL to swagger.io."""
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_DIR), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def _docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
                                   swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/static/swagger/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    # no slash redirects: a 307 built from the Host header, answered before auth, is a plain 404 instead;
    # /docs is served from package files (_add_docs); no /redoc (one offline docs page is enough)
    app = FastAPI(title="polyprompt", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.include_router(system.router)
    app.include_router(openai.router)
    app.include_router(chat.router)
    app.include_router(score.router)
    app.include_router(tasks.router)
    _add_docs(app)
    console.install(app)  # /console: the operator console's page and files; /v1/auth
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.lifecycle = Lifecycle()
    app.add_middleware(DrainGate, lifecycle=app.state.lifecycle)  # outermost: counts every request in flight

    async def _api_error(_: Request, e: Exception):
        err = to_api_error(e)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    for kind in (APIError, *(k for k, _ in DOMAIN_ERRORS)):  # the one table: server/errors.py
        app.add_exception_handler(kind, _api_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(error_body("; ".join(parts) or "invalid request", "invalid_request_error",
                                       "invalid_fields"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error", "internal"),
                            status_code=500)

    return app
