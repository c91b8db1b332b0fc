"""Properties of the derived rules (kvstate.derive) over any event stream the state machine accepts."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstate import (
    InvalidMetadata,
    InvalidTransition,
    Operation,
    OpStatus,
    StageStatus,
    UnknownStage,
    apply_event,
    attempts,
    failed_stage,
    failure_message,
    stuck_checks,
    stuck_stages,
)
from kvstate.events import Event
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
