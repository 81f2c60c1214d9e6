"""Dependencies: the runtime, and bearer-key checks (constant-time).

All `async def`: none of them blocks, and FastAPI runs a plain `def` dependency on a
worker thread, two thread hops per request that cost more than the checks themselves."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized
from server.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _eq(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


async def require_user(request: Request) -> None:
    s = request.app.state.settings
    if not s.api_key:  # no user key: user endpoints are open
        return
    token = _bearer(request)
    if not (_eq(token, s.api_key) or _eq(token, s.admin_key)):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")


async def require_admin(request: Request) -> None:
    s = request.app.state.settings
    admin = s.admin_key or s.api_key  # with only the API key set, it is also the admin key
    if not admin:
        return
    token = _bearer(request)
    if _eq(token, admin):
        return
    if s.admin_key and _eq(token, s.api_key):
        raise Forbidden("this endpoint needs the admin key")
    raise Unauthorized("a valid admin key is required: send 'Authorization: Bearer <key>'")


User = Depends(require_user)
Admin = Depends(require_admin)
