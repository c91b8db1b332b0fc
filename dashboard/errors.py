"""The dashboard's own errors and the one function mapping every exception to an HTTP response.

    DashboardError                    base of the dashboard's own errors
    ├── BadQuery                      a filter, page token or form field that cannot be used (400)
    └── ArchiveUnavailable            DATABASE_URL unset or PostgreSQL unreachable (503)

kvstate errors map as: OperationNotFound 404, ValidationError 400, ConflictError and
StaleUpdate 409, CorruptValue 409 (status DATA_LOSS in the JSON body: the stored value
cannot be changed until it is repaired or removed), ConnectionLostError 503. Anything
unexpected is logged with its traceback and answered with a generic 500 page: no stack
trace ever reaches the browser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.plugins.htmx import HTMXRequest

from dashboard.templating import Renderer
from kvstate import (
    ClientClosedError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    OperationNotFound,
    StaleUpdate,
    ValidationError,
)

__all__ = [
    "ArchiveUnavailable",
    "BadQuery",
    "DashboardError",
    "HttpError",
    "classify",
    "exception_to_response",
    "is_htmx",
]

log = logging.getLogger("dashboard.errors")


class DashboardError(Exception):
    """Base class of the dashboard's own errors."""


class BadQuery(DashboardError):
    """A filter, page token or form field the dashboard cannot use."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ArchiveUnavailable(DashboardError):
    """The archive cannot be read: DATABASE_URL is unset or PostgreSQL is unreachable."""


@dataclass(frozen=True, slots=True)
class HttpError:
    """What the client is told about an exception."""

    status: int
    title: str
    message: str
    rpc_status: str | None = None  # google.rpc.Code name when the HTTP status alone would mislead


# google.rpc.Code names for the JSON API's error bodies.
_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def classify(exc: Exception) -> HttpError:
    """The status, title and safe message for ``exc`` (pure; the message never holds a traceback)."""
    if isinstance(exc, OperationNotFound):
        return HttpError(404, "Operation not found", str(exc))
    if isinstance(exc, ValidationError | BadQuery):
        return HttpError(400, "Bad request", str(exc))
    if isinstance(exc, ConflictError | StaleUpdate):
        return HttpError(409, "Conflict", str(exc))
    if isinstance(exc, CorruptValue):
        message = f"{exc}; it cannot be changed until the value is repaired or the key removed"
        return HttpError(409, "Corrupt value", message, rpc_status="DATA_LOSS")
    if isinstance(exc, ConnectionLostError | ClientClosedError):
        return HttpError(503, "NATS unreachable", f"The dashboard cannot reach NATS right now ({exc}).")
    if isinstance(exc, ArchiveUnavailable):
        return HttpError(503, "Archive unavailable", str(exc))
    if isinstance(exc, HTTPException):
        status = exc.status_code
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        if status == 413:
            return HttpError(413, title, "The request body is too large.")
        if status >= 500:
            return HttpError(status, title, "The server could not handle this request.")
        return HttpError(status, title, exc.detail or title)
    return HttpError(500, "Internal error", "The dashboard hit an unexpected error; it has been logged.")


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    """True for a request htmx sent (Litestar's htmx plugin makes every request an HTMXRequest)."""
    return isinstance(request, HTMXRequest) and bool(request.htmx)


def exception_to_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The one exception handler: JSON under /api, an htmx fragment for htmx requests, else a page."""
    error = classify(exc)
    if error.status >= 500 and not isinstance(exc, ConnectionLostError | ClientClosedError | ArchiveUnavailable):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    headers: dict[str, str] = {}
    if isinstance(exc, NotAuthorizedException):
        headers["WWW-Authenticate"] = 'Basic realm="kvstate dashboard", charset="UTF-8"'
    if request.url.path.startswith("/api/") or request.url.path in ("/healthz", "/metrics"):
        body = {
            "error": {
                "code": error.status,
                "status": error.rpc_status or _RPC_STATUS.get(error.status, "UNKNOWN"),
                "message": error.message,
            }
        }
        return Response(body, status_code=error.status, media_type=MediaType.JSON, headers=headers)
    template = "partials/error.html" if is_htmx(request) else "error.html"
    renderer: Renderer = request.app.state.renderer
    return renderer.response(request, template, {"error": error}, status_code=error.status, headers=headers)
