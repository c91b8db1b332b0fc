"""Retry and re-drive: the pure rules (kvstate.machine.retry / redrive, kvstate.derive.retry_stages),
properties over random operations, and Client.retry / Client.redrive against the real server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstate import (
    Action,
    ActionKind,
    Cancel,
    Client,
    FailStage,
    InvalidTransition,
    MergeMetadata,
    NotRetryable,
    Operation,
    OperationExists,
    OpStatus,
    Outcome,
    RevisionMismatch,
    StageStatus,
    StartStage,
    SucceedStage,
    UnknownStage,
    new_operation,
    retry_stages,
)
from kvstate.events import Event
from kvstate.machine import already_applied, apply_event, redrive, retry
from kvstate.model import ACTION_LIMIT, EVENT_WINDOW
from tests.conftest import PIPELINE
from tests.test_machine import events as random_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(op: Operation, *events: Event) -> Operation:
    for i, event in enumerate(events, start=1):
        op = apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i)).operation
    return op


def failed_in_geo() -> Operation:
    """ingest and validate done, fraud running, geo failed for good: fraud is cut off."""
    return run(
        new_operation("op1", PIPELINE, T0, {}, "create"),
        StartStage(stage="ingest"),
        SucceedStage(stage="ingest"),
        StartStage(stage="validate"),
        SucceedStage(stage="validate"),
        StartStage(stage="fraud"),
        StartStage(stage="geo"),
        FailStage(stage="geo", error="upstream down", retryable=False, event_id="geo-fail"),
    )


NOW = T0 + timedelta(minutes=5)


def test_retry_defaults_to_the_failed_stage_and_records_who_and_why() -> None:
    op = failed_in_geo()
    assert op.status is OpStatus.FAILED and retry_stages(op, PIPELINE) == ("geo",)
    decision = retry(op, PIPELINE, None, NOW, event_id="r1", reason="upstream is back", by="alice")
    new = decision.operation
    assert decision.outcome is Outcome.APPLIED
    assert new.status is OpStatus.RUNNING and new.finished_at is None
    assert new.stage("geo").status is StageStatus.WAITING
    assert new.stage("fraud").status is StageStatus.WAITING  # cut off by the failure: it runs again too
    assert new.stage("validate").status is StageStatus.SUCCEEDED
    assert new.actions == [
        Action(at=NOW, kind="reopen", event="r1", by="alice", reason="upstream is back", stages=["geo"])
    ]
    reopened = [t for t in new.history if t.event == "r1" and t.stage is not None]
    assert {t.stage for t in reopened} == {"geo", "fraud"}  # merge and notify never left waiting
    assert all(t.worker == "alice" and t.to == "waiting" for t in reopened)


def test_retry_of_an_operation_not_finished_is_refused_and_changes_nothing() -> None:
    running = run(new_operation("op1", PIPELINE, T0, {}, "c"), StartStage(stage="ingest"))
    pending = new_operation("op2", PIPELINE, T0, {}, "c")
    for op in (running, pending):
        with pytest.raises(NotRetryable, match=f"it is {op.status.value}"):
            retry(op, PIPELINE, None, NOW, event_id="r1", reason="why", by="alice")
        with pytest.raises(NotRetryable):
            retry(op, PIPELINE, ["ingest"], NOW, event_id="r1", reason="why", by="alice")


def test_retry_of_an_unknown_stage_is_refused() -> None:
    with pytest.raises(UnknownStage, match="paint"):
        retry(failed_in_geo(), PIPELINE, ["paint"], NOW, event_id="r1")


def test_retry_that_leaves_the_failure_in_place_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="reopen geo as well"):
        retry(failed_in_geo(), PIPELINE, ["merge"], NOW, event_id="r1")


def test_a_retried_retry_is_a_duplicate_even_long_after_it_left_the_event_window() -> None:
    op = retry(failed_in_geo(), PIPELINE, None, NOW, event_id="r1", reason="x", by="a").operation
    # the operation runs on: many events later the retry's id is out of the window, but not forgotten
    patches = [MergeMetadata(patch={"n": i}, event_id=f"m{i}") for i in range(EVENT_WINDOW + 3)]
    op = run(op, *patches)
    assert "r1" not in op.events and already_applied(op, "r1")
    again = retry(op, PIPELINE, None, NOW, event_id="r1", reason="x", by="a")
    assert again.outcome is Outcome.DUPLICATE and again.operation is op  # not "it is running"


def test_a_cancelled_operation_resumes_where_the_cancel_stopped_it() -> None:
    cut = run(
        new_operation("op1", PIPELINE, T0, {}, "c"),
        StartStage(stage="ingest"),
        Cancel(reason="oops", worker="bob", event_id="stop"),
    )
    assert retry_stages(cut, PIPELINE) == ("ingest",)
    resumed = retry(cut, PIPELINE, None, NOW, event_id="r1", reason="not meant").operation
    assert resumed.status is OpStatus.PENDING and resumed.cancel is None
    assert [a.kind for a in resumed.actions] == ["cancel", "reopen"]
    cancelled_at = T0 + timedelta(seconds=2)
    assert resumed.actions[0] == Action(at=cancelled_at, kind="cancel", event="stop", by="bob", reason="oops")
    never_started = run(new_operation("op2", PIPELINE, T0, {}, "c"), Cancel(event_id="stop"))
    assert retry_stages(never_started, PIPELINE) == ()
    again = retry(never_started, PIPELINE, None, NOW, event_id="r1").operation
    assert again.status is OpStatus.PENDING and again.cancel is None and again.actions[-1].stages == ["ingest"]


def test_a_succeeded_operation_is_retried_only_from_named_stages() -> None:
    done = run(
        new_operation("op1", PIPELINE, T0, {}, "c"),
        *[e for s in PIPELINE.stage_names for e in (StartStage(stage=s), SucceedStage(stage=s))],
    )
    assert done.status is OpStatus.SUCCEEDED and retry_stages(done, PIPELINE) == ()
    with pytest.raises(NotRetryable, match="name the stages"):
        retry(done, PIPELINE, None, NOW, event_id="r1")
    again = retry(done, PIPELINE, ["merge"], NOW, event_id="r1").operation
    assert again.status is OpStatus.RUNNING
    assert {n for n, s in again.stages.items() if s.status is StageStatus.WAITING} == {"merge", "notify"}


def test_actions_are_bounded() -> None:
    op = failed_in_geo()
    for i in range(ACTION_LIMIT + 5):
        op = run(op, Cancel(event_id=f"c{i}")) if not op.status.terminal else op
        op = retry(op, PIPELINE, None, NOW, event_id=f"r{i}").operation
    assert len(op.actions) == ACTION_LIMIT
    assert op.actions[-1].event == f"r{ACTION_LIMIT + 4}"


def test_redrive_puts_an_archived_snapshot_back_with_a_link_to_it() -> None:
    archived = msgspec.structs.replace(failed_in_geo(), revision=41)
    live = redrive(
        archived, PIPELINE, None, NOW, event_id="d1", archived_source=3, redrives=1, reason="fixed", by="carol"
    )
    assert live.status is OpStatus.RUNNING and live.revision == 0 and live.redrives == 1
    assert live.events == ["d1"]  # a new life: the window starts with the re-drive
    assert live.stage("geo").status is StageStatus.WAITING
    assert live.history[: len(archived.history)] == archived.history  # its story so far is kept
    assert live.actions[-1] == Action(
        at=NOW,
        kind=ActionKind.REDRIVE.value,
        event="d1",
        by="carol",
        reason="fixed",
        stages=["geo"],
        archived_revision=41,
        archived_source=3,
    )
    with pytest.raises(NotRetryable, match="finished"):
        redrive(
            run(new_operation("x", PIPELINE, T0, {}, "c"), StartStage(stage="ingest")),
            PIPELINE,
            None,
            NOW,
            event_id="d1",
            archived_source=0,
            redrives=1,
        )


finished_streams = st.lists(random_events, max_size=40)


@settings(max_examples=200, deadline=None)
@given(finished_streams, st.lists(st.sampled_from(PIPELINE.stage_names), max_size=2))
def test_retry_of_any_finished_operation_runs_it_again_or_is_refused_with_nothing_changed(
    stream: list[Event], stages: list[str]
) -> None:
    op = new_operation("op1", PIPELINE, T0, {}, "create")
    for i, event in enumerate(stream, start=1):
        try:
            op = apply_event(op, PIPELINE, event, T0 + timedelta(seconds=i)).operation
        except (InvalidTransition, UnknownStage):
            continue
    before = op
    try:
        decision = retry(op, PIPELINE, stages or None, NOW, event_id="the-retry", reason="r", by="p")
    except NotRetryable:
        if op.status.terminal and stages:  # refused only when every stage named is still waiting
            assert op.cancel is None
            assert all(op.stage(s).status is StageStatus.WAITING for s in stages)
        elif op.status.terminal:  # nothing named: only a succeeded operation has nothing to retry
            assert op.status is OpStatus.SUCCEEDED
        assert op == before
        return
    except InvalidTransition:  # the named stages would leave it failed
        assert op.status is OpStatus.FAILED and stages
        return
    assert op.status.terminal, "a retry was applied to an operation that had not finished"
    new = decision.operation
    assert decision.outcome is Outcome.APPLIED
    assert not new.status.terminal and new.finished_at is None and new.cancel is None
    assert new.actions[-1].event == "the-retry" and new.actions[-1].kind == "reopen"
    assert len(new.actions) <= ACTION_LIMIT
    assert retry(new, PIPELINE, stages or None, NOW, event_id="the-retry").outcome is Outcome.DUPLICATE


# ---------------------------------------------------------------------- against the real server


async def fail_geo(client: Client) -> Operation:
    op = await client.create("orders")
    for stage in ("ingest", "validate"):
        await client.start(op.id, stage)
        await client.succeed(op.id, stage)
    await client.start(op.id, "geo")
    result = await client.fail(op.id, "geo", "upstream down", retryable=False)
    assert result.operation.status is OpStatus.FAILED
    return result.operation


async def test_client_retry_is_revision_checked_recorded_and_idempotent(client: Client) -> None:
    failed = await fail_geo(client)
    with pytest.raises(RevisionMismatch):
        await client.retry(failed.id, reason="x", by="ops", expected_revision=failed.revision - 1)
    assert (await client.get(failed.id)).revision == failed.revision  # nothing written
    result = await client.retry(
        failed.id, reason="upstream back", by="ops", event_id="retry-1", expected_revision=failed.revision
    )
    assert result.applied and result.operation.status is OpStatus.RUNNING
    stored = await client.get(failed.id)
    assert stored.actions[-1].by == "ops" and stored.actions[-1].reason == "upstream back"
    again = await client.retry(failed.id, reason="upstream back", by="ops", event_id="retry-1")
    assert again.outcome is Outcome.DUPLICATE and again.revision == stored.revision


async def test_client_retry_refuses_running_operations_and_unknown_stages(client: Client) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    before = await client.get(op.id)
    with pytest.raises(NotRetryable):
        await client.retry(op.id, reason="x")
    failed = await fail_geo(client)
    with pytest.raises(UnknownStage):
        await client.retry(failed.id, ["paint"], reason="x")
    assert (await client.get(op.id)).revision == before.revision
    assert (await client.get(failed.id)).revision == failed.revision


async def test_client_redrive_creates_the_operation_again_and_never_overwrites(client: Client) -> None:
    failed = await fail_geo(client)
    await client.remove(failed.id, failed.revision)  # as the archiver does once it archived it
    result = await client.redrive(failed, reason="fixed", by="ops", archived_source=2, event_id="d1")
    assert result.applied and result.operation.redrives == 1
    stored = await client.get(failed.id)
    assert stored.status is OpStatus.RUNNING and stored.actions[-1].archived_revision == failed.revision
    again = await client.redrive(failed, reason="fixed", by="ops", archived_source=2, event_id="d1")
    assert again.outcome is Outcome.DUPLICATE
    with pytest.raises(OperationExists):  # another re-drive while the bucket holds it
        await client.redrive(failed, reason="fixed", by="ops", event_id="d2")
    assert (await client.get(failed.id)).revision == stored.revision
