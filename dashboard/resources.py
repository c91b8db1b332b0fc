"""The JSON API's resources, shaped like google.longrunning (AIP-151), and the builders that make them.

    Operation     name ("operations/ID"), done, metadata (the full state, ``@type``
                  kvstate.Operation), and once done either ``response`` (succeeded: the
                  shared and per-stage metadata; also as ``result``, its deprecated earlier
                  name) or ``error`` (a google.rpc.Status: code 10
                  ABORTED for failed, 1 CANCELLED for cancelled, 15 DATA_LOSS for a corrupt
                  value; its message is kvstate.derive.failure_message)
    ErrorBody     the one error shape of every 4xx/5xx (dashboard.errors.exception_to_response)

With DASHBOARD_TRACE_URL set, ``metadata.trace_url`` links the operation's trace and
``metadata.stages.<stage>.trace_url`` the latest attempt's. Builders are pure: handlers
in dashboard.api call them.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from dashboard.formatting import trace_link
from dashboard.summary import CORRUPT, OpSummary
from kvstate import CorruptValue, Operation, OpStatus, failure_message

__all__ = [
    "CsrfToken",
    "ErrorBody",
    "ErrorDetail",
    "OperationList",
    "OperationResource",
    "Overview",
    "Status",
    "corrupt_resource",
    "operation_resource",
    "overview_resource",
    "summary_resource",
]

_CODE_CANCELLED = 1  # google.rpc.Code.CANCELLED
_CODE_ABORTED = 10  # google.rpc.Code.ABORTED: the pipeline gave up on the operation
_CODE_DATA_LOSS = 15  # google.rpc.Code.DATA_LOSS: the stored value is corrupt


_RESULT_DEPRECATED = "deprecated: `response` under its earlier name (without @type), kept for older clients"


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why an operation did not succeed (google.rpc.Status)."""

    code: int
    message: str
    details: list[dict[str, Any]] = []


class OperationResource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One operation (google.longrunning.Operation, AIP-151): ``response`` when it succeeded, ``error`` when
    it failed or was cancelled, neither while it runs."""

    name: str
    done: bool
    metadata: dict[str, Any]
    error: Status | None = None
    response: dict[str, Any] | None = None
    result: Annotated[dict[str, Any] | None, msgspec.Meta(description=_RESULT_DEPRECATED)] = None


class ErrorDetail(msgspec.Struct, kw_only=True):
    """What went wrong: the HTTP status, its google.rpc.Code name and a message naming the cause."""

    code: int
    status: str
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """The body of every error answer of the API (``{"error": {"code", "status", "message"}}``)."""

    error: ErrorDetail


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


def operation_resource(op: Operation, *, archived: bool = False, trace_url: str | None = None) -> OperationResource:
    """The Google-shaped view of one operation; ``trace_url`` is DASHBOARD_TRACE_URL (None: no trace links)."""
    state = msgspec.to_builtins(msgspec.structs.replace(op, events=[]))
    state.pop("events", None)
    state["@type"] = "kvstate.Operation"
    state["archived"] = archived
    if (link := trace_link(trace_url, op.trace_id)) is not None:
        state["trace_url"] = link
    for name, stage in op.stages.items():
        if (link := trace_link(trace_url, stage.trace_id)) is not None:
            state["stages"][name]["trace_url"] = link
    resource = OperationResource(name=f"operations/{op.id}", done=op.done, metadata=state)
    if op.status is OpStatus.SUCCEEDED:
        stages = {name: st.metadata for name, st in op.stages.items() if st.metadata}
        resource.response = {
            "@type": "kvstate.OperationResult",
            "metadata": op.metadata,
            "stages": msgspec.to_builtins(stages),
        }
        resource.result = {"metadata": op.metadata, "stages": resource.response["stages"]}
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
