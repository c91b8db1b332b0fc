"""The state machine: examples of each rule, and properties over random event streams."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstate import (
    Cancel,
    FailStage,
    Heartbeat,
    InvalidMetadata,
    InvalidTransition,
    MergeMetadata,
    Operation,
    OpStatus,
    Outcome,
    Reopen,
    SkipStage,
    StageStatus,
    StartStage,
    StuckKind,
    SucceedStage,
    UnknownStage,
    apply_event,
    derive_status,
    new_operation,
    ready_stages,
    stuck_stages,
)
from kvstate.codec import decode_operation, encode_operation
from kvstate.errors import StaleUpdate
from kvstate.events import Event
from kvstate.machine import Decision
from kvstate.model import ACTION_LIMIT, EVENT_WINDOW, HISTORY_LIMIT, UpdateResult
from tests.conftest import PIPELINE

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fresh() -> Operation:
    return new_operation("op1", PIPELINE, T0, {"input": 1}, "create-1")


def run(op: Operation, *events: Event) -> tuple[Operation, list[Decision]]:
    decisions = []
    for i, event in enumerate(events, start=1):
        decision = apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i))
        decisions.append(decision)
        op = decision.operation
    return op, decisions


def happy_path() -> list[Event]:
    events: list[Event] = []
    for stage in ("ingest", "validate", "geo", "fraud", "profile", "merge", "notify"):
        events += [StartStage(stage=stage, event_id=f"s-{stage}"), SucceedStage(stage=stage, event_id=f"ok-{stage}")]
    return events


def test_new_operation_is_pending_with_every_stage_waiting() -> None:
    op = fresh()
    assert op.status is OpStatus.PENDING
    assert set(op.stages) == set(PIPELINE.stage_names)
    assert all(s.status is StageStatus.WAITING for s in op.stages.values())
    assert ready_stages(op, PIPELINE) == ["ingest"]


def test_happy_path_succeeds_and_records_history() -> None:
    op, decisions = run(fresh(), *happy_path())
    assert all(d.outcome is Outcome.APPLIED for d in decisions)
    assert op.status is OpStatus.SUCCEEDED
    assert op.finished_at is not None
    assert [h.to for h in op.history if h.stage is None] == ["pending", "running", "succeeded"]


def test_parallel_stages_run_at_once_and_merge_waits_for_all() -> None:
    op, _ = run(
        fresh(),
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest"),
        StartStage(stage="validate"),
        SucceedStage(stage="validate"),
    )
    assert set(ready_stages(op, PIPELINE)) == {"geo", "fraud", "profile"}
    op, _ = run(op, StartStage(stage="geo"), StartStage(stage="fraud"), StartStage(stage="profile"))
    assert set(op.active_stages) == {"geo", "fraud", "profile"}
    op, _ = run(op, SucceedStage(stage="geo"), SucceedStage(stage="fraud"))
    with pytest.raises(InvalidTransition, match="profile"):
        run(op, StartStage(stage="merge"))
    op, _ = run(op, FailStage(stage="profile", error="down", retryable=False))
    assert op.status is OpStatus.RUNNING  # an optional stage failing does not fail the operation
    op, (d,) = run(op, StartStage(stage="merge"))
    assert d.outcome is Outcome.APPLIED


def test_late_started_after_succeeded_is_stale() -> None:
    op, _ = run(fresh(), StartStage(stage="ingest", event_id="a"), SucceedStage(stage="ingest", event_id="b"))
    op2, (d,) = run(op, StartStage(stage="ingest", event_id="c"))
    assert d.outcome is Outcome.STALE
    assert op2 is op


def test_same_event_twice_is_a_duplicate() -> None:
    op, _ = run(fresh(), StartStage(stage="ingest", event_id="a"))
    op2, (d,) = run(op, StartStage(stage="ingest", event_id="a"))
    assert d.outcome is Outcome.DUPLICATE
    assert op2 is op


def test_older_attempt_after_newer_is_stale() -> None:
    op, _ = run(
        fresh(),
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest"),
        StartStage(stage="validate", attempt=1),
        FailStage(stage="validate", error="x", attempt=1),
        StartStage(stage="validate", attempt=2),
    )
    _, (late_fail,) = run(op, FailStage(stage="validate", error="late", attempt=1))
    assert late_fail.outcome is Outcome.STALE
    _, (late_start,) = run(op, StartStage(stage="validate", attempt=1))
    assert late_start.outcome is Outcome.STALE


def test_retryable_failure_retries_until_attempts_run_out() -> None:
    op, _ = run(fresh(), StartStage(stage="ingest"), SucceedStage(stage="ingest"))
    for attempt in (1, 2):
        op, _ = run(op, StartStage(stage="validate"), FailStage(stage="validate", error=f"e{attempt}"))
        assert op.stage("validate").status is StageStatus.RETRYING
        assert op.status is OpStatus.RUNNING
    op, _ = run(op, StartStage(stage="validate"), FailStage(stage="validate", error="e3"))
    assert op.stage("validate").status is StageStatus.FAILED
    assert op.stage("validate").attempt == 3
    assert op.status is OpStatus.FAILED
    with pytest.raises(InvalidTransition, match="max_attempts"):
        run(fresh(), StartStage(stage="ingest", attempt=4))


def test_non_retryable_failure_fails_the_operation_at_once() -> None:
    op, _ = run(fresh(), StartStage(stage="ingest"), FailStage(stage="ingest", error="poison", retryable=False))
    assert op.status is OpStatus.FAILED
    assert op.stage("ingest").error is not None
    assert op.stage("ingest").error.message == "poison"


def test_anything_after_a_terminal_status_is_stale() -> None:
    op, _ = run(fresh(), Cancel(reason="user"))
    assert op.status is OpStatus.CANCELLED
    for event in (StartStage(stage="ingest"), MergeMetadata(patch={"a": 1}), Cancel(), Heartbeat(stage="ingest")):
        _, (d,) = run(op, event)
        assert d.outcome is Outcome.STALE


def _enrichers_in_flight() -> list[Event]:
    """ingest and validate done; geo running, fraud waiting for its retry."""
    return [
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest"),
        StartStage(stage="validate"),
        SucceedStage(stage="validate"),
        StartStage(stage="geo", worker="geo-1"),
        StartStage(stage="fraud", worker="fraud-1"),
        FailStage(stage="fraud", error="timeout", retryable=True),
    ]


def test_a_failing_stage_cancels_the_stages_still_in_flight() -> None:
    op, _ = run(
        fresh(),
        *_enrichers_in_flight(),
        StartStage(stage="profile"),
        FailStage(stage="profile", error="down", retryable=False),
    )
    assert op.status is OpStatus.RUNNING  # an optional stage failing ends nothing
    op, _ = run(op, FailStage(stage="geo", error="poison", retryable=False, event_id="geo-poison"))
    assert op.status is OpStatus.FAILED
    geo, fraud = op.stage("geo"), op.stage("fraud")
    assert geo.status is StageStatus.FAILED
    assert op.stage("profile").status is StageStatus.FAILED  # finished before: left as it was
    assert fraud.status is StageStatus.CANCELLED
    assert fraud.error is not None and fraud.error.message == "timeout"  # its last failure is kept
    assert op.active_stages == []
    closing = [h for h in op.history if h.event == "geo-poison"]
    assert [(h.stage, h.from_, h.to) for h in closing] == [
        ("geo", "running", "failed"),
        ("fraud", "retrying", "cancelled"),
        (None, "running", "failed"),
    ]
    assert derive_status(op, PIPELINE) is OpStatus.FAILED


def test_a_running_attempt_cut_off_by_the_failure_is_closed_and_its_late_report_is_stale() -> None:
    events = [*_enrichers_in_flight(), StartStage(stage="fraud", attempt=2, worker="fraud-2")]
    op, _ = run(fresh(), *events, FailStage(stage="geo", error="poison", retryable=False))
    fraud = op.stage("fraud")
    assert fraud.status is StageStatus.CANCELLED
    assert (fraud.attempt, fraud.worker, fraud.finished_at) == (2, "fraud-2", op.finished_at)
    for late in (SucceedStage(stage="fraud", attempt=2), Heartbeat(stage="fraud", attempt=2)):
        _, (d,) = run(op, late)
        assert d.outcome is Outcome.STALE


def test_cancel_closes_running_stages() -> None:
    op, _ = run(fresh(), StartStage(stage="ingest", worker="w"), Cancel(reason="user", event_id="stop"))
    assert op.status is OpStatus.CANCELLED
    assert op.stage("ingest").status is StageStatus.CANCELLED
    assert [(h.stage, h.to) for h in op.history if h.event == "stop"] == [(None, "cancelled"), ("ingest", "cancelled")]


def test_reopen_after_a_failure_runs_the_cancelled_stages_again() -> None:
    op, _ = run(fresh(), *_enrichers_in_flight(), FailStage(stage="geo", error="poison", retryable=False))
    op, (d,) = run(op, Reopen(stages=("geo",)))
    assert d.outcome is Outcome.APPLIED
    assert op.status is OpStatus.RUNNING
    assert op.finished_at is None
    assert op.stage("geo").status is StageStatus.WAITING
    assert op.stage("fraud").status is StageStatus.WAITING
    assert op.stage("fraud").attempt == 0
    assert set(ready_stages(op, PIPELINE)) == {"geo", "fraud", "profile"}


def test_reopen_that_leaves_the_failure_in_place_is_refused() -> None:
    op, _ = run(fresh(), *_enrichers_in_flight(), FailStage(stage="geo", error="poison", retryable=False))
    with pytest.raises(InvalidTransition, match="reopen geo as well"):
        run(op, Reopen(stages=("fraud",)))


def test_reopen_puts_stages_and_their_dependents_back() -> None:
    op, _ = run(fresh(), *happy_path())
    op, (d,) = run(op, Reopen(stages=("merge",)))
    assert d.outcome is Outcome.APPLIED
    assert op.status is OpStatus.RUNNING
    assert op.stage("merge").status is StageStatus.WAITING
    assert op.stage("notify").status is StageStatus.WAITING
    assert op.stage("geo").status is StageStatus.SUCCEEDED
    assert op.finished_at is None


def test_skip_only_optional_stages() -> None:
    with pytest.raises(InvalidTransition, match="optional"):
        run(fresh(), SkipStage(stage="ingest"))
    op, _ = run(
        fresh(),
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest"),
        StartStage(stage="validate"),
        SucceedStage(stage="validate"),
        SkipStage(stage="profile", reason="no customer"),
    )
    assert op.stage("profile").status is StageStatus.SKIPPED


def test_unknown_stage_is_a_typed_error() -> None:
    with pytest.raises(UnknownStage, match="nope"):
        run(fresh(), StartStage(stage="nope"))


def test_stage_metadata_lives_in_its_own_namespace() -> None:
    op, _ = run(
        fresh(),
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest", metadata={"bytes": 10}),
        MergeMetadata(patch={"bytes": "shared"}),
        MergeMetadata(patch={"extra": True}, stage="ingest"),
    )
    assert op.metadata == {"input": 1, "bytes": "shared"}
    assert op.stage("ingest").metadata == {"bytes": 10, "extra": True}


def test_every_stage_event_can_carry_stage_metadata() -> None:
    op, _ = run(
        fresh(),
        StartStage(stage="ingest", metadata={"host": "a", "try": 1}),
        FailStage(stage="ingest", error="timeout", metadata={"try": None, "timeouts": 1}),
        StartStage(stage="ingest", metadata={"host": "b"}),
        SucceedStage(stage="ingest", metadata={"bytes": 10}),
        StartStage(stage="validate"),
        SucceedStage(stage="validate"),
        SkipStage(stage="profile", reason="no customer", metadata={"why": "anonymous"}),
    )
    assert op.stage("ingest").metadata == {"host": "b", "timeouts": 1, "bytes": 10}
    assert op.stage("profile").metadata == {"why": "anonymous"}
    assert op.stage("profile").status is StageStatus.SKIPPED


def test_metadata_patch_must_be_an_object() -> None:
    with pytest.raises(InvalidMetadata):
        run(fresh(), MergeMetadata(patch=["not", "an", "object"]))  # type: ignore[arg-type]


def test_stuck_stages_past_deadline_or_heartbeat() -> None:
    op, _ = run(
        fresh(), *happy_path()[:12], StartStage(stage="merge"), SucceedStage(stage="merge"), StartStage(stage="notify")
    )
    started = op.stage("notify").started_at
    assert started is not None
    assert stuck_stages(op, PIPELINE, started + timedelta(seconds=1)) == []
    (late,) = stuck_stages(op, PIPELINE, started + timedelta(seconds=6))
    assert (late.stage, late.kind, late.since) == ("notify", StuckKind.DEADLINE, started + timedelta(seconds=5))
    assert late.reason == "running past its 5s deadline"
    op2, _ = run(fresh(), StartStage(stage="ingest"))
    beat = op2.stage("ingest").heartbeat_at
    assert beat is not None
    (silent,) = stuck_stages(op2, PIPELINE, beat + timedelta(seconds=31))
    assert (silent.stage, silent.kind) == ("ingest", StuckKind.HEARTBEAT)
    assert silent.reason == "no heartbeat for over 30s"


def test_raise_for_stale_raises_the_typed_error() -> None:
    op, (d,) = run(fresh(), Cancel())
    _, (stale,) = run(op, Cancel())
    with pytest.raises(StaleUpdate):
        UpdateResult(stale.outcome, stale.operation, stale.reason).raise_for_stale()
    assert UpdateResult(d.outcome, d.operation).raise_for_stale().applied


# ---------------------------------------------------------------- properties

stage_names = st.sampled_from([*PIPELINE.stage_names])
attempts = st.none() | st.integers(min_value=1, max_value=4)
event_ids = st.sampled_from([f"e{i}" for i in range(12)])
events = st.one_of(
    st.builds(StartStage, stage=stage_names, attempt=attempts, event_id=event_ids),
    st.builds(Heartbeat, stage=stage_names, attempt=attempts, event_id=event_ids),
    st.builds(
        SucceedStage,
        stage=stage_names,
        attempt=attempts,
        event_id=event_ids,
        metadata=st.none() | st.dictionaries(st.sampled_from("abc"), st.integers(), max_size=2),
    ),
    st.builds(
        FailStage,
        stage=stage_names,
        attempt=attempts,
        event_id=event_ids,
        error=st.just("boom"),
        retryable=st.booleans(),
    ),
    st.builds(SkipStage, stage=stage_names, event_id=event_ids),
    st.builds(
        MergeMetadata,
        patch=st.dictionaries(st.sampled_from("xyz"), st.integers() | st.none(), max_size=2),
        event_id=event_ids,
    ),
    st.builds(Cancel, event_id=event_ids),
    st.builds(Reopen, stages=st.lists(stage_names, min_size=1, max_size=2).map(tuple), event_id=event_ids),
)

_FORWARD = {
    StageStatus.WAITING: {
        StageStatus.RUNNING,
        StageStatus.SUCCEEDED,
        StageStatus.FAILED,
        StageStatus.RETRYING,
        StageStatus.SKIPPED,
    },
    StageStatus.RUNNING: {StageStatus.RUNNING, StageStatus.SUCCEEDED, StageStatus.FAILED, StageStatus.RETRYING},
    StageStatus.RETRYING: {
        StageStatus.RUNNING,
        StageStatus.SUCCEEDED,
        StageStatus.FAILED,
        StageStatus.RETRYING,
        StageStatus.SKIPPED,
    },
    StageStatus.SUCCEEDED: set(),
    StageStatus.FAILED: set(),
    StageStatus.SKIPPED: set(),
    StageStatus.CANCELLED: set(),
}
for _status in (StageStatus.RUNNING, StageStatus.RETRYING):  # cut off when the operation fails or is cancelled
    _FORWARD[_status].add(StageStatus.CANCELLED)


def _apply(op: Operation, event: Event, i: int) -> Decision | None:
    try:
        return apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i))
    except (InvalidTransition, UnknownStage, InvalidMetadata):
        return None


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40))
def test_invariants_hold_for_any_event_stream(stream: list[Event]) -> None:
    op = fresh()
    for i, event in enumerate(stream, start=1):
        try:
            decision = apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i))
        except (InvalidTransition, UnknownStage, InvalidMetadata):
            continue  # typed refusals; any other exception fails the test
        new = decision.operation
        if decision.outcome is not Outcome.APPLIED:
            assert new is op  # duplicate and stale never change anything
        else:
            assert new.status is derive_status(new, PIPELINE)
            if op.status.terminal and not isinstance(event, Reopen):
                raise AssertionError("a terminal operation accepted an event")
            if not isinstance(event, Reopen):
                for name in PIPELINE.stage_names:
                    before, after = op.stage(name), new.stage(name)
                    if after.status is not before.status:
                        assert after.status in _FORWARD[before.status], (name, before.status, after.status)
                    assert after.attempt >= before.attempt
            if not isinstance(event, Heartbeat):  # heartbeats are idempotent and not remembered
                assert event.event_id in new.events
        assert len(new.history) <= HISTORY_LIMIT
        assert len(new.events) <= EVENT_WINDOW
        assert len(new.actions) <= ACTION_LIMIT
        assert (new.finished_at is not None) == new.status.terminal
        statuses = {new.stage(name).status for name in PIPELINE.stage_names}
        if new.status.terminal:
            assert not statuses & {StageStatus.RUNNING, StageStatus.RETRYING}, new.stages
        if StageStatus.CANCELLED in statuses:
            assert new.status in (OpStatus.FAILED, OpStatus.CANCELLED)
        op = new
    assert decode_operation("op.op1", 7, encode_operation(op)) == _with_revision(op, 7)


def _with_revision(op: Operation, revision: int) -> Operation:
    import msgspec

    return msgspec.structs.replace(op, revision=revision)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=30), st.data())
def test_redelivering_any_applied_event_changes_nothing(stream: list[Event], data: st.DataObject) -> None:
    op = fresh()
    applied: list[Event] = []
    for i, event in enumerate(stream, start=1):
        decision = _apply(op, event, i)
        if decision is not None:
            if decision.outcome is Outcome.APPLIED:
                applied.append(event)
            op = decision.operation
    # Events still inside the duplicate window are recognised by id; heartbeats and
    # reopens aside, redelivering any of them leaves the operation as it is.
    recent = [e for e in applied if e.event_id in op.events]
    if not recent:
        return
    again = data.draw(st.sampled_from(recent))
    decision = _apply(op, again, 1000)
    assert decision is not None
    assert decision.outcome is Outcome.DUPLICATE
    assert decision.operation is op


@settings(max_examples=200, deadline=None)
@given(st.permutations(happy_path()))
def test_reordered_delivery_never_moves_backwards(order: list[Event]) -> None:
    """Deliver a real run's events in any order, then redeliver them all in order:
    whatever was accepted out of order, nothing moves a stage backwards and the
    final state is the real run's final state."""
    op = fresh()
    for i, event in enumerate(order, start=1):
        decision = _apply(op, event, i)
        if decision is not None:
            for name in PIPELINE.stage_names:
                before, after = op.stage(name).status, decision.operation.stage(name).status
                assert after is before or after in _FORWARD[before]
            op = decision.operation
    for i, event in enumerate(happy_path(), start=100):
        decision = _apply(op, event, i)
        if decision is not None:
            op = decision.operation
    assert op.status is OpStatus.SUCCEEDED
    assert all(op.stage(s).status is StageStatus.SUCCEEDED for s in PIPELINE.stage_names)


def test_stage_metadata_from_an_older_attempt_is_stale() -> None:
    op, _ = run(
        fresh(),
        StartStage(stage="ingest", event_id="a1"),
        FailStage(stage="ingest", error="x", retryable=True, event_id="a1-fail"),
        StartStage(stage="ingest", event_id="a2"),
        MergeMetadata(patch={"rows": 2}, stage="ingest", attempt=2, event_id="m2"),
    )
    late, (d,) = run(op, MergeMetadata(patch={"rows": 1}, stage="ingest", attempt=1, event_id="m1"))
    assert d.outcome is Outcome.STALE and late.stage("ingest").metadata == {"rows": 2}
    with pytest.raises(InvalidTransition, match="has not started"):
        run(op, MergeMetadata(patch={"rows": 3}, stage="ingest", attempt=3, event_id="m3"))
    with pytest.raises(InvalidMetadata, match="together with its stage"):
        run(op, MergeMetadata(patch={"rows": 3}, attempt=2, event_id="m4"))


def test_a_shared_metadata_patch_with_expect_applies_only_while_the_members_hold_those_values() -> None:
    op, _ = run(fresh(), MergeMetadata(patch={"owner": "geo", "flag": True}, event_id="m1"))
    taken, (d,) = run(op, MergeMetadata(patch={"owner": "fraud"}, expect={"owner": "geo"}, event_id="m2"))
    assert d.outcome is Outcome.APPLIED and taken.metadata["owner"] == "fraud"
    _, (lost,) = run(taken, MergeMetadata(patch={"owner": "notify"}, expect={"owner": "geo"}, event_id="m3"))
    assert lost.outcome is Outcome.STALE and "expected 'geo'" in (lost.reason or "")
    _, (absent,) = run(op, MergeMetadata(patch={"new": 1}, expect={"new": None}, event_id="m4"))
    assert absent.outcome is Outcome.APPLIED
    _, (strict,) = run(op, MergeMetadata(patch={"flag": False}, expect={"flag": 1}, event_id="m5"))
    assert strict.outcome is Outcome.STALE  # JSON true is not 1


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=30), st.integers(min_value=1, max_value=4), stage_names)
def test_a_stage_metadata_patch_from_an_older_attempt_never_changes_the_stage(
    stream: list[Event], attempt: int, stage: str
) -> None:
    op = fresh()
    for i, event in enumerate(stream, start=1):
        decision = _apply(op, event, i)
        op = decision.operation if decision is not None else op
    patch = MergeMetadata(patch={"late": attempt}, stage=stage, attempt=attempt, event_id="late-patch")
    decision = _apply(op, patch, len(stream) + 1)
    if attempt < op.stage(stage).attempt or op.status.terminal:
        assert decision is not None and decision.outcome is Outcome.STALE
        assert decision.operation.stage(stage).metadata == op.stage(stage).metadata


def test_a_finished_attempt_keeps_the_trace_it_ran_in() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    started, _ = run(fresh(), StartStage(stage="ingest", traceparent=f"00-{trace}-00f067aa0ba902b7-01"))
    failed, _ = run(started, FailStage(stage="ingest", error="x", retryable=True))
    assert failed.stage("ingest").trace_id == trace
    done, _ = run(failed, SucceedStage(stage="ingest", attempt=2))  # an implicit new attempt: no trace of its own
    assert done.stage("ingest").trace_id is None
