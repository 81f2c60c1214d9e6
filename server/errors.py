"""HTTP errors in OpenAI's JSON shape, and the one table that maps domain errors to them.

Routes raise domain errors (`registry.errors`, `adapters.AdapterError`, the engine's
`QueueFull`) or `APIError`s; `server.app` turns every one into its answer here, so no route
holds a try/except that renames an error.
"""

from __future__ import annotations

import math
from typing import Callable


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)


class NotFound(APIError):
    status, code = 404, "not_found"


class Conflict(APIError):
    status, code = 409, "conflict"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(APIError):
    status, type, code = 403, "permission_error", "admin_key_required"


class Overloaded(APIError):
    status, type, code = 503, "server_error", "overloaded"


class ShuttingDown(APIError):
    """SIGTERM: new requests are refused, and those still running at the drain timeout end."""
    status, type, code = 503, "server_error", "shutting_down"


class EngineFailure(APIError):
    """The engine failed on this request's row (the batch it shared is unaffected)."""
    status, type, code = 500, "server_error", "engine_error"


class RequestTimeout(APIError):
    """The request's own `timeout` passed (queued or running): the client's deadline, not a
    server fault, so a 4xx (408) rather than a 5xx."""
    status, type, code = 408, "invalid_request_error", "timeout"


class RegistryUnavailable(APIError):
    """The task registry's database could not be reached: a write (or a read only it can
    answer) cannot be done now; the tasks already loaded keep serving."""
    status, type, code = 503, "server_error", "registry_unavailable"


def _registry_unavailable(e: Exception) -> APIError:
    first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0][:200]
    return RegistryUnavailable(f"the task registry (database) is unavailable, so this cannot be done now ({first}); "
                               "the tasks already loaded keep serving; retry later", headers={"Retry-After": "2"})


class ClientGone(APIError):
    """The client disconnected; nobody reads the answer (499, as nginx logs it)."""
    status, type, code = 499, "invalid_request_error", "client_closed_request"


def error_body(message: str, type_: str, code: str | None) -> dict:
    # a message quoting client text must still encode as UTF-8 (lone surrogates escaped)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "code": code}}


def _domain_table() -> list[tuple[type[Exception], Callable[[Exception], APIError]]]:
    from sqlalchemy.exc import InterfaceError, OperationalError

    from adapters.peft_format import AdapterError
    from registry.errors import InvalidName, InvalidPrompt, TaskExists, TaskNotFound, VersionNotFound
    from server.engine.request import QueueFull

    return [
        # the database down, restarting or unreachable (connection refused or lost, a timeout)
        (OperationalError, _registry_unavailable),
        (InterfaceError, _registry_unavailable),
        (TaskNotFound, lambda e: NotFound(str(e), code="task_not_found")),
        (VersionNotFound, lambda e: NotFound(str(e), code="version_not_found")),
        (TaskExists, lambda e: Conflict(str(e))),
        (InvalidName, lambda e: APIError(str(e), status=422, code="invalid_name")),
        (AdapterError, lambda e: APIError(str(e), code="invalid_adapter")),
        (InvalidPrompt, lambda e: APIError(str(e), code="invalid_adapter")),
        (QueueFull, lambda e: Overloaded(f"{e}; retry later",
                                         headers={"Retry-After": str(math.ceil(e.retry_after))})),
    ]


DOMAIN_ERRORS = _domain_table()


def to_api_error(e: Exception) -> APIError | None:
    """The HTTP answer of a domain error (the first matching row), None for anything else."""
    if isinstance(e, APIError):
        return e
    for kind, make in DOMAIN_ERRORS:
        if isinstance(e, kind):
            return make(e)
    return None
