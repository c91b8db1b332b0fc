"""The JSON API, shaped like Google's long-running operations (AIP-151; resources in dashboard.resources).

    GET  /api/operations/{id}          one operation: name, done, metadata, error | response; ETag = revision
                                       (a corrupt stored value: error code 15 DATA_LOSS, as in the list)
    GET  /api/operations/{id}:wait     long poll (?timeout=30s, at most 60 s): the operation once done, or as
                                       it is at the timeout with done false (not an error)
    POST /api/operations/{id}:apply    one event (the tagged JSON of kvstate.events, at most 64 KiB) through
                                       the state machine; Idempotency-Key = event id, If-Match = revision
    POST /api/operations/{id}:cancel   cancel, If-Match honoured
    POST /api/operations/{id}:retry    run a finished operation again from stages (body: reason, stages), If-Match
    GET  /api/operations               filter (``status=running AND stage=geo``), page_size, page_token
    GET  /api/csrf                     a CSRF token for API writes (send it back as X-CSRFToken)
    GET  /api/overview                 the overview's figures (``pipeline``), from the page's context builder
    GET  /api/archive/operations       the /archive search: its filters, page_size, page_token; 503 without
                                       an archive

Every operation answer carries ``ETag: "<revision>"``. Writes need the write token when one is
configured, and the CSRF token unless sent as ``Authorization: Bearer`` (dashboard.security).
Litestar routes whole path segments, so ``{id}:method`` is one route per HTTP method that
dispatches on the method (dashboard.methods); the OpenAPI document shows each method at its
real path through routes on the literal paths ``/api/operations/{name}:apply`` etc., which
only answer 400 (``{name}`` is not an operation id), as any invalid id would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader
from litestar.enums import ParamType
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Link, OpenAPIType, Schema
from litestar.openapi.spec import Operation as OpenAPIOperation
from litestar.openapi.spec import Parameter as OpenAPIParameter
from litestar.params import FromPath, HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.utils.scope.state import ScopeState

from dashboard.contexts import archive_search, banner_context, overview_context
from dashboard.errors import BadQuery
from dashboard.guard import HOLDS_CONNECTION
from dashboard.methods import (
    APPLY_MAX_BODY,
    MAX_WAIT,
    cancel_reason,
    decode_event,
    idempotency_key,
    if_match,
    operation_method,
    retry_request,
    wait_timeout,
)
from dashboard.pages import (
    LONG_QUERY_VALUES,
    MAX_QUERY_VALUE,
    MAX_QUERY_VALUES,
    Dashboard,
    pipeline_param,
    query_params,
)
from dashboard.query import (
    ARCHIVE_FILTERS,
    FILTER_KEYS,
    archive_query,
    decode_page_token,
    encode_page_token,
    parse_filter,
    parse_filter_expression,
)
from dashboard.resources import (
    CsrfToken,
    ErrorBody,
    OperationList,
    OperationResource,
    Overview,
    corrupt_resource,
    operation_resource,
    overview_resource,
    summary_resource,
)
from dashboard.security import check_write_access
from kvstate import Cancel, CorruptValue, Event, Operation, OperationNotFound, WaitTimeout

__all__ = ["OperationsApi", "overview_resource"]

MAX_PAGE_SIZE = 500
OUTCOME_HEADER = "Kvstate-Outcome"
"""``applied``, ``duplicate`` (this event id was applied before: a retry) or ``stale`` (too late, nothing written)."""


def _etag(revision: int) -> str:
    return f'"{revision}"'


def _page_size(values: Sequence[str], default: int) -> int:
    try:
        size = int(values[0]) if values else default
    except ValueError:
        raise BadQuery("page_size", "not a number") from None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise BadQuery("page_size", f"between 1 and {MAX_PAGE_SIZE}")
    return size


@dataclass(frozen=True, slots=True)
class _Found:
    resource: OperationResource
    revision: int
    waitable: bool  # a valid operation in the bucket that is not done yet


def _resource(dashboard: Dashboard, op: Operation, *, archived: bool = False) -> OperationResource:
    return operation_resource(op, archived=archived, trace_url=dashboard.settings.trace_url)


async def _read(dashboard: Dashboard, op_id: str) -> _Found:
    """The operation from the bucket, else from the archive; a corrupt value as a DATA_LOSS resource."""
    try:
        op = await dashboard.client.get(op_id)
        return _Found(_resource(dashboard, op), op.revision, waitable=not op.done)
    except CorruptValue as exc:  # a resource like the list's, not an error: the key exists
        return _Found(corrupt_resource(op_id, exc), exc.revision, waitable=False)
    except OperationNotFound:
        found = await dashboard.archive.get(op_id) if dashboard.archive.enabled else None
        if found is None:
            raise
        return _Found(_resource(dashboard, found.operation, archived=True), found.operation.revision, waitable=False)


async def _wait(dashboard: Dashboard, op_id: str, timeout: float) -> _Found:
    """The operation once it is done, or as it is after ``timeout`` seconds (AIP-151 WaitOperation)."""
    found = await _read(dashboard, op_id)
    if not found.waitable or timeout <= 0:
        return found
    try:
        op = await dashboard.client.wait(op_id, timeout)
    except WaitTimeout:  # not an error for a long poll: the current state, done false
        return await _read(dashboard, op_id)
    except OperationNotFound:  # removed while waiting (archived once finished): the archive has it, or 404
        return await _read(dashboard, op_id)
    return _Found(_resource(dashboard, op), op.revision, waitable=False)


def _answer(found: _Found, headers: dict[str, str] | None = None) -> Response[OperationResource]:
    return Response(
        found.resource, headers={"ETag": _etag(found.revision), "Cache-Control": "no-cache", **(headers or {})}
    )


async def _get(request: Request[Any, Any, Any], dashboard: Dashboard, name: str) -> Response[OperationResource]:
    op_id, method = operation_method(name, "GET")
    if method == "wait":
        return _answer(await _wait(dashboard, op_id, wait_timeout(query_params(request).get("timeout", []))))
    found = await _read(dashboard, op_id)
    etag = _etag(found.revision)
    if request.headers.get("if-none-match") == etag:
        return Response(content=None, status_code=304, headers={"ETag": etag})  # type: ignore[arg-type]
    return _answer(found)


async def _post(request: Request[Any, Any, Any], dashboard: Dashboard, name: str) -> Response[OperationResource]:
    op_id, method = operation_method(name, "POST")
    check_write_access(request, dashboard.settings.auth_token)
    expected, key = if_match(request.headers), idempotency_key(request.headers)
    body = await request.body()  # at most APPLY_MAX_BODY (the route's limit), else 413
    if method == "retry":
        return await _retry(dashboard, op_id, body, expected, key)
    event: Event
    if method == "apply":
        event = decode_event(body, key)
    else:  # cancel: a small body, held to DASHBOARD_MAX_BODY like every other request
        if len(body) > dashboard.settings.max_body:
            raise HTTPException(status_code=413, detail="Request Entity Too Large")
        reason = cancel_reason(body, request.headers.get("content-type", ""), "cancelled through the API")
        event = (
            Cancel(reason=reason, worker="api") if key is None else Cancel(reason=reason, worker="api", event_id=key)
        )
    # A retry of a conditional write that landed comes back a duplicate (the client decides the event id
    # before the revision); a real mismatch raises RevisionMismatch, which the error table makes a 412.
    result = await dashboard.client.apply(op_id, event, expected_revision=expected)
    if method == "cancel":
        result.raise_for_stale()  # a cancel of a finished operation is a 409, not a silent no-op
    found = _Found(_resource(dashboard, result.operation), result.revision, waitable=False)
    return _answer(found, {OUTCOME_HEADER: result.outcome.value})


async def _retry(
    dashboard: Dashboard, op_id: str, body: bytes, expected: int | None, key: str | None
) -> Response[OperationResource]:
    """``:retry``: the operation run again from the stages named (default: its failed stage), revision-checked."""
    if len(body) > dashboard.settings.max_body:
        raise HTTPException(status_code=413, detail="Request Entity Too Large")
    asked = retry_request(body)
    result = await dashboard.client.retry(
        op_id, asked.stages or None, reason=asked.reason, by=asked.by or "api", event_id=key, expected_revision=expected
    )
    found = _Found(_resource(dashboard, result.operation), result.revision, waitable=False)
    return _answer(found, {OUTCOME_HEADER: result.outcome.value})


ID_PATTERN = "^[A-Za-z0-9_-]{1,128}$"
"""An operation id (kvstate.keys.validate_id), as the OpenAPI document states it; anything else is 400."""
_REVISION_PATTERN = r'^(\*|[0-9]{1,19}|"[0-9]{1,19}")$'
_KEY_PATTERN = r'^("[!-~]{1,128}"|[!-~]{1,128})$'


@dataclass
class _MethodOperation(OpenAPIOperation):
    """The OpenAPI operation of a literal ``{name}:method`` route: ``name`` declared as the path parameter
    it is on the real route (Litestar sees no parameter in a literal segment)."""

    def __post_init__(self) -> None:
        name = OpenAPIParameter(
            name="name",
            param_in=ParamType.PATH,
            required=True,
            schema=Schema(type=OpenAPIType.STRING, pattern=ID_PATTERN),
            description="the operation id",
        )
        self.parameters = [name, *(self.parameters or [])]


def _query(name: str, description: str, *, repeated: bool = False) -> OpenAPIParameter:
    text = Schema(type=OpenAPIType.STRING, max_length=LONG_QUERY_VALUES.get(name, MAX_QUERY_VALUE))
    return OpenAPIParameter(
        name=name,
        param_in=ParamType.QUERY,
        required=False,
        schema=Schema(type=OpenAPIType.ARRAY, items=text, max_items=MAX_QUERY_VALUES) if repeated else text,
        description=description,
        explode=True if repeated else None,
    )


_PAGING = [
    _query("page_size", "rows per page, 1-500 (default DASHBOARD_PAGE_SIZE)"),
    _query("page_token", "the next_page_token of the previous page"),
]


@dataclass
class _QueryOperation(OpenAPIOperation):
    """An OpenAPI operation whose query parameters the handler reads itself (``query_params``): declared here
    for the document only, so Litestar neither parses nor checks them (the handler's BadQuery does)."""

    query: tuple[OpenAPIParameter, ...] = ()

    def __post_init__(self) -> None:
        self.parameters = [*(self.parameters or []), *self.query]


@dataclass
class _ListOperation(_QueryOperation):
    """The list's OpenAPI operation, with its filters, and links from its answer to the operations each listed
    id can take (what a client, or schemathesis's stateful phase, does next)."""

    query: tuple[OpenAPIParameter, ...] = (
        _query("filter", "an expression of the filters: status=running AND stage=geo AND meta.customer=42"),
        *(
            _query(key, f"the {key} filter (as in /operations)", repeated=key in ("status", "meta"))
            for key in FILTER_KEYS
        ),
        *_PAGING,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        answer = (self.responses or {}).get("200")
        if answer is None or not hasattr(answer, "links"):
            return
        listed = {"name": "$response.body#/operations/0/metadata/id"}
        answer.links = {
            target: Link(operation_id=target, parameters=listed, description=f"{target} of the first listed id")
            for target in ("GetOperation", "WaitOperation", "ApplyOperationEvent", "CancelOperation")
        }


@dataclass
class _ArchiveOperation(_QueryOperation):
    query: tuple[OpenAPIParameter, ...] = (
        *(
            _query(key, f"the {key} filter (as in /archive)", repeated=key in ("status", "meta"))
            for key in ARCHIVE_FILTERS
        ),
        *_PAGING,
    )


@dataclass
class _OverviewOperation(_QueryOperation):
    query: tuple[OpenAPIParameter, ...] = (_query("pipeline", "the pipeline (default: the one with most operations)"),)


_ETAG = [
    ResponseHeader(name="ETag", description='the revision, "N": send it back as If-Match', documentation_only=True)
]
_WRITE_HEADERS = [
    *_ETAG,
    ResponseHeader(name=OUTCOME_HEADER, description="applied, duplicate or stale", documentation_only=True),
]


_ACCESS_ERRORS = (
    (400, "INVALID_ARGUMENT: an unusable parameter, or a Host this dashboard does not answer to"),
    (401, "UNAUTHENTICATED: the token is configured (for reads: DASHBOARD_AUTH_READS) and missing or wrong"),
    (429, "RESOURCE_EXHAUSTED: the rate limit, the stream cap or too many wrong tokens (Retry-After)"),
)


def _errors(*statuses: tuple[int, str]) -> dict[int, ResponseSpec]:
    """The error answers of an API operation: ``statuses`` and those of the guard, which every route has."""
    described = dict(_ACCESS_ERRORS) | dict(statuses)
    return {
        status: ResponseSpec(ErrorBody, description=text, generate_examples=False)
        for status, text in sorted(described.items())
    }


_WRITE_SECURITY: list[dict[str, list[str]]] = [{"token": []}, {"basic": []}, {}]
"""Writes take the token when DASHBOARD_AUTH_TOKEN is set (``{}``: none when it is not)."""

_WRITE_ERRORS = _errors(
    (400, "INVALID_ARGUMENT: malformed JSON, an unknown event type or stage, a bad If-Match or Idempotency-Key"),
    (401, "UNAUTHENTICATED: the token is configured and missing or wrong"),
    (403, "PERMISSION_DENIED: no CSRF token (send Authorization: Bearer, or X-CSRFToken), or a cross-site request"),
    (404, "NOT_FOUND: no such operation"),
    (409, "FAILED_PRECONDITION: a transition the state machine forbids; ABORTED: too late (cancel); DATA_LOSS"),
    (412, "FAILED_PRECONDITION: If-Match names another revision; nothing written"),
    (413, "the body is over the limit"),
    (503, "UNAVAILABLE: NATS cannot be reached (Retry-After)"),
)


class OperationsApi(Controller):
    """JSON API under /api."""

    path = "/api"
    tags = ["operations"]

    @get(
        "/operations/{name:str}",
        summary="Get one operation (ETag = KV revision); ID:wait long-polls",
        description=(
            "The operation as a google.longrunning.Operation: `response` once succeeded, `error` once failed or "
            "cancelled. `If-None-Match` with the ETag answers 304. `ID:wait` is documented at its own path."
        ),
        operation_id="GetOperation",
        response_headers=_ETAG,
        responses=_errors(
            (400, "INVALID_ARGUMENT: not an operation id"), (404, "NOT_FOUND: not in the bucket, nor in the archive")
        ),
        opt={HOLDS_CONNECTION: ":wait"},  # an ID:wait long poll holds its connection, as an event stream does
    )
    async def get_operation(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        # the pattern is for the document only: the route also takes ID:wait (documented at its own path)
        name: Annotated[str, PathParameter(description="the operation id", schema_extra={"pattern": ID_PATTERN})],
    ) -> Response[OperationResource]:
        return await _get(request, dashboard, name)

    @post("/operations/{name:str}", status_code=200, include_in_schema=False, request_max_body_size=APPLY_MAX_BODY)
    async def operation_method(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> Response[OperationResource]:
        return await _post(request, dashboard, name)

    # The methods at their real paths, for the OpenAPI document only (see the module docstring).

    @get(
        "/operations/{name}:wait",
        operation_class=_MethodOperation,
        operation_id="WaitOperation",
        summary="Wait until the operation is done (long poll)",
        description=(
            f"Answers as soon as the operation is done, or after `timeout` (a duration: `30s`, `1.5s`, `500ms`; "
            f"default 30 s, at most {MAX_WAIT:.0f} s) with the operation as it is then and `done: false`: a "
            "timeout is not an error. An operation archived and removed meanwhile is answered from the archive."
        ),
        response_headers=_ETAG,
        responses=_errors((400, "INVALID_ARGUMENT: an unusable timeout"), (404, "NOT_FOUND: no such operation")),
    )
    async def wait_documented(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        timeout: Annotated[
            str | None,
            QueryParameter(
                description="how long to wait: 30s (default), at most 60s",
                schema_extra={"pattern": r"^[0-9]{1,9}(\.[0-9]{1,9})?(ms|s)?$"},
            ),
        ] = None,
    ) -> Response[OperationResource]:
        return await _get(request, dashboard, "{name}:wait")  # only the literal path: InvalidKey (400)

    @post(
        "/operations/{name}:apply",
        operation_class=_MethodOperation,
        operation_id="ApplyOperationEvent",
        summary="Apply one event to the operation (the write service over HTTP)",
        description=(
            "The body is one event, the tagged JSON of kvstate.events (`start`, `heartbeat`, `succeed`, `fail`, "
            "`skip`, `merge`, `cancel`, `reopen`), at most 64 KiB. `Idempotency-Key` is the event id (the body's "
            "`event_id` must be absent or equal): a retry with the same key is a `duplicate`, not a second "
            'event. `If-Match: "N"` applies it only at revision N (412 otherwise). The answer is the operation '
            f"after it, with `ETag` and `{OUTCOME_HEADER}`: `applied`, `duplicate`, or `stale` (the state machine "
            "found it too late; nothing written, not an error, as in the write service). Bad input changes nothing."
        ),
        status_code=200,
        response_headers=_WRITE_HEADERS,
        responses=_WRITE_ERRORS,
        security=_WRITE_SECURITY,
        request_max_body_size=APPLY_MAX_BODY,
    )
    async def apply_documented(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        data: JSONBody[Event],
        if_match: Annotated[
            str | None,
            HeaderParameter(
                name="If-Match",
                description='"N": apply only at revision N',
                schema_extra={"pattern": _REVISION_PATTERN},
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description="the event id", schema_extra={"pattern": _KEY_PATTERN}),
        ] = None,
    ) -> Response[OperationResource]:
        return await _post(request, dashboard, "{name}:apply")  # only the literal path: InvalidKey (400)

    @post(
        "/operations/{name}:cancel",
        operation_class=_MethodOperation,
        operation_id="CancelOperation",
        summary="Cancel the operation",
        description=(
            'Body optional: `{"reason": "..."}`. `If-Match: "N"` cancels only at revision N (412 otherwise); '
            "`Idempotency-Key` makes a retried cancel a duplicate (200) instead of a 409. A cancel of a finished "
            "operation is 409."
        ),
        status_code=200,
        response_headers=_WRITE_HEADERS,
        responses=_WRITE_ERRORS,
        security=_WRITE_SECURITY,
    )
    async def cancel_documented(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        if_match: Annotated[
            str | None,
            HeaderParameter(
                name="If-Match",
                description='"N": cancel only at revision N',
                schema_extra={"pattern": _REVISION_PATTERN},
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description="the event id", schema_extra={"pattern": _KEY_PATTERN}),
        ] = None,
    ) -> Response[OperationResource]:
        return await _post(request, dashboard, "{name}:cancel")  # only the literal path: InvalidKey (400)

    @post(
        "/operations/{name}:retry",
        operation_class=_MethodOperation,
        operation_id="RetryOperation",
        summary="Run a finished operation again from a stage",
        description=(
            'Body: `{"reason": "why", "stages": ["geo"], "by": "who"}`; `reason` required, `stages` optional (default: '
            "the failed stage; a cancelled operation resumes where it stopped), each run again with every stage "
            'after it. Who and why are recorded in the operation\'s `actions`. `If-Match: "N"` retries only at '
            "revision N (412 otherwise); `Idempotency-Key` makes a repeated retry a `duplicate` (200). A pending or "
            "running operation is 409 FAILED_PRECONDITION, an unknown stage 400; nothing is written then."
        ),
        status_code=200,
        response_headers=_WRITE_HEADERS,
        responses=_WRITE_ERRORS,
        security=_WRITE_SECURITY,
    )
    async def retry_documented(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        if_match: Annotated[
            str | None,
            HeaderParameter(
                name="If-Match",
                description='"N": retry only at revision N',
                schema_extra={"pattern": _REVISION_PATTERN},
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description="the event id", schema_extra={"pattern": _KEY_PATTERN}),
        ] = None,
    ) -> Response[OperationResource]:
        return await _post(request, dashboard, "{name}:retry")  # only the literal path: InvalidKey (400)

    @get(
        "/operations",
        summary="List live operations from the dashboard's index",
        operation_id="ListOperations",
        operation_class=_ListOperation,
        responses=_errors((400, "INVALID_ARGUMENT: an unusable filter, page_size or page_token")),
    )
    async def list_operations(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> OperationList:
        params = query_params(request)
        expressions = params.pop("filter", [])
        for expression in expressions:
            for key, values in parse_filter_expression(expression).items():
                params.setdefault(key, []).extend(values)
        size = _page_size(params.pop("page_size", []), dashboard.settings.page_size)
        tokens = params.pop("page_token", [])
        cursor = decode_page_token(tokens[0]) if tokens and tokens[0] else None
        page, next_cursor = dashboard.index.query(parse_filter(params), size, cursor)
        return OperationList(
            operations=[summary_resource(op) for op in page],
            next_page_token=encode_page_token(next_cursor) if next_cursor else "",
        )

    @get(
        "/archive/operations",
        summary="Search archived operations (the /archive page as JSON)",
        description=(
            "Finished operations from the PostgreSQL archive, newest finished first, with the /archive page's "
            "filters: status (succeeded, failed, cancelled; repeatable or comma-separated), failed_stage, "
            "pipeline, id (a prefix), finished_after / finished_before (ISO 8601, UTC without offset), "
            "meta (key=value, JSON containment: tier=2). Keyset pagination: page_size (1-500), page_token. "
            "503 UNAVAILABLE when no archive is configured (DASHBOARD_DATABASE_URL and DATABASE_URL unset), "
            "PostgreSQL is unreachable or it refuses the dashboard's role."
        ),
        tags=["archive"],
        operation_class=_ArchiveOperation,
        responses=_errors(
            (400, "INVALID_ARGUMENT: an unusable filter, page_size or page_token"),
            (503, "UNAVAILABLE: no archive configured (DATABASE_URL), or PostgreSQL unreachable (Retry-After)"),
        ),
    )
    async def search_archive(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> OperationList:
        params = query_params(request)
        size = _page_size(params.pop("page_size", []), dashboard.settings.page_size)
        page = await archive_search(dashboard, archive_query(params), size)
        return OperationList(
            operations=[_resource(dashboard, item.operation, archived=True) for item in page.items],
            next_page_token=page.next_token or "",
        )

    @get(
        "/overview",
        summary="The overview's figures (the / page as JSON)",
        description=(
            "Per stage live counts by status, p50/p95 over the stats window and stuck counts; totals by "
            "operation status; throughput per minute; the stuck stages and recent failures. pipeline=NAME "
            "selects a pipeline (default: the one with the most operations)."
        ),
        tags=["overview"],
        operation_class=_OverviewOperation,
        responses=_errors((400, "INVALID_ARGUMENT: an unknown pipeline, or pipeline given twice")),
    )
    async def overview(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> Overview:
        now = time.time()
        context = overview_context(dashboard, pipeline_param(request), now) | banner_context(dashboard, now)
        return overview_resource(context)

    @get("/csrf", summary="A CSRF token for API writes", responses=_errors())
    async def csrf(self, request: Request[Any, Any, Any]) -> CsrfToken:
        token = ScopeState.from_scope(request.scope).csrf_token
        return CsrfToken(csrf_token=token if isinstance(token, str) else "")
