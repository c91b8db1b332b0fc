"""A short, bounded demo run against the real nats-server: every operation ends terminal,
every recorded transition is one the state machine allows, poison fails where it should,
and the duplicate/stale protection was exercised."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import nats
import pytest

from demo.orders import Poison, poison_of
from demo.queue import WorkQueue
from demo.runner import load_pipeline, run_demo
from demo.settings import DemoSettings
from kvstate import Client, Operation, OpStatus, Pipeline, StageStatus, derive_status
from kvstate.model import HISTORY_LIMIT

# Every stage transition a demo worker may cause. The workers always start an attempt
# explicitly, so waiting -> succeeded/failed (an implicit start) must never appear.
STAGE_EDGES = {
    ("waiting", "running"),
    ("waiting", "skipped"),
    ("running", "succeeded"),
    ("running", "retrying"),
    ("running", "failed"),
    ("retrying", "running"),
    # the operation failed while the stage ran or waited for a retry
    ("running", "cancelled"),
    ("retrying", "cancelled"),
}
OPERATION_EDGES = {("pending", "running"), ("running", "succeeded"), ("running", "failed")}


def check_history(op: Operation, pipeline: Pipeline) -> None:
    """The transition history is an unbroken walk over the allowed edges, ending in the current state."""
    complete = len(op.history) < HISTORY_LIMIT
    last_op: str | None = None
    last_stage: dict[str, str] = {}
    attempts: dict[str, int] = {}
    for entry in op.history:
        if entry.stage is None:
            if entry.from_ is None:
                assert entry.to == "pending", op.id
            else:
                assert (entry.from_, entry.to) in OPERATION_EDGES, (op.id, entry)
                assert last_op in (None, entry.from_), (op.id, entry)
            last_op = entry.to
            continue
        assert (entry.from_, entry.to) in STAGE_EDGES, (op.id, entry)
        previous = last_stage.get(entry.stage, "waiting" if complete else entry.from_)
        assert entry.from_ == previous, (op.id, entry)
        last_stage[entry.stage] = entry.to
        if entry.to == "running":
            expected = attempts.get(entry.stage, (entry.attempt or 1) - 1) + 1
            assert entry.attempt == expected, (op.id, entry)
            assert entry.attempt <= pipeline.stage(entry.stage).max_attempts
            attempts[entry.stage] = entry.attempt
    assert last_op == op.status.value, op.id
    for name, status in last_stage.items():
        assert op.stage(name).status.value == status, (op.id, name)


def check_final_state(op: Operation, pipeline: Pipeline) -> None:
    assert op.done, f"{op.id} is still {op.status.value}: {op.active_stages}"
    assert op.finished_at is not None
    assert derive_status(op, pipeline) is op.status
    for spec in pipeline.stages:
        state = op.stage(spec.name)
        if op.status is OpStatus.SUCCEEDED:
            assert state.status.terminal, (op.id, spec.name)
            if not spec.optional:
                assert state.status is StageStatus.SUCCEEDED, (op.id, spec.name)
        assert state.status is not StageStatus.RUNNING, (op.id, spec.name)
    if op.status is OpStatus.FAILED:
        failed = [s for s in pipeline.stages if not s.optional and op.stage(s.name).status is StageStatus.FAILED]
        assert failed, op.id
        for spec in failed:
            state = op.stage(spec.name)
            assert state.error is not None
            assert state.attempt == spec.max_attempts or not state.error.retryable, (op.id, spec.name, state)


def check_output(op: Operation) -> None:
    """A succeeded order carries the output document every stage added to."""
    output = op.metadata["output"]
    assert isinstance(output, dict)
    assert output["status"] == "stored"
    assert output["order_number"] == op.metadata["input"]["order_number"]  # type: ignore[index]
    assert output["row_id"] == op.stage("persist").metadata["row_id"]
    assert output["risk"]["decision"] in ("accept", "review")
    assert output["audit_digest"] == op.stage("audit").metadata["digest"]
    assert "geo" in output["shipping"]
    if op.metadata["input"]["customer"] is None:  # type: ignore[index]
        assert op.stage("profile").status is StageStatus.SKIPPED
        assert op.stage("notify").status is StageStatus.SKIPPED


@pytest.mark.timeout(110)
async def test_every_demo_operation_ends_terminal_through_valid_transitions(demo_settings: DemoSettings) -> None:
    pipeline = load_pipeline()
    report = await run_demo(demo_settings, pipeline)

    stats = report.stats
    assert report.drained, stats
    assert not report.stopped
    assert stats["created"] >= 80
    assert stats["errors"] == 0
    assert stats["rejected"] == 0  # poison fails its stage; no message is refused by kvstate
    assert stats["in_flight"] == 0
    assert stats["succeeded"] + stats["failed"] == stats["created"]
    # the misbehaviour happened, and the state machine caught every late or repeated message
    assert stats["retries"] > 0
    assert stats["stuck"] > 0
    assert stats["replays"] > 0
    assert stats["duplicate"] > 0
    assert stats["stale"] > 0

    async with Client(demo_settings.kv) as client:
        ops = await client.list(pipeline=pipeline.name)
        assert len(ops) == stats["created"]
        poisoned = 0
        for op in ops:
            check_final_state(op, pipeline)
            check_history(op, pipeline)
            poison = poison_of(op.metadata["input"])  # type: ignore[arg-type]
            if poison is not None:
                poisoned += 1
                assert op.status is OpStatus.FAILED, op.id
                stage = {
                    Poison.NEGATIVE_QUANTITY: "validate",
                    Poison.UNKNOWN_COUNTRY: "geo",
                    Poison.CARD_BIN_BLOCKED: "fraud",
                }[poison]
                assert op.stage(stage).status is StageStatus.FAILED, (op.id, poison)
            elif op.status is OpStatus.SUCCEEDED:
                check_output(op)
        assert poisoned > 0
        assert stats["succeeded"] == sum(op.status is OpStatus.SUCCEEDED for op in ops)

        # the stored revisions of a sample of keys only ever append to the history
        for op in ops[:20]:
            revisions = [r.operation for r in await client.history(op.id) if r.operation is not None]
            assert revisions[-1] == op
            for older, newer in itertools.pairwise(revisions):
                assert newer.revision > older.revision
                if len(newer.history) < HISTORY_LIMIT:
                    assert newer.history[: len(older.history)] == older.history
                assert newer.id == older.id


async def test_services_split_over_two_runs_share_the_work_queue(demo_settings: DemoSettings) -> None:
    """One run generates and runs the first half of the services, another runs the rest."""
    pipeline = load_pipeline()
    first_half, second_half = pipeline.stage_names[:5], pipeline.stage_names[5:]
    quiet = dataclasses.replace(demo_settings, duration=2.0, stuck_rate=0.0, poison_rate=0.0, chaos_rate=0.1)
    stop_second = asyncio.Event()
    second = asyncio.ensure_future(
        run_demo(dataclasses.replace(quiet, rate=0.0, duration=0.0), pipeline, stop=stop_second, services=second_half)
    )
    try:
        first = await run_demo(quiet, pipeline, services=first_half)
    finally:
        stop_second.set()
        second_report = await second
    assert first.drained, first.stats
    assert second_report.stopped
    assert first.stats["created"] >= 20
    assert first.stats["succeeded"] == first.stats["created"]
    async with Client(demo_settings.kv) as client:
        ops = await client.list(pipeline=pipeline.name)
    assert len(ops) == first.stats["created"]
    for op in ops:
        assert op.status is OpStatus.SUCCEEDED
        assert op.stage("audit").status is StageStatus.SUCCEEDED  # run by the second process only


async def test_a_malformed_work_message_is_dropped_without_stopping_the_service(demo_settings: DemoSettings) -> None:
    nc = await nats.connect(demo_settings.kv.nats_url)
    try:
        queue = await WorkQueue.open(nc, demo_settings.stream, demo_settings.subject_prefix)
        await nc.jetstream().publish(queue.subject("ingest"), b"{not json", stream=demo_settings.stream)
        await nc.jetstream().publish(queue.subject("geo"), b'{"op": 42}', stream=demo_settings.stream)
        assert await queue.pending() == 2
        calm = dataclasses.replace(demo_settings, duration=1.0, stuck_rate=0.0, poison_rate=0.0, chaos_rate=0.0)
        report = await run_demo(calm)
        assert report.drained
        assert report.stats["errors"] == 0
        assert report.stats["succeeded"] == report.stats["created"] > 0
        assert await queue.pending() == 0  # both were terminated, not left to be redelivered forever
    finally:
        await nc.close()
