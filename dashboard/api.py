"""The JSON API, shaped like Google's long-running Operations (google.longrunning).

    GET  /api/operations/{id}          one operation: name, done, metadata, error | result; ETag = revision
                                       (a corrupt stored value: error code 15 DATA_LOSS, as in the list)
    GET  /api/operations               filter (``status=running AND stage=geo``), page_size, page_token
    POST /api/operations/{id}:cancel   revision-checked cancel (write token when configured;
                                       CSRF token unless sent as Authorization: Bearer)
    GET  /api/csrf                     a CSRF token for API writes (send it back as X-CSRFToken)
    GET  /api/overview                 the overview's figures (``pipeline``), from the page's context builder
    GET  /api/archive/operations       the /archive search: its filters, page_size, page_token; 503 without
                                       an archive

``metadata`` is the full operation state; ``result`` (succeeded) holds the shared and
per-stage metadata; ``error`` (failed, cancelled) is a google.rpc.Status-like object.
Times outside an operation's state are epoch seconds, as in the list.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.utils.scope.state import ScopeState

from dashboard.contexts import archive_search, banner_context, overview_context
from dashboard.errors import BadQuery
from dashboard.pages import Dashboard, pipeline_param, query_params
from dashboard.query import archive_query, decode_page_token, encode_page_token, parse_filter, parse_filter_expression
from dashboard.security import check_write_access
from dashboard.summary import CORRUPT, OpSummary
from kvstate import CorruptValue, Operation, OperationNotFound, OpStatus, failure_message
from kvstate.keys import validate_id

__all__ = ["OperationsApi", "overview_resource"]

_CODE_CANCELLED = 1  # google.rpc.Code.CANCELLED
_CODE_ABORTED = 10  # google.rpc.Code.ABORTED: the pipeline gave up on the operation
_CODE_DATA_LOSS = 15  # google.rpc.Code.DATA_LOSS: the stored value is corrupt
MAX_PAGE_SIZE = 500


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why an operation did not succeed (google.rpc.Status)."""

    code: int
    message: str
    details: list[dict[str, Any]] = []


class OperationResource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One operation (google.longrunning.Operation)."""

    name: str
    done: bool
    metadata: dict[str, Any]
    error: Status | None = None
    result: dict[str, Any] | None = None


class OperationList(msgspec.Struct, kw_only=True):
    """One page of operations (google.longrunning.ListOperationsResponse)."""

    operations: list[OperationResource]
    next_page_token: str = ""


class CsrfToken(msgspec.Struct, kw_only=True):
    """A CSRF token to send back in the X-CSRFToken header of API writes."""

    csrf_token: str
    header: str = "X-CSRFToken"


class StageFigures(msgspec.Struct, kw_only=True):
    """One stage of the overview's DAG: live counts per status, p50/p95 over the stats window, stuck."""

    name: str
    layer: int  # 0 first; stages in the same layer run in parallel
    counts: dict[str, int]
    p50_seconds: float | None
    p95_seconds: float | None
    samples: int
    stuck: int
    optional: bool
    deadline_seconds: float | None


class MinuteCounts(msgspec.Struct, kw_only=True):
    """Operations started and finished in one minute."""

    minute: float  # epoch seconds of the minute's start
    started: int
    finished: int


class Throughput(msgspec.Struct, kw_only=True):
    """The overview's throughput chart: the last minutes, and the mean of the last five."""

    started_per_minute: float
    finished_per_minute: float
    minutes: list[MinuteCounts]


class StuckStage(msgspec.Struct, kw_only=True):
    """A running stage past its deadline or without a heartbeat."""

    id: str
    pipeline: str
    stage: str
    reason: str
    since: float


class RecentFailure(msgspec.Struct, kw_only=True):
    """An operation that failed recently."""

    id: str
    pipeline: str
    stage: str | None
    message: str
    at: float


class Overview(msgspec.Struct, kw_only=True):
    """The figures of the overview page (``/``) for one pipeline."""

    pipeline: str | None
    pipelines: list[str]
    operations_in_bucket: int
    total: int  # operations of the selected pipeline
    totals: dict[str, int]  # by operation status
    stages: list[StageFigures]
    throughput: Throughput
    stuck_total: int
    stuck: list[StuckStage]  # the longest stuck first, at most 20
    recent_failures: list[RecentFailure]  # newest first
    stats_window_seconds: float
    nats_connected: bool
    disconnected_since: float | None
    index_ready: bool


def overview_resource(context: dict[str, Any]) -> Overview:
    """The overview page's context (``overview_context`` plus ``banner_context``) as JSON-ready values."""
    pipeline = context["pipeline"]
    return Overview(
        pipeline=pipeline.name if pipeline is not None else None,
        pipelines=context["pipelines"],
        operations_in_bucket=context["operations_in_bucket"],
        total=context["total"],
        totals=dict(context["totals"]),
        stages=[
            StageFigures(
                name=stage.name,
                layer=layer["depth"],
                counts={status.value: stage.counts[status] for status in context["stage_count_order"]},
                p50_seconds=stage.p50,
                p95_seconds=stage.p95,
                samples=stage.samples,
                stuck=stage.stuck,
                optional=stage.optional,
                deadline_seconds=stage.deadline,
            )
            for layer in context["layers"]
            for stage in layer["stages"]
        ],
        throughput=Throughput(
            started_per_minute=context["started_per_minute"],
            finished_per_minute=context["finished_per_minute"],
            minutes=[MinuteCounts(minute=m, started=s, finished=f) for m, s, f in context["throughput"]],
        ),
        stuck_total=context["stuck_total"],
        stuck=[
            StuckStage(id=s.op_id, pipeline=s.pipeline, stage=s.stage, reason=s.reason, since=s.since)
            for s in context["stuck"]
        ],
        recent_failures=[
            RecentFailure(id=f.op_id, pipeline=f.pipeline, stage=f.stage, message=f.message, at=f.at)
            for f in context["failures"]
        ],
        stats_window_seconds=context["stats_window"],
        nats_connected=context["nats_connected"],
        disconnected_since=context["disconnected_since"],
        index_ready=context["index_ready"],
    )


def operation_resource(op: Operation, *, archived: bool = False) -> OperationResource:
    """The Google-shaped view of one operation."""
    state = msgspec.to_builtins(msgspec.structs.replace(op, events=[]))
    state.pop("events", None)
    state["@type"] = "kvstate.Operation"
    state["archived"] = archived
    resource = OperationResource(name=f"operations/{op.id}", done=op.done, metadata=state)
    if op.status is OpStatus.SUCCEEDED:
        stages = {name: st.metadata for name, st in op.stages.items() if st.metadata}
        resource.result = {"metadata": op.metadata, "stages": msgspec.to_builtins(stages)}
    elif op.status is OpStatus.FAILED:
        details = [
            {"stage": name, **msgspec.to_builtins(st.error)} for name, st in op.stages.items() if st.error is not None
        ]
        resource.error = Status(code=_CODE_ABORTED, message=failure_message(op) or "failed", details=details)
    elif op.status is OpStatus.CANCELLED:
        resource.error = Status(code=_CODE_CANCELLED, message=failure_message(op) or "cancelled")
    return resource


def summary_resource(op: OpSummary) -> OperationResource:
    """The list view of one operation, from the index (no bucket read)."""
    metadata: dict[str, Any] = {
        "@type": "kvstate.OperationSummary",
        "id": op.id,
        "pipeline": op.pipeline,
        "status": op.status,
        "created_at": op.created,
        "updated_at": op.updated,
        "finished_at": op.finished,
        "revision": op.revision,
        "active_stages": op.active_stages,
        "stages": {name: status.value for name, status in op.stages()},
    }
    resource = OperationResource(name=f"operations/{op.id}", done=op.done, metadata=metadata)
    if op.corrupt:
        resource.error = Status(code=_CODE_DATA_LOSS, message=f"corrupt value at revision {op.revision}")
    return resource


def corrupt_resource(op_id: str, exc: CorruptValue) -> OperationResource:
    """A key whose stored value is not a valid operation: DATA_LOSS, as the list reports it."""
    metadata: dict[str, Any] = {
        "@type": "kvstate.CorruptValue",
        "id": op_id,
        "status": CORRUPT,
        "revision": exc.revision,
        "archived": False,
    }
    message = f"corrupt value at revision {exc.revision}: {exc.detail}"
    return OperationResource(
        name=f"operations/{op_id}", done=False, metadata=metadata, error=Status(code=_CODE_DATA_LOSS, message=message)
    )


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


class OperationsApi(Controller):
    """JSON API under /api."""

    path = "/api"
    tags = ["operations"]

    @get("/operations/{name:str}", summary="Get one operation (ETag = KV revision)")
    async def get_operation(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> Response[OperationResource]:
        op_id = validate_id(name.removeprefix("operations/"))
        try:
            op = await dashboard.client.get(op_id)
            resource, revision = operation_resource(op), op.revision
        except CorruptValue as exc:  # a resource like the list's, not an error: the key exists
            resource, revision = corrupt_resource(op_id, exc), exc.revision
        except OperationNotFound:
            found = await dashboard.archive.get(op_id) if dashboard.archive.enabled else None
            if found is None:
                raise
            resource, revision = operation_resource(found.operation, archived=True), found.operation.revision
        etag = _etag(revision)
        if request.headers.get("if-none-match") == etag:
            return Response(content=None, status_code=304, headers={"ETag": etag})  # type: ignore[arg-type]
        return Response(resource, headers={"ETag": etag, "Cache-Control": "no-cache"})

    @get("/operations", summary="List live operations from the dashboard's index")
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
            "503 UNAVAILABLE when no archive is configured (DATABASE_URL unset) or PostgreSQL is unreachable."
        ),
        tags=["archive"],
    )
    async def search_archive(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> OperationList:
        params = query_params(request)
        size = _page_size(params.pop("page_size", []), dashboard.settings.page_size)
        page = await archive_search(dashboard, archive_query(params), size)
        return OperationList(
            operations=[operation_resource(item.operation, archived=True) for item in page.items],
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
    )
    async def overview(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> Overview:
        now = time.time()
        context = overview_context(dashboard, pipeline_param(request), now) | banner_context(dashboard, now)
        return overview_resource(context)

    @post(
        "/operations/{name:str}", summary="POST /api/operations/{id}:cancel cancels (revision-checked)", status_code=200
    )
    async def operation_method(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> OperationResource:
        op_id, _, method = name.removeprefix("operations/").partition(":")
        if method != "cancel":
            raise NotFoundException("the only operation method is :cancel")
        validate_id(op_id)
        check_write_access(request, dashboard.settings.auth_token)
        reason = "cancelled through the API"
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.body()
            if body:
                try:
                    data = msgspec.json.decode(body)
                except msgspec.DecodeError:
                    raise BadQuery("body", "not JSON") from None
                if not isinstance(data, dict) or not isinstance(data.get("reason", ""), str):
                    raise BadQuery("body", 'expected {"reason": "..."}')
                reason = data.get("reason") or reason
        if len(reason) > 500:
            raise BadQuery("reason", "at most 500 characters")
        result = await dashboard.client.cancel(op_id, reason=reason, by="api")
        result.raise_for_stale()
        return operation_resource(result.operation)

    @get("/csrf", summary="A CSRF token for API writes")
    async def csrf(self, request: Request[Any, Any, Any]) -> CsrfToken:
        token = ScopeState.from_scope(request.scope).csrf_token
        return CsrfToken(csrf_token=token if isinstance(token, str) else "")
