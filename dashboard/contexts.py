"""Context builders: one per page, shared by the page and its live fragment.

``templates/<page>.html`` includes ``templates/partials/<page>.html``; htmx re-fetches
``/partials/<page>`` which renders the same partial from the same builder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dashboard.archive import ArchiveAccess
from dashboard.errors import ArchiveUnavailable, BadQuery
from dashboard.feed import Broadcaster, IndexFeed
from dashboard.formatting import show, trace_link
from dashboard.index import OperationIndex
from dashboard.jobs import JobSupervisor, filter_expression, job_resource
from dashboard.query import (
    ArchiveQuery,
    archive_query,
    decode_page_token,
    encode_page_token,
    filter_params,
    parse_filter,
    query_string,
)
from dashboard.settings import DashboardSettings
from kvstate import (
    Client,
    ConnectionLostError,
    CorruptValue,
    JobStore,
    KvstateError,
    Operation,
    OperationNotFound,
    OpStatus,
    Pipeline,
    Revision,
    StageStatus,
    attempts,
    retry_stages,
)
from kvstate.keys import validate_id

if TYPE_CHECKING:
    from archiver.read import ArchivePage

__all__ = [
    "DashboardState",
    "archive_context",
    "archive_search",
    "banner_context",
    "job_context",
    "jobs_context",
    "operation_context",
    "operations_context",
    "overview_context",
]

OP_STATUS_ORDER = ("pending", "running", "succeeded", "failed", "cancelled", "corrupt")
STAGE_COUNT_ORDER = (StageStatus.WAITING, StageStatus.RUNNING, StageStatus.RETRYING, StageStatus.SUCCEEDED,
                     StageStatus.FAILED, StageStatus.SKIPPED, StageStatus.CANCELLED)  # fmt: skip


@dataclass
class DashboardState:
    """Everything a request handler needs, opened by the lifespan and kept on ``app.state``."""

    settings: DashboardSettings
    client: Client
    index: OperationIndex
    feed: IndexFeed
    broadcaster: Broadcaster
    archive: ArchiveAccess
    extra: dict[str, Any] = field(default_factory=dict)
    jobs: JobSupervisor | None = None
    """runs the bulk jobs created here (set by the lifespan)"""

    @property
    def supervisor(self) -> JobSupervisor:
        """The job supervisor; RuntimeError outside the lifespan."""
        if self.jobs is None:
            raise RuntimeError("the dashboard's job supervisor is not started")
        return self.jobs


def banner_context(state: DashboardState, now: float) -> dict[str, Any]:
    """Connection status shown on every page."""
    return {
        "nats_connected": state.client.connected,
        "disconnected_since": state.feed.disconnected_since,
        "index_ready": state.feed.ready.is_set(),
        "now": now,
    }


# ---------------------------------------------------------------------- overview


def _list_url(**params: str | Sequence[str]) -> str:
    pairs = [(k, v) for k, vs in params.items() for v in ([vs] if isinstance(vs, str) else vs)]
    return "/operations?" + query_string(pairs)


def _chart(points: list[tuple[int, int, int]]) -> dict[str, Any]:
    """SVG geometry of the throughput chart (viewBox 0 0 300 64, two bars per minute)."""
    peak = max([max(s, f) for _, s, f in points] + [1])
    bars = []
    width = 300 / max(1, len(points))
    for i, (minute, started, finished) in enumerate(points):
        x = i * width
        for offset, value, kind in ((0.1, started, "started"), (0.5, finished, "finished")):
            height = 60 * value / peak
            bars.append(
                {
                    "x": round(x + offset * width, 2),
                    "y": round(62 - height, 2),
                    "w": round(width * 0.38, 2),
                    "h": round(height, 2),
                    "kind": kind,
                    "value": value,
                    "minute": minute,
                }
            )
    return {"bars": bars, "peak": peak}


def overview_context(state: DashboardState, pipeline_name: str | None, now: float) -> dict[str, Any]:
    """The overview: the selected pipeline's DAG with live counts, totals, throughput, stuck and failed."""
    index = state.index
    names = sorted(index.pipelines)
    if pipeline_name is not None and pipeline_name not in index.pipelines:
        raise BadQuery("pipeline", f"no pipeline named {pipeline_name[:64]!r} (known: {', '.join(names) or 'none'})")
    if pipeline_name is None and names:
        pipeline_name = max(names, key=lambda n: sum(index.status_counts(n).values()))
    pipeline = index.pipelines.get(pipeline_name) if pipeline_name else None
    totals = index.status_counts(pipeline_name) if pipeline_name else index.status_counts()
    stages = index.stage_stats(pipeline, now) if pipeline else {}
    layers = []
    if pipeline is not None:
        for depth, layer in enumerate(pipeline.layers()):
            layers.append({"depth": depth, "stages": [stages[name] for name in layer]})
    points = index.throughput(now, 30)
    stuck, stuck_total = index.stuck(20, pipeline_name)
    last_minutes = points[-5:]
    return {
        "pipelines": names,
        "pipeline": pipeline,
        "layers": layers,
        "totals": [(s, totals.get(s, 0)) for s in OP_STATUS_ORDER if s != "corrupt" or totals.get(s)],
        "total": sum(totals.values()),
        "operations_in_bucket": len(index),
        "stage_count_order": STAGE_COUNT_ORDER,
        "chart": _chart(points),
        "throughput": points,
        "started_per_minute": sum(s for _, s, _ in last_minutes) / max(1, len(last_minutes)),
        "finished_per_minute": sum(f for _, _, f in last_minutes) / max(1, len(last_minutes)),
        "stuck": stuck,
        "stuck_total": stuck_total,
        "failures": index.recent_failures(10, pipeline_name),
        "stats_window": index.stats_window,
        "list_url": _list_url,
        "empty": len(index) == 0,
        "now": now,
    }


# ---------------------------------------------------------------------- operations list


def operations_context(state: DashboardState, params: Mapping[str, Sequence[str]], now: float) -> dict[str, Any]:
    """One page of the filtered operations list."""
    flt = parse_filter(params)
    tokens = [v for v in params.get("page_token", ()) if v]
    cursor = decode_page_token(tokens[0]) if tokens else None
    page, next_cursor = state.index.query(flt, state.settings.page_size, cursor)
    base = filter_params(flt)
    next_url = None
    if next_cursor is not None:
        next_url = "/operations?" + query_string([*base, ("page_token", encode_page_token(next_cursor))])
    return {
        "filter": flt,
        "rows": page,
        "next_url": next_url,
        "first_url": "/operations?" + query_string(base) if cursor is not None else None,
        "query": query_string([*base, *(("page_token", t) for t in tokens[:1])]),
        "order_url": "/operations?"
        + query_string(filter_params(flt, order="newest" if not flt.newest_first else "oldest")),
        "statuses": [s for s in OP_STATUS_ORDER],
        "stage_statuses": [s.value for s in StageStatus],
        "pipelines": sorted(state.index.pipelines),
        "stage_names": sorted({s.name for p in state.index.pipelines.values() for s in p.stages}),
        "total_in_bucket": len(state.index),
        "stuck_ids": {row.id for row in page if state.index.stuck_stages_of(row.id)},
        "filter_expression": filter_expression(flt),
        "now": now,
    }


# ---------------------------------------------------------------------- operation detail


@dataclass(frozen=True, slots=True)
class Bar:
    """One attempt of one stage on the timeline, in percent of the operation's span."""

    attempt: int
    status: str
    x: float
    width: float
    start: datetime
    end: datetime | None


def timeline(op: Operation, pipeline: Pipeline | None, now: datetime) -> dict[str, Any]:
    """The Gantt rows of ``op``: one row per stage grouped by layer, one bar per attempt."""
    start = op.created_at
    end = op.finished_at or max(now, op.updated_at)
    span = max((end - start).total_seconds(), 0.001)
    layers = pipeline.layers() if pipeline is not None else [[name] for name in op.stages]
    groups = []
    for depth, layer in enumerate(layers):
        rows = []
        for name in layer:
            bars = []
            for attempt in attempts(op, name):  # the one rule (kvstate.derive)
                began, ended = attempt.started_at, attempt.finished_at
                x = max(0.0, (began - start).total_seconds() / span * 100)
                width = max(0.6, ((ended or end) - began).total_seconds() / span * 100)
                bars.append(
                    Bar(attempt.number, attempt.status.value, round(x, 3), round(min(width, 100 - x), 3), began, ended)
                )
            rows.append({"stage": name, "state": op.stage(name), "bars": bars})
        groups.append({"depth": depth, "parallel": len(layer) > 1, "rows": rows})
    return {"groups": groups, "span": span, "start": start, "end": end}


def _revision_rows(revisions: list[Revision]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rev in reversed(revisions):
        if rev.deleted:
            rows.append({"revision": rev.revision, "created": rev.created, "kind": "removed", "status": None})
        elif rev.error is not None:
            rows.append({"revision": rev.revision, "created": rev.created, "kind": "corrupt", "text": show(rev.error)})
        elif rev.operation is not None:
            op = rev.operation
            rows.append(
                {
                    "revision": rev.revision,
                    "created": rev.created,
                    "kind": "value",
                    "status": op.status.value,
                    "active": op.active_stages,
                    "last": op.history[-1] if op.history else None,
                }
            )
    return rows


async def operation_context(state: DashboardState, op_id: str, now: float) -> dict[str, Any]:
    """The detail page: the live operation from the bucket, or its archived snapshot.

    While NATS is unreachable the operation cannot be read: the context then has
    ``unreachable`` set and only what the index last knew of the operation (``summary``),
    so the page can say so and fill in by itself, and its fragment keep what it shows.
    """
    validate_id(op_id)
    client = state.client
    now_dt = datetime.fromtimestamp(now, UTC)
    context: dict[str, Any] = {
        "op_id": op_id,
        "now": now,
        "source": "live",
        "corrupt": None,
        "archived": None,
        "unreachable": False,
    }
    if not client.connected:  # say so now rather than after the client's timeout
        return _unreachable(state, context)
    op: Operation | None = None
    try:
        op = await client.get(op_id)
    except ConnectionLostError:
        return _unreachable(state, context)
    except CorruptValue as exc:
        context["corrupt"] = show(exc)
    except OperationNotFound as missing:
        archived = None
        if state.archive.enabled:
            try:
                archived = await state.archive.get(op_id)
            except ArchiveUnavailable as exc:
                raise OperationNotFound(op_id, f"not in the bucket, and the archive cannot be searched: {exc}") from exc
        if archived is None:
            raise missing
        op = archived.operation
        context["source"] = "archive"
        context["archived"] = archived
    revisions: list[Revision] = []
    if context["source"] == "live":
        try:
            revisions = await client.history(op_id)
        except OperationNotFound:
            revisions = []
        except ConnectionLostError:
            return _unreachable(state, context)
    context["revisions"] = _revision_rows(revisions)
    context["op"] = op
    if op is None:
        return context
    pipeline = state.index.pipelines.get(op.pipeline)
    if pipeline is None:
        try:
            pipeline = await client.pipeline(op.pipeline)
        except KvstateError:
            pipeline = None
    stuck = state.index.stuck_stages_of(op_id) if context["source"] == "live" else {}
    template = state.settings.trace_url
    context.update(
        {
            "trace_url": trace_link(template, op.trace_id),
            "stage_trace_urls": {name: trace_link(template, st.trace_id) for name, st in op.stages.items()},
            "pipeline": pipeline,
            "timeline": timeline(op, pipeline, now_dt),
            "stuck": stuck,
            "age": (now_dt - op.created_at).total_seconds(),
            "cancellable": context["source"] == "live" and not op.status.terminal,
            "retryable": context["source"] == "live" and op.status.terminal,
            "redrivable": context["source"] == "archive",
            "retry_default": retry_stages(op, pipeline) if pipeline is not None else (),
            "stage_names": list(pipeline.stage_names) if pipeline is not None else list(op.stages),
            "stage_metadata": [(name, st) for name, st in op.stages.items() if st.metadata or st.error],
            "history": list(reversed(op.history)),
        }
    )
    return context


def _unreachable(state: DashboardState, context: dict[str, Any]) -> dict[str, Any]:
    """The detail context while the bucket cannot be read: what the index last knew, if anything."""
    context.update({"unreachable": True, "op": None, "summary": state.index.get(context["op_id"])})
    return context


# ---------------------------------------------------------------------- archive


async def archive_search(state: DashboardState, query: ArchiveQuery, limit: int) -> ArchivePage:
    """One page of ``query``'s results; ArchiveUnavailable when the archive is not configured or unreachable."""
    if not state.archive.enabled:
        raise ArchiveUnavailable(state.archive.problem or "the archive is not configured")
    return await state.archive.search(**query.criteria, limit=limit, page_token=query.page_token)


async def archive_context(state: DashboardState, params: Mapping[str, Sequence[str]], now: float) -> dict[str, Any]:
    """Search results from the PostgreSQL archive (or why the archive cannot be searched)."""
    query = archive_query(params)
    context: dict[str, Any] = {
        "enabled": state.archive.enabled,
        "problem": state.archive.problem,
        "params": query.form,
        "statuses": query.statuses,
        "terminal_statuses": sorted(s.value for s in OpStatus if s.terminal),
        "items": [],
        "next_url": None,
        "now": now,
    }
    if not state.archive.enabled:
        return context
    try:
        page = await archive_search(state, query, state.settings.page_size)
    except ArchiveUnavailable as exc:
        context["problem"] = str(exc)
        return context
    context["problem"] = None
    context["items"] = page.items
    if page.next_token:
        pairs = [(k, v) for k in sorted(params) if k != "page_token" for v in params[k] if v]
        context["next_url"] = "/archive?" + query_string([*pairs, ("page_token", page.next_token)])
    return context


# ---------------------------------------------------------------------- bulk jobs


async def jobs_context(state: DashboardState, now: float) -> dict[str, Any]:
    """Every bulk job in the bucket, newest first, with its progress."""
    jobs = await JobStore(state.client).list()
    return {"jobs": [job_resource(job) for job in jobs], "now": now}


async def job_context(state: DashboardState, job_id: str, now: float) -> dict[str, Any]:
    """One bulk job: its progress, counts and problems; whether it can be cancelled or resumed here."""
    validate_id(job_id, "job id")
    job = await JobStore(state.client).get(job_id)
    now_dt = datetime.fromtimestamp(now, UTC)
    lease_expired = job.lease is None or job.lease.until <= now_dt
    return {
        "job": job_resource(job),
        "job_id": job.id,
        "cancellable": not job.done,
        "resumable": not job.done and lease_expired and not (state.jobs is not None and state.jobs.running(job.id)),
        "now": now,
    }
