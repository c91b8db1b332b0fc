"""Properties of the derived rules (kvstate.derive) over any event stream the state machine accepts."""

from __future__ import annotations

from datetime import timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstate import (
    InvalidMetadata,
    InvalidTransition,
    Operation,
    OpStatus,
    Pipeline,
    StageStatus,
    StuckKind,
    UnknownStage,
    apply_event,
    attempts,
    failed_stage,
    failure_message,
    new_operation,
    queued_stages,
    ready_stages,
    sla_breached,
    sla_due,
    stuck_checks,
    stuck_reason,
    stuck_stages,
)
from kvstate.events import Event, StartStage, SucceedStage
from tests.conftest import PIPELINE
from tests.test_machine import T0, events, fresh


def play(stream: list[Event]) -> Operation:
    op = fresh()
    for i, event in enumerate(stream, start=1):
        try:
            op = apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i)).operation
        except (InvalidTransition, UnknownStage, InvalidMetadata):
            continue
    return op


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_the_failed_stage_is_a_required_stage_that_failed_for_good(stream: list[Event]) -> None:
    op = play(stream)
    stage = failed_stage(op)
    if op.status is not OpStatus.FAILED:
        assert stage is None
        assert (failure_message(op) is None) == (op.status is not OpStatus.CANCELLED)
        return
    assert stage is not None and op.stage(stage).status is StageStatus.FAILED
    holds_the_ending = any(t.stage is None and t.to == "failed" for t in op.history)
    if holds_the_ending:
        assert not PIPELINE.stage(stage).optional  # an optional failure never fails the operation
    message = failure_message(op)
    assert message is not None and message.startswith(f"stage {stage} failed")


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_attempts_are_ordered_and_the_latest_matches_the_stage(stream: list[Event]) -> None:
    op = play(stream)
    for name in PIPELINE.stage_names:
        found = attempts(op, name)
        numbers = [a.number for a in found]
        assert numbers == sorted(set(numbers))
        for attempt in found:
            assert attempt.finished_at is None or attempt.finished_at >= attempt.started_at
        assert all(a.status is not StageStatus.RUNNING for a in found[:-1])  # only the latest can still run
        state = op.stage(name)
        if state.status is StageStatus.RUNNING:
            assert found and found[-1].number == state.attempt and found[-1].status is StageStatus.RUNNING


@settings(max_examples=300)
@given(st.lists(events, max_size=40), st.integers(min_value=0, max_value=120))
def test_stuck_checks_cover_exactly_the_running_stages(stream: list[Event], later: int) -> None:
    op = play(stream)
    checks = stuck_checks(op, PIPELINE)
    running = [n for n in PIPELINE.stage_names if op.stage(n).status is StageStatus.RUNNING]
    if op.status.terminal:
        assert checks == []
        return
    assert [c.stage for c in checks] == running
    for check in checks:
        started = op.stage(check.stage).started_at
        assert started is not None and check.due > started
    now = T0 + timedelta(seconds=len(stream) + later)
    stuck = stuck_stages(op, PIPELINE, now)
    assert [s.stage for s in stuck] == [c.stage for c in checks if c.due < now]
    assert all(s.reason for s in stuck)


TIMED = msgspec.structs.replace(PIPELINE, retry_after=10.0, idle_after=5.0, sla=60.0)
"""The test pipeline with retry and idle limits and an SLA."""


def play_on(pipeline: Pipeline, stream: list[Event]) -> Operation:
    op = new_operation("op1", pipeline, T0, {}, "create-1")
    for i, event in enumerate(stream, start=1):
        try:
            op = apply_event(op, pipeline, event, T0 + timedelta(seconds=i)).operation
        except (InvalidTransition, UnknownStage, InvalidMetadata):
            continue
    return op


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_retrying_and_ready_stages_are_checked_too_when_the_pipeline_sets_limits(stream: list[Event]) -> None:
    op = play_on(TIMED, stream)
    checks = {c.stage: c for c in stuck_checks(op, TIMED)}
    if op.status.terminal:
        assert checks == {} and queued_stages(op, TIMED) == []
        return
    queued = dict(queued_stages(op, TIMED))
    assert set(queued) == set(ready_stages(op, TIMED))  # the same rule as the state machine's
    for name in TIMED.stage_names:
        state = op.stage(name)
        if state.status is StageStatus.RUNNING:
            assert checks[name].kind in (StuckKind.DEADLINE, StuckKind.HEARTBEAT)
        elif state.status is StageStatus.RETRYING:
            assert checks[name].kind is StuckKind.RETRY
            assert state.finished_at is not None and checks[name].due == state.finished_at + timedelta(seconds=10)
        elif name in queued:
            assert checks[name].kind is StuckKind.IDLE and checks[name].due == queued[name] + timedelta(seconds=5)
            assert queued[name] >= op.created_at
        else:
            assert name not in checks
    for check in checks.values():
        assert stuck_reason(TIMED, check.stage, check.kind)


def test_an_sla_is_breached_past_its_due_time_finished_or_not() -> None:
    op = play_on(TIMED, [])
    assert sla_due(op, TIMED) == T0 + timedelta(seconds=60)
    assert not sla_breached(op, TIMED, T0 + timedelta(seconds=59))
    assert sla_breached(op, TIMED, T0 + timedelta(seconds=61))
    assert sla_due(op, PIPELINE) is None and not sla_breached(op, PIPELINE, T0 + timedelta(days=9))


def test_a_ready_stage_waits_since_its_last_dependency_finished() -> None:
    op = play_on(
        TIMED,
        [
            StartStage(stage="ingest"),
            SucceedStage(stage="ingest"),
            StartStage(stage="validate"),
            SucceedStage(stage="validate"),
        ],
    )
    validate_done = op.stage("validate").finished_at
    assert validate_done is not None
    assert queued_stages(op, TIMED) == [("geo", validate_done), ("fraud", validate_done), ("profile", validate_done)]
    (idle,) = [s for s in stuck_stages(op, TIMED, validate_done + timedelta(seconds=6)) if s.stage == "geo"]
    assert idle.kind is StuckKind.IDLE and idle.reason == "ready, not started for over 5s"
