"""Bulk jobs: one action (cancel or retry) applied to a fixed set of operations, recorded in the bucket.

A job is a value under ``job.<id>`` (docs/state-format.md#jobs). Its ``targets`` are fixed
when it is created: the dashboard evaluates the list's filter once on its index and the job
keeps the matching ids, at most a limit of them. So a job never grows while it runs, and a
job resumed after its runner died works through exactly the same operations.

Each operation is changed under the event id ``job:<job id>:<operation id>``
(``event_id_for``). The state machine remembers the event ids of cancels and reopens in the
operation's actions (``kvstate.model.ACTION_LIMIT`` of them, however many other events come
after), so a runner that died between changing an operation and recording it in the job
record changes it once: the resumed runner gets ``duplicate`` for it and counts it applied.

One runner at a time: it holds a lease on the job record (owner and expiry, renewed with
every step, all revision-checked), and a job whose runner died can be taken over once the
lease expired (``kvstate jobs run ID``).

States: ``pending`` (created, not started), ``running``, ``paused`` (its runner stopped
before the end, for a shutdown; resumable), and the final ones: ``done`` (every target
applied or skipped), ``failed`` (it went through every target and some could not be
changed: see ``problems``), ``cancelled``. ``finished_at`` is set exactly in the final ones.

This module is pure (no I/O): the records and their transitions. ``kvstate.job_runner``
reads and writes them and runs the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum

import msgspec

from kvstate._time import new_ulid
from kvstate.errors import InvalidJob, InvalidKey, JobBusy, JobFinished
from kvstate.keys import validate_id, validate_stage_name
from kvstate.model import CancelInfo

__all__ = [
    "DEFAULT_LEASE",
    "JOB_SCHEMA",
    "MAX_RATE",
    "MAX_REASON",
    "MIN_RATE",
    "PROBLEM_LIMIT",
    "Job",
    "JobAction",
    "JobCounts",
    "JobLease",
    "JobProblem",
    "JobState",
    "StepResult",
    "acquire",
    "cancel_job",
    "event_id_for",
    "finish",
    "holds_lease",
    "new_job",
    "next_target",
    "pause",
    "record",
    "release",
    "renew",
    "resumable",
]

JOB_SCHEMA = 1
"""Written into every job value as ``"schema"``."""
PROBLEM_LIMIT = 20
"""Skipped or failed operations remembered per job, with why (the oldest are dropped first)."""
DEFAULT_LEASE = 30.0
"""Seconds a runner's lease on a job lasts unless renewed (each step renews it)."""
MIN_RATE = 0.1
MAX_RATE = 1000.0
"""Bounds of a job's rate, operations per second."""
MAX_REASON = 500

_replace = msgspec.structs.replace


class JobAction(StrEnum):
    """What a job does to each of its operations."""

    CANCEL = "cancel"
    RETRY = "retry"


class JobState(StrEnum):
    """Where a job is (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True for done, failed and cancelled: the job ended and never runs again."""
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.CANCELLED, JobState.DONE, JobState.FAILED})


class StepResult(StrEnum):
    """What one step did to its operation."""

    APPLIED = "applied"
    """changed by this job (now, or before a crash: the event id came back a duplicate)"""
    SKIPPED = "skipped"
    """nothing to do: already finished (cancel), not finished (retry), archived, ..."""
    FAILED = "failed"
    """refused for a reason an operator should look at (an illegal transition, a corrupt value)"""


class JobCounts(msgspec.Struct, kw_only=True, frozen=True):
    """How many operations the job matched, and what it did to those it went through."""

    matched: int = 0
    applied: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def processed(self) -> int:
        """Operations gone through so far."""
        return self.applied + self.skipped + self.failed


class JobProblem(msgspec.Struct, kw_only=True, frozen=True):
    """An operation the job skipped or failed to change, and why."""

    op_id: str
    result: str
    """``skipped`` or ``failed``"""
    message: str


class JobLease(msgspec.Struct, kw_only=True, frozen=True):
    """Who runs the job, and until when their claim holds unless renewed."""

    owner: str
    until: datetime


class Job(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One bulk job, as stored under ``job.<id>``.

    ``targets[:cursor]`` have been gone through, in order; ``revision`` is the KV revision the
    value was read at (not stored in the value).
    """

    schema: int
    id: str
    action: JobAction
    state: JobState
    filter: str
    """the filter that chose the targets, as given (the dashboard's list filter)"""
    reason: str
    created_at: datetime
    updated_at: datetime
    targets: list[str]
    counts: JobCounts
    rate: float
    """operations per second, at most"""
    by: str | None = None
    """who created it"""
    stages: list[str] = []
    """retry: the stages to run again (none: each operation's failed stage)"""
    cursor: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease: JobLease | None = None
    lease_seconds: float = DEFAULT_LEASE
    problems: list[JobProblem] = []
    cancel: CancelInfo | None = None
    """who cancelled the job, when and why"""
    revision: int = 0

    @property
    def done(self) -> bool:
        """True once the job ended (done, failed or cancelled)."""
        return self.state.terminal

    @property
    def remaining(self) -> int:
        """Targets not gone through yet."""
        return len(self.targets) - self.cursor


def event_id_for(job_id: str, op_id: str) -> str:
    """The event id under which job ``job_id`` changes operation ``op_id``: the same on every try."""
    return f"job:{job_id}:{op_id}"


def new_job(
    job_id: str | None,
    action: JobAction | str,
    targets: Sequence[str],
    now: datetime,
    *,
    filter: str,
    reason: str,
    max_operations: int,
    rate: float,
    by: str | None = None,
    stages: Sequence[str] = (),
    lease_seconds: float = DEFAULT_LEASE,
) -> Job:
    """A pending job (``job_id`` None: a new ULID); InvalidJob when nothing matched, more than
    ``max_operations`` did, or a field is unusable."""
    job_id = validate_id(job_id, "job id") if job_id is not None else new_ulid()
    try:
        kind = JobAction(action)
    except ValueError:
        raise InvalidJob(f"unknown action {str(action)[:32]!r}: a job can {' or '.join(JobAction)}") from None
    reason = reason.strip()
    if not reason:
        raise InvalidJob("a job needs a reason (why the operations are changed)")
    if len(reason) > MAX_REASON:
        raise InvalidJob(f"the reason is longer than {MAX_REASON} characters")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidJob(f"rate {rate:g} operations/s is outside {MIN_RATE:g}-{MAX_RATE:g}")
    if lease_seconds <= 0:
        raise InvalidJob("the lease must last more than 0 seconds")
    if stages and kind is not JobAction.RETRY:
        raise InvalidJob("only a retry job names stages")
    try:
        named = [validate_stage_name(s) for s in dict.fromkeys(stages)]
        unique = [validate_id(op_id) for op_id in dict.fromkeys(targets)]
    except InvalidKey as exc:
        raise InvalidJob(str(exc)) from exc
    if not unique:
        raise InvalidJob(f"the filter {filter[:200]!r} matches no operation: nothing to {kind.value}")
    if len(unique) > max_operations:
        raise InvalidJob(
            f"the filter matches {len(unique)} operations, more than the limit of {max_operations} per job: "
            "narrow it (by pipeline, status, created_before, ...) and run several jobs"
        )
    return Job(
        schema=JOB_SCHEMA,
        id=job_id,
        action=kind,
        state=JobState.PENDING,
        filter=filter,
        reason=reason,
        by=by,
        stages=named,
        created_at=now,
        updated_at=now,
        targets=unique,
        counts=JobCounts(matched=len(unique)),
        rate=rate,
        lease_seconds=lease_seconds,
    )


def holds_lease(job: Job, owner: str) -> bool:
    """True while the lease on ``job`` is ``owner``'s: nobody took the job over since ``owner`` acquired it.

    An expired lease still nobody else took is still ``owner``'s (renewing it is safe: a
    takeover would have changed the record, and every write is revision-checked).
    """
    return job.lease is not None and job.lease.owner == owner


def resumable(job: Job, now: datetime) -> bool:
    """True when a runner may take the job now: not finished, and nobody's lease holds."""
    return not job.done and (job.lease is None or job.lease.until <= now)


def acquire(job: Job, owner: str, now: datetime) -> Job:
    """``job`` run by ``owner`` from now: JobFinished once it ended, JobBusy while another lease holds."""
    if job.done:
        raise JobFinished(job.id, job.state.value)
    if job.lease is not None and job.lease.owner != owner and job.lease.until > now:
        raise JobBusy(job.id, job.lease.owner, job.lease.until.isoformat())
    return _replace(
        job,
        state=JobState.RUNNING,
        lease=_lease(job, owner, now),
        started_at=job.started_at or now,
        updated_at=now,
    )


def renew(job: Job, owner: str, now: datetime) -> Job:
    """``owner``'s lease extended; JobBusy when ``owner`` no longer holds it (another runner took over)."""
    _check_owner(job, owner, now)
    return _replace(job, lease=_lease(job, owner, now), updated_at=now)


def next_target(job: Job) -> str | None:
    """The operation the next step changes (None when every target was gone through)."""
    return job.targets[job.cursor] if job.cursor < len(job.targets) else None


def record(job: Job, op_id: str, result: StepResult, message: str | None, owner: str, now: datetime) -> Job:
    """``job`` after the step that gave ``result`` for ``op_id``: the cursor past it, counted, the lease renewed.

    Also on a job cancelled while the step ran (its count stays true). JobBusy when
    ``owner`` lost the lease; ValueError for an operation that is not the next target.
    """
    _check_owner(job, owner, now)
    if next_target(job) != op_id:
        raise ValueError(f"{op_id!r} is not the next target of job {job.id!r}")
    counts = job.counts
    if result is StepResult.APPLIED:
        counts = _replace(counts, applied=counts.applied + 1)
    elif result is StepResult.SKIPPED:
        counts = _replace(counts, skipped=counts.skipped + 1)
    else:
        counts = _replace(counts, failed=counts.failed + 1)
    problems = job.problems
    if result is not StepResult.APPLIED:
        problems = [*problems, JobProblem(op_id=op_id, result=result.value, message=(message or "")[:300])]
        problems = problems[-PROBLEM_LIMIT:]
    lease = job.lease if job.done else _lease(job, owner, now)
    return _replace(job, cursor=job.cursor + 1, counts=counts, problems=problems, lease=lease, updated_at=now)


def finish(job: Job, owner: str, now: datetime) -> Job:
    """The end of a job gone through every target: done, or failed when some operation could not be changed."""
    _check_owner(job, owner, now)
    if job.done:
        return release(job, owner, now)
    if next_target(job) is not None:
        raise ValueError(f"job {job.id!r} has {job.remaining} targets left")
    state = JobState.FAILED if job.counts.failed else JobState.DONE
    return _replace(job, state=state, lease=None, finished_at=now, updated_at=now)


def pause(job: Job, owner: str, now: datetime) -> Job:
    """``job`` left by its runner before the end (a shutdown): paused, its lease given up, resumable."""
    if job.done:
        return release(job, owner, now)
    _check_owner(job, owner, now)
    return _replace(job, state=JobState.PAUSED, lease=None, updated_at=now)


def release(job: Job, owner: str, now: datetime) -> Job:
    """``job`` without ``owner``'s lease (the same job when ``owner`` does not hold it)."""
    if job.lease is None or job.lease.owner != owner:
        return job
    return _replace(job, lease=None, updated_at=now)


def cancel_job(job: Job, now: datetime, *, by: str | None = None, reason: str | None = None) -> Job:
    """``job`` cancelled: its runner stops before the next operation. JobFinished once it ended."""
    if job.done:
        raise JobFinished(job.id, job.state.value)
    return _replace(
        job,
        state=JobState.CANCELLED,
        cancel=CancelInfo(at=now, reason=reason, by=by),
        finished_at=now,
        updated_at=now,
    )


def _lease(job: Job, owner: str, now: datetime) -> JobLease:
    return JobLease(owner=owner, until=now + timedelta(seconds=job.lease_seconds))


def _check_owner(job: Job, owner: str, now: datetime) -> None:
    if not holds_lease(job, owner):
        holder = job.lease.owner if job.lease is not None else "nobody"
        until = job.lease.until.isoformat() if job.lease is not None else now.isoformat()
        raise JobBusy(job.id, holder, until)
