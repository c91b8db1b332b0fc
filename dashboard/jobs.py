"""Bulk jobs in the dashboard: their operations chosen from the index, run in this process, as JSON.

A job's targets are what the list's filter matches in the index when the job is created
(``select``): the same evaluation as the /operations page and ``GET /api/operations``, so the
count the confirmation shows is what the operator saw listed. The job record then keeps those
ids (kvstate.jobs), so it works through exactly them whatever changes afterwards.

``JobSupervisor`` runs the jobs created here, one task each, under one lease owner name
for the process; the lifespan stops them at shutdown, which leaves them paused (resumable
here with ``:resume`` or anywhere with ``kvstate jobs run ID``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from dashboard.errors import BadQuery
from dashboard.index import OperationIndex
from dashboard.planner import OperationFilter
from dashboard.query import filter_params, parse_filter, parse_filter_expression
from dashboard.summary import OpSummary
from kvstate import (
    Client,
    Job,
    JobBusy,
    JobFinished,
    JobRunner,
    KvstateError,
    OpStatus,
    UnknownStage,
)
from kvstate.job_runner import runner_name
from kvstate.tasks import cancel_and_wait

__all__ = [
    "MAX_SAMPLE",
    "JobList",
    "JobPreview",
    "JobRequest",
    "JobResource",
    "JobSupervisor",
    "Selection",
    "decode_job_request",
    "eligible",
    "filter_expression",
    "job_resource",
    "select",
]

log = logging.getLogger("dashboard.jobs")

MAX_SAMPLE = 10
"""Operations a dry run (the confirmation) shows."""
MAX_FILTER = 1000
_STOP_WAIT = 10.0
"""most seconds the shutdown waits for the runners to pause their jobs"""


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /api/jobs``: which operations (the list's filter), what to do, why."""

    filter: str
    action: str
    reason: str
    stages: list[str] = []
    by: str | None = None
    rate: float | None = None
    """operations per second (default DASHBOARD_JOB_RATE)"""
    dry_run: bool = False
    """only count them and show a sample: nothing is created"""


_request_decoder = msgspec.json.Decoder(JobRequest)


def decode_job_request(body: bytes) -> JobRequest:
    """The job request of an API body; BadQuery naming what is wrong."""
    if not body.strip():
        raise BadQuery("body", 'empty: send {"filter": "...", "action": "cancel", "reason": "..."}')
    try:
        request = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadQuery("body", f"not a job request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadQuery("body", f"not JSON: {exc}") from None
    if len(request.filter) > MAX_FILTER:
        raise BadQuery("filter", f"longer than {MAX_FILTER} characters")
    if request.by is not None and not 1 <= len(request.by) <= 64:
        raise BadQuery("by", "1-64 characters")
    return request


def filter_of(expression: str) -> OperationFilter:
    """The filter of a ``filter=`` expression, as the list API reads it; BadQuery on bad terms."""
    params = parse_filter_expression(expression)
    extra = sorted(set(params) & {"page_token", "page_size", "filter"})
    if extra:
        raise BadQuery("filter", f"{extra[0]} is not a filter term")
    return parse_filter(params)


def filter_expression(flt: OperationFilter) -> str:
    """``flt`` written as a ``filter=`` expression (``status=failed AND pipeline=orders``; empty: every operation)."""
    return " AND ".join(f"{key}={value}" for key, value in filter_params(flt, order=None))


@dataclass(frozen=True, slots=True)
class Selection:
    """What a filter matches in the index, at most ``limit`` of it, and whether there is more."""

    matched: list[OpSummary]
    more: bool


def select(index: OperationIndex, flt: OperationFilter, limit: int) -> Selection:
    """The operations ``flt`` matches, in the list's order, at most ``limit`` (``more``: the filter matches more)."""
    page, cursor = index.query(flt, limit)
    return Selection(page, cursor is not None)


def eligible(op: OpSummary, action: str, stages: list[str]) -> bool:
    """Whether ``action`` would change ``op`` as it is now (a running job skips the rest, and counts them)."""
    if op.corrupt:
        return False
    if action == "cancel":
        return not op.done
    if op.status in (OpStatus.FAILED.value, OpStatus.CANCELLED.value):
        return True
    return op.status == OpStatus.SUCCEEDED.value and bool(stages)


def check_stages(index: OperationIndex, matched: list[OpSummary], stages: list[str]) -> None:
    """UnknownStage when a stage named is missing from the pipeline of a matched operation."""
    for name in sorted({op.pipeline for op in matched if not op.corrupt}):
        pipeline = index.pipelines.get(name)
        known = (
            pipeline.stage_names if pipeline is not None else next(o.stage_names for o in matched if o.pipeline == name)
        )
        for stage in stages:
            if stage not in known:
                raise UnknownStage(stage, name, tuple(known))


class JobCountsResource(msgspec.Struct, kw_only=True):
    """How many operations the job matched, and what it did to those it went through."""

    matched: int
    applied: int
    skipped: int
    failed: int


class JobProblemResource(msgspec.Struct, kw_only=True):
    """An operation the job skipped or could not change, and why."""

    op_id: str
    result: str
    message: str


class JobResource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One bulk job: what it does to which operations, how far it got, and how it ended (``done``)."""

    name: str
    id: str
    action: str
    state: str
    done: bool
    filter: str
    reason: str
    counts: JobCountsResource
    processed: int
    rate: float
    created_at: datetime
    updated_at: datetime
    revision: int
    stages: list[str] = []
    by: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    runner: str | None = None
    runner_until: datetime | None = None
    problems: list[JobProblemResource] = []
    cancelled_by: str | None = None
    cancel_reason: str | None = None


class JobList(msgspec.Struct, kw_only=True):
    """Every job in the bucket, newest first."""

    jobs: list[JobResource]


class SampleOperation(msgspec.Struct, kw_only=True):
    """One operation a job would change."""

    id: str
    pipeline: str
    status: str
    eligible: bool


class JobPreview(msgspec.Struct, kw_only=True):
    """A dry run: how many operations the filter matches now, how many the action would change, a sample."""

    filter: str
    action: str
    matched: int
    eligible: int
    limit: int
    sample: list[SampleOperation]


def job_resource(job: Job) -> JobResource:
    """The API resource of ``job``."""
    c = job.counts
    lease = job.lease if not job.done else None
    return JobResource(
        name=f"jobs/{job.id}",
        id=job.id,
        action=job.action.value,
        state=job.state.value,
        done=job.done,
        filter=job.filter,
        reason=job.reason,
        stages=list(job.stages),
        by=job.by,
        counts=JobCountsResource(matched=c.matched, applied=c.applied, skipped=c.skipped, failed=c.failed),
        processed=c.processed,
        rate=job.rate,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        runner=lease.owner if lease is not None else None,
        runner_until=lease.until if lease is not None else None,
        problems=[JobProblemResource(op_id=p.op_id, result=p.result, message=p.message) for p in job.problems],
        cancelled_by=job.cancel.by if job.cancel is not None else None,
        cancel_reason=job.cancel.reason if job.cancel is not None else None,
        revision=job.revision,
    )


def preview(selection: Selection, flt_text: str, action: str, stages: list[str], limit: int) -> JobPreview:
    """The dry run of a job over ``selection``."""
    sample = [
        SampleOperation(id=op.id, pipeline=op.pipeline, status=op.status, eligible=eligible(op, action, stages))
        for op in selection.matched[:MAX_SAMPLE]
    ]
    return JobPreview(
        filter=flt_text,
        action=action,
        matched=len(selection.matched),
        eligible=sum(eligible(op, action, stages) for op in selection.matched),
        limit=limit,
        sample=sample,
    )


class JobSupervisor:
    """Runs the dashboard's jobs, one task each; ``stop`` pauses them (the lifespan calls it)."""

    def __init__(self, client: Client, *, on_step: Callable[[Job], None] | None = None) -> None:
        self.owner = runner_name("dashboard")
        self._runner = JobRunner(client, owner=self.owner, on_step=on_step)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stop = asyncio.Event()

    def running(self, job_id: str) -> bool:
        """True while this process runs ``job_id``."""
        return job_id in self._tasks

    def start(self, job_id: str) -> None:
        """Run ``job_id`` in the background (nothing when it runs here already)."""
        if self._stop.is_set():
            raise RuntimeError("the dashboard is shutting down")
        if job_id not in self._tasks:
            self._tasks[job_id] = asyncio.get_running_loop().create_task(self._run(job_id), name=f"job-{job_id}")

    async def _run(self, job_id: str) -> None:
        try:
            job = await self._runner.run(job_id, self._stop)
            log.info("job %s %s (%s applied)", job_id, job.state.value, job.counts.applied)
        except (JobFinished, JobBusy) as exc:
            log.info("job %s not run here: %s", job_id, exc)
        except KvstateError as exc:
            log.warning("job %s stopped: %s (resume it with kvstate jobs run %s)", job_id, exc, job_id)
        finally:
            self._tasks.pop(job_id, None)

    async def stop(self) -> None:
        """Pause every job this process runs, waiting a little for their runners to record it."""
        self._stop.set()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=_STOP_WAIT)
        await cancel_and_wait(pending)  # a runner stuck on NATS: its lease expires and the job can be resumed
