"""Facts derived from an operation value: pure functions, one rule each, used everywhere.

The archiver's rows, the dashboard's index, pages and JSON API, and the CLI all ask these
functions instead of working the answer out again, so that the archive and the dashboard
can never name different stages for the same operation (docs/state-model.md#derived).

- ``failed_stage``: the stage whose failure failed the operation;
- ``failure_message``: the one-line reason a failed or cancelled operation ended;
- ``stuck_checks`` / ``stuck_stages``: when a stage counts as stuck, and why: running past
  its deadline or heartbeat, retrying with no new attempt past ``retry_after``, ready but not
  started past ``idle_after``;
- ``queued_stages`` / ``ready_since``: where an input waits between stages, and since when;
- ``sla_due`` / ``sla_breached``: an operation past its pipeline's ``sla``;
- ``attempts``: every attempt of a stage with its start, end and outcome, from the history;
- ``retry_stages``: the stages a retry runs again when none are named.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from kvstate.model import Operation, OpStatus, StageStatus
from kvstate.pipeline import Pipeline

__all__ = [
    "TERMINAL_STATUSES",
    "Attempt",
    "StuckCheck",
    "StuckKind",
    "StuckStage",
    "attempts",
    "failed_stage",
    "failure_message",
    "queued_stages",
    "ready_since",
    "retry_stages",
    "sla_breached",
    "sla_due",
    "stuck_checks",
    "stuck_reason",
    "stuck_stages",
]

TERMINAL_STATUSES: frozenset[OpStatus] = frozenset(s for s in OpStatus if s.terminal)
"""The operation statuses that end it: succeeded, failed, cancelled."""

_MESSAGE_LIMIT = 200


def failed_stage(op: Operation) -> str | None:
    """The stage whose failure failed the operation (None unless it failed).

    That is the stage that failed in the same event as the operation: an optional stage
    that failed earlier did not fail it. When the bounded history no longer holds that
    event, the first required-looking failure stands in: the first stage in the value's
    (pipeline) order that failed for good.
    """
    if op.status is not OpStatus.FAILED:
        return None
    ending = next((t.event for t in reversed(op.history) if t.stage is None and t.to == OpStatus.FAILED.value), None)
    if ending is not None:
        for t in op.history:
            if t.stage is not None and t.event == ending and t.to == StageStatus.FAILED.value:
                return t.stage
    for name, state in op.stages.items():
        if state.status is StageStatus.FAILED:
            return name
    return None


def retry_stages(op: Operation, pipeline: Pipeline) -> tuple[str, ...]:
    """The stages a retry of ``op`` runs again when none are named, in pipeline order.

    A failed operation: its failed stage (``failed_stage``), with any other required stage
    that failed for good (reopening fewer would leave it failed). A cancelled one: the
    stages the cancel cut off (running or waiting for a retry then). Nothing otherwise:
    a succeeded operation, or one not finished, has no failure to retry. Reopening a stage
    also puts every stage after it back to waiting (``kvstate.machine``).
    """
    if op.status is OpStatus.FAILED:
        first = failed_stage(op)
        required = [
            spec.name
            for spec in pipeline.stages
            if not spec.optional and op.stage(spec.name).status is StageStatus.FAILED
        ]
        named = set(required) | ({first} if first is not None else set())
        ordered = [name for name in pipeline.stage_names if name in named]
        return tuple(ordered + sorted(named - set(ordered)))  # a stage the pipeline lost: still named
    if op.status is OpStatus.CANCELLED:
        return tuple(spec.name for spec in pipeline.stages if op.stage(spec.name).status is StageStatus.CANCELLED)
    return ()


def failure_message(op: Operation) -> str | None:
    """Why a failed or cancelled operation ended, in one line (None while it has not).

    ``stage geo failed: timeout`` for a failure (the stage of ``failed_stage``),
    ``cancelled: <reason>`` for a cancellation.
    """
    if op.status is OpStatus.CANCELLED:
        reason = op.cancel.reason if op.cancel is not None else None
        return f"cancelled: {reason}" if reason else "cancelled"
    if op.status is not OpStatus.FAILED:
        return None
    stage = failed_stage(op)
    if stage is None:
        return "failed"
    error = op.stage(stage).error
    return f"stage {stage} failed: {error.message[:_MESSAGE_LIMIT]}" if error is not None else f"stage {stage} failed"


class StuckKind(StrEnum):
    """Why a stage counts as stuck."""

    DEADLINE = "deadline"
    """running longer than its stage's ``deadline``"""
    HEARTBEAT = "heartbeat"
    """running without a heartbeat for longer than the pipeline's ``heartbeat_timeout``"""
    RETRY = "retry"
    """failed with a retry left, and no new attempt began within ``retry_after``"""
    IDLE = "idle"
    """ready (its dependencies done) and not started within ``idle_after``"""


@dataclass(frozen=True, slots=True)
class StuckCheck:
    """When a running stage becomes stuck unless the operation changes first, and why."""

    stage: str
    kind: StuckKind
    due: datetime


@dataclass(frozen=True, slots=True)
class StuckStage:
    """A stage that is stuck now: since when, why, in words."""

    stage: str
    kind: StuckKind
    since: datetime
    reason: str


def stuck_checks(op: Operation, pipeline: Pipeline) -> list[StuckCheck]:
    """For each stage that can become stuck, the moment it does if nothing changes, in pipeline order.

    A running stage is stuck once it runs past its ``deadline`` or goes ``heartbeat_timeout``
    seconds without a heartbeat (its start counts as the first), whichever comes first. A
    retrying stage is stuck ``retry_after`` seconds after its failed attempt ended; a ready
    stage ``idle_after`` seconds after it became ready (the stage's value, else the
    pipeline's; unset: never). A finished operation has nothing in flight, so nothing to check.
    """
    if op.status.terminal:
        return []
    checks: list[StuckCheck] = []
    heartbeat_timeout = timedelta(seconds=pipeline.heartbeat_timeout)
    for spec in pipeline.stages:
        state = op.stage(spec.name)
        if state.status is StageStatus.RUNNING and state.started_at is not None:
            due, kind = (state.heartbeat_at or state.started_at) + heartbeat_timeout, StuckKind.HEARTBEAT
            if spec.deadline is not None:
                deadline = state.started_at + timedelta(seconds=spec.deadline)
                if deadline < due:
                    due, kind = deadline, StuckKind.DEADLINE
            checks.append(StuckCheck(spec.name, kind, due))
        elif state.status is StageStatus.RETRYING:
            retry_after = _first(spec.retry_after, pipeline.retry_after)
            failed_at = state.finished_at or state.started_at
            if retry_after is not None and failed_at is not None:
                checks.append(StuckCheck(spec.name, StuckKind.RETRY, failed_at + timedelta(seconds=retry_after)))
        elif state.status is StageStatus.WAITING:
            idle_after = _first(spec.idle_after, pipeline.idle_after)
            since = ready_since(op, pipeline, spec.name) if idle_after is not None else None
            if idle_after is not None and since is not None:
                checks.append(StuckCheck(spec.name, StuckKind.IDLE, since + timedelta(seconds=idle_after)))
    return checks


def stuck_reason(pipeline: Pipeline, stage: str, kind: StuckKind) -> str:
    """The words for ``stage`` of ``pipeline`` being stuck for ``kind``."""
    spec = pipeline.stage(stage)
    if kind is StuckKind.DEADLINE:
        return f"running past its {spec.deadline or 0:g}s deadline"
    if kind is StuckKind.RETRY:
        return f"retrying, no new attempt for over {_first(spec.retry_after, pipeline.retry_after) or 0:g}s"
    if kind is StuckKind.IDLE:
        return f"ready, not started for over {_first(spec.idle_after, pipeline.idle_after) or 0:g}s"
    return f"no heartbeat for over {pipeline.heartbeat_timeout:g}s"


def ready_since(op: Operation, pipeline: Pipeline, stage: str) -> datetime | None:
    """When a waiting ``stage`` became ready to start (its last dependency finished; the
    operation's creation when it has none), or None while it is not ready or not waiting."""
    if op.status.terminal or op.stage(stage).status is not StageStatus.WAITING:
        return None
    since = op.created_at
    for dep in pipeline.stage(stage).after:
        state = op.stage(dep)
        done = state.status is StageStatus.SUCCEEDED or (state.status.terminal and pipeline.stage(dep).optional)
        if not done:
            return None
        since = max(since, state.finished_at or state.started_at or op.created_at)
    return since


def queued_stages(op: Operation, pipeline: Pipeline) -> list[tuple[str, datetime]]:
    """Where the input waits between stages: each ready, unstarted stage with the time it became ready."""
    found = []
    for spec in pipeline.stages:
        since = ready_since(op, pipeline, spec.name)
        if since is not None:
            found.append((spec.name, since))
    return found


def sla_due(op: Operation, pipeline: Pipeline) -> datetime | None:
    """When the operation should have finished by (creation + the pipeline's ``sla``), or None without one."""
    return None if pipeline.sla is None else op.created_at + timedelta(seconds=pipeline.sla)


def sla_breached(op: Operation, pipeline: Pipeline, now: datetime) -> bool:
    """True when the operation finished after its SLA, or is still unfinished past it."""
    due = sla_due(op, pipeline)
    return due is not None and (op.finished_at or now) > due


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def stuck_stages(op: Operation, pipeline: Pipeline, now: datetime) -> list[StuckStage]:
    """The stages of ``op`` stuck at ``now`` (see ``stuck_checks``), in pipeline order."""
    return [
        StuckStage(check.stage, check.kind, check.due, stuck_reason(pipeline, check.stage, check.kind))
        for check in stuck_checks(op, pipeline)
        if check.due < now
    ]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one stage: when it started and ended, and how it ended.

    ``status`` is ``running`` while it runs; ``retrying`` for an attempt that failed and
    left a retry to come (also when the operation ended before that retry); otherwise the
    stage status it ended in.
    """

    number: int
    started_at: datetime
    finished_at: datetime | None
    status: StageStatus


def attempts(op: Operation, stage: str) -> list[Attempt]:
    """Every attempt of ``stage`` still known, oldest first.

    Rebuilt from the transition history (bounded: the oldest transitions may be gone),
    with the stage's own state as the truth about its latest attempt.
    """
    found: dict[int, Attempt] = {}
    current: int | None = None
    for tr in op.history:
        if tr.stage != stage:
            continue
        if tr.to == StageStatus.RUNNING.value:
            current = tr.attempt or (max(found) + 1 if found else 1)
            found[current] = Attempt(current, tr.at, None, StageStatus.RUNNING)
        elif current is not None and current in found and found[current].finished_at is None:
            found[current] = replace(found[current], finished_at=tr.at, status=_stage_status(tr.to))
    state = op.stage(stage)
    if state.started_at is not None and state.attempt and state.attempt not in found:
        found[state.attempt] = Attempt(state.attempt, state.started_at, state.finished_at, state.status)
    latest = found.get(state.attempt)
    if latest is not None:
        # An attempt that failed with a retry left, cut off when the operation ended, stays retrying.
        cut_off_retry = state.status is StageStatus.CANCELLED and latest.status is StageStatus.RETRYING
        status = latest.status if state.status is StageStatus.WAITING or cut_off_retry else state.status
        found[state.attempt] = replace(latest, finished_at=state.finished_at or latest.finished_at, status=status)
    return [found[number] for number in sorted(found)]


def _stage_status(value: str) -> StageStatus:
    try:
        return StageStatus(value)
    except ValueError:  # a newer writer's status: show the attempt as ended, not running
        return StageStatus.FAILED
