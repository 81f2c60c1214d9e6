"""The operator console: one HTML page and the static ES modules and CSS beside it (server/console/,
shipped in the package, no CDN, no build step), and `GET /v1/auth`, which tells the page what the
presented key may do, so admin actions are shown only to admins (the routes still enforce it)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from server.api.deps import User, require_admin
from server.api.responses import USER
from server.errors import APIError

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
STATIC_PREFIX = "/console/static"
# everything from this origin only: the page works offline, and a task name or description shown in
# it can never load or run anything (no inline scripts, no inline style attributes, no frames)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter()


class AuthInfo(BaseModel):
    """The role of the presented key: `admin` may also change tasks; `user` may read and generate."""
    object: Literal["auth"] = "auth"
    role: Literal["admin", "user"] = Field(description="what the presented key (or none, where that is "
                                                       "allowed) may do")


@router.get("/v1/auth", dependencies=[User], responses=USER, response_model=AuthInfo)
async def auth(request: Request) -> AuthInfo:
    """Which role the presented key has: a cheap check (no registry or engine), answered by the same
    functions that guard the routes, so the console and the server can never disagree. 401 where a
    user route would refuse the request."""
    try:
        await require_admin(request)
    except APIError:
        return AuthInfo(role="user")
    return AuthInfo(role="admin")


class _Static(StaticFiles):
    """The console's files, revalidated on every load (ETag → 304): after an upgrade the browser
    never runs a cached old module against a new server."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install(app: FastAPI) -> None:
    """Add `/console` (the page), `/console/static/*` (its files) and `/v1/auth` to `app`.

    The page is filled in per request with the proxy prefix (`root_path`, as /docs does) and with
    whether user routes need a key, so a console without a stored key shows the key form at once
    instead of first provoking a 401."""
    template = (CONSOLE_DIR / "index.html").read_text(encoding="utf-8")
    app.include_router(router)
    app.mount(STATIC_PREFIX, _Static(directory=CONSOLE_DIR), name="console")

    async def page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        settings = request.app.state.settings
        body = (template.replace("__ROOT__", html.escape(root, quote=True))
                .replace("__USER_KEY__", "required" if settings.api_key else "open")
                .replace("__ADMIN_KEY__", "required" if (settings.admin_key or settings.api_key) else "open"))
        return HTMLResponse(body, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    for path in ("/console", "/console/"):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
