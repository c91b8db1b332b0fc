"""Facts derived from an operation value: pure functions, one rule each, used everywhere.

The archiver's rows, the dashboard's index, pages and JSON API, and the CLI all ask these
functions instead of working the answer out again, so that the archive and the dashboard
can never name different stages for the same operation (docs/state-model.md#derived).

- ``failed_stage``: the stage whose failure failed the operation;
- ``failure_message``: the one-line reason a failed or cancelled operation ended;
- ``stuck_checks`` / ``stuck_stages``: when a running stage counts as stuck, and why;
- ``attempts``: every attempt of a stage with its start, end and outcome, from the history.
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
    """For each running stage, the moment it becomes stuck if nothing changes, in pipeline order.

    A stage is stuck once it runs past its ``deadline`` or goes ``heartbeat_timeout``
    seconds without a heartbeat (its start counts as the first), whichever comes first.
    A finished operation has nothing in flight, so nothing to check.
    """
    if op.status.terminal:
        return []
    checks: list[StuckCheck] = []
    heartbeat_timeout = timedelta(seconds=pipeline.heartbeat_timeout)
    for spec in pipeline.stages:
        state = op.stages.get(spec.name)
        if state is None or state.status is not StageStatus.RUNNING or state.started_at is None:
            continue
        due, kind = (state.heartbeat_at or state.started_at) + heartbeat_timeout, StuckKind.HEARTBEAT
        if spec.deadline is not None:
            deadline = state.started_at + timedelta(seconds=spec.deadline)
            if deadline < due:
                due, kind = deadline, StuckKind.DEADLINE
        checks.append(StuckCheck(spec.name, kind, due))
    return checks


def stuck_reason(pipeline: Pipeline, stage: str, kind: StuckKind) -> str:
    """The words for ``stage`` of ``pipeline`` being stuck for ``kind``."""
    if kind is StuckKind.DEADLINE:
        return f"running past its {pipeline.stage(stage).deadline or 0:g}s deadline"
    return f"no heartbeat for over {pipeline.heartbeat_timeout:g}s"


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
