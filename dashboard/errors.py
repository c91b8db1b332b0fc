"""The dashboard's own errors, and the one mapping of every exception to an HTTP answer.

    DashboardError                    base of the dashboard's own errors (500)
    ├── BadQuery                      a filter, page token or form field that cannot be used (400)
    └── ArchiveUnavailable            no archive URL, PostgreSQL unreachable or refusing the role (503)

``ERROR_STATUS`` names the answer to every class of ``kvstate.errors``, ``archiver.errors``
(what ``archiver.read`` raises) and the tree above: 400 for input the caller can fix, 404
for an operation that is not there, 403 when the dashboard's NATS permissions refuse the
change, 409 for a conflict, a forbidden transition, an id
that exists or a stale event, 412 for a conditional update that found another
revision, 413 for a value too large, 503 with Retry-After while NATS,
the bucket or the archive cannot be used, 504 for a wait that timed out, and 500 for
what is internal (a bare base class, bad settings, a server too old). A corrupt value
is 409 with status DATA_LOSS in the JSON body: it cannot be changed until it is
repaired or removed. docs/dashboard.md#errors lists the table, and
tests/dashboard/test_dashboard_errors.py checks every class against it through the app.
A class not in the table answers as its nearest mapped base; anything else is logged
with its traceback and answered with a generic 500: no stack trace reaches the browser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.plugins.htmx import HTMXRequest

from archiver import errors as archiver_errors
from dashboard.templating import Renderer
from kvstate import errors as kvstate_errors

__all__ = [
    "ARCHIVE_RETRY_AFTER",
    "ERROR_STATUS",
    "NATS_RETRY_AFTER",
    "ArchiveUnavailable",
    "BadQuery",
    "DashboardError",
    "ErrorStatus",
    "HttpError",
    "classify",
    "exception_to_response",
    "is_htmx",
    "rpc_status",
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
    """The archive cannot be read: no archive URL is set, PostgreSQL is unreachable or refuses the role."""


NATS_RETRY_AFTER = 5
"""Seconds a client is told to wait (Retry-After) while NATS or the bucket cannot be used."""
ARCHIVE_RETRY_AFTER = 15
"""Seconds a client is told to wait while the archive cannot be read (ArchiveAccess retries as often)."""

_INTERNAL_MESSAGE = "The dashboard hit an unexpected error; it has been logged."


@dataclass(frozen=True, slots=True)
class HttpError:
    """What the client is told about an exception."""

    status: int
    title: str
    message: str
    rpc_status: str | None = None  # google.rpc.Code name when the HTTP status alone would mislead
    retry_after: int | None = None  # seconds, sent as Retry-After


@dataclass(frozen=True, slots=True)
class ErrorStatus:
    """How the dashboard answers one class of exception.

    ``message`` is a template over the exception (``{exc}``: its text); a 500 has a
    fixed one, so nothing internal is shown.
    """

    status: int
    title: str
    message: str = "{exc}"
    rpc_status: str | None = None
    retry_after: int | None = None

    def answer(self, exc: Exception) -> HttpError:
        """The answer to ``exc``."""
        return HttpError(self.status, self.title, self.message.format(exc=exc), self.rpc_status, self.retry_after)


_INTERNAL = ErrorStatus(500, "Internal error", _INTERNAL_MESSAGE)
_BAD_REQUEST = ErrorStatus(400, "Bad request")
_TOO_LARGE = ErrorStatus(413, "Value too large")
_CONFLICT = ErrorStatus(409, "Conflict")
_NATS = ErrorStatus(
    503, "NATS unreachable", "The dashboard cannot reach NATS right now ({exc}).", retry_after=NATS_RETRY_AFTER
)
_BUCKET = ErrorStatus(503, "Bucket unavailable", retry_after=NATS_RETRY_AFTER)
_ARCHIVE = ErrorStatus(503, "Archive unavailable", retry_after=ARCHIVE_RETRY_AFTER)

ERROR_STATUS: dict[type[Exception], ErrorStatus] = {
    # kvstate.errors, in the order of its tree
    kvstate_errors.KvstateError: _INTERNAL,
    kvstate_errors.ConfigurationError: _INTERNAL,
    kvstate_errors.ServerVersionError: _INTERNAL,
    kvstate_errors.ClientClosedError: _NATS,  # the client closes at shutdown, under requests still running
    kvstate_errors.BucketError: _BUCKET,
    kvstate_errors.BucketNotFound: _BUCKET,
    kvstate_errors.ConnectionLostError: _NATS,
    # the dashboard's NATS user may not do this (docs/security.md): no retry helps
    kvstate_errors.PermissionDenied: ErrorStatus(
        403, "Permission denied", "The dashboard's NATS user is not allowed to do this ({exc})."
    ),
    kvstate_errors.AuthenticationFailed: _NATS,  # NATS refused the dashboard's own credentials
    kvstate_errors.ValidationError: _BAD_REQUEST,
    kvstate_errors.InvalidKey: _BAD_REQUEST,
    kvstate_errors.UnknownStage: _BAD_REQUEST,
    kvstate_errors.UnknownPipeline: _BAD_REQUEST,
    kvstate_errors.InvalidPipeline: _BAD_REQUEST,
    kvstate_errors.InvalidMetadata: _BAD_REQUEST,
    kvstate_errors.ValueTooLarge: _TOO_LARGE,
    kvstate_errors.InvalidJob: _BAD_REQUEST,
    kvstate_errors.InvalidTransition: ErrorStatus(409, "Invalid transition", rpc_status="FAILED_PRECONDITION"),
    kvstate_errors.NotRetryable: ErrorStatus(409, "Not retryable", rpc_status="FAILED_PRECONDITION"),
    kvstate_errors.OperationNotFound: ErrorStatus(404, "Operation not found"),
    kvstate_errors.OperationExists: ErrorStatus(409, "Operation exists", rpc_status="ALREADY_EXISTS"),
    kvstate_errors.ConflictError: _CONFLICT,
    # the conditional write of HTTP If-Match: RFC 9110 says 412
    kvstate_errors.RevisionMismatch: ErrorStatus(412, "Revision mismatch", rpc_status="FAILED_PRECONDITION"),
    kvstate_errors.StaleUpdate: _CONFLICT,
    kvstate_errors.CorruptValue: ErrorStatus(
        409,
        "Corrupt value",
        "{exc}; it cannot be changed until the value is repaired or the key removed",
        rpc_status="DATA_LOSS",
    ),
    kvstate_errors.WaitTimeout: ErrorStatus(504, "Timed out", rpc_status="DEADLINE_EXCEEDED"),
    kvstate_errors.JobError: _INTERNAL,
    kvstate_errors.JobNotFound: ErrorStatus(404, "Job not found"),
    kvstate_errors.JobFinished: ErrorStatus(409, "Job finished", rpc_status="FAILED_PRECONDITION"),
    kvstate_errors.JobBusy: _CONFLICT,
    # archiver.errors: what archiver.read raises, and the rest of the archiver's tree
    archiver_errors.ArchiverError: _INTERNAL,
    archiver_errors.ArchiveUnavailable: _ARCHIVE,
    archiver_errors.ArchiveAccessDenied: _ARCHIVE,  # a deployment to fix (grant, password): retried like the rest
    archiver_errors.MigrationError: _ARCHIVE,  # the archive's schema is not one this reader knows
    archiver_errors.InvalidPageToken: _BAD_REQUEST,
    archiver_errors.InvalidQuery: _BAD_REQUEST,
    # the dashboard's own
    DashboardError: _INTERNAL,
    BadQuery: _BAD_REQUEST,
    ArchiveUnavailable: _ARCHIVE,
}
"""The answer to each error class; a subclass not listed answers as its nearest listed base."""

# google.rpc.Code names for the JSON API's error bodies.
_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def rpc_status(error: HttpError) -> str:
    """The google.rpc.Code name the JSON body gives for ``error``."""
    return error.rpc_status or _RPC_STATUS.get(error.status, "UNKNOWN")


def classify(exc: Exception) -> HttpError:
    """The status, title and safe message for ``exc`` (pure; the message never holds a traceback)."""
    for cls in type(exc).__mro__:
        mapped = ERROR_STATUS.get(cls)
        if mapped is not None:
            return mapped.answer(exc)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        if status == 413:
            return HttpError(413, title, "The request body is too large.")
        if status >= 500:
            return HttpError(status, title, "The server could not handle this request.")
        return HttpError(status, title, exc.detail or title)
    return _INTERNAL.answer(exc)


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    """True for a request htmx sent (Litestar's htmx plugin makes every request an HTMXRequest)."""
    return isinstance(request, HTMXRequest) and bool(request.htmx)


def exception_to_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The one exception handler: JSON under /api, an htmx fragment for htmx requests, else a page."""
    error = classify(exc)
    if error.status >= 500 and error.retry_after is None:  # not a dependency that is away for a while
        log.error("unhandled error on %s %s", request.method, request.scope["path"], exc_info=exc)
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPException) and exc.headers:  # Retry-After of a 429, Allow of a 405
        headers.update(exc.headers)
    if isinstance(exc, NotAuthorizedException):
        headers["WWW-Authenticate"] = 'Basic realm="kvstate dashboard", charset="UTF-8"'
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    path = request.scope["path"]  # not request.url: it raises on a malformed Host header (a port "80x")
    if path.startswith("/api/") or path in ("/healthz", "/metrics"):
        body = {"error": {"code": error.status, "status": rpc_status(error), "message": error.message}}
        return Response(body, status_code=error.status, media_type=MediaType.JSON, headers=headers)
    template = "partials/error.html" if is_htmx(request) else "error.html"
    renderer: Renderer = request.app.state.renderer
    return renderer.response(request, template, {"error": error}, status_code=error.status, headers=headers)
