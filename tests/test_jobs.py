"""Bulk jobs: the pure record and its transitions (hypothesis), and runners against the real server,
including a runner process killed midway and the job resumed: every operation changed exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstate import (
    Client,
    InvalidJob,
    Job,
    JobBusy,
    JobFinished,
    JobNotFound,
    JobRunner,
    JobState,
    JobStore,
    OpStatus,
    Settings,
    new_job,
)
from kvstate.codec import decode_job, encode_job
from kvstate.jobs import (
    PROBLEM_LIMIT,
    StepResult,
    acquire,
    cancel_job,
    event_id_for,
    finish,
    next_target,
    pause,
    record,
    resumable,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job_of(targets: list[str], action: str = "cancel", **kw: object) -> Job:
    options: dict[str, object] = {
        "filter": "status=running",
        "reason": "incident 42",
        "max_operations": 100,
        "rate": 1000.0,
        "by": "ops",
    }
    options.update(kw)
    return new_job("job1", action, targets, T0, **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the pure record


def test_a_new_job_keeps_its_targets_in_order_without_repeats() -> None:
    job = job_of(["b", "a", "b", "c"])
    assert job.state is JobState.PENDING and job.targets == ["b", "a", "c"]
    assert job.counts.matched == 3 and job.cursor == 0 and not job.done
    assert decode_job("job.job1", 5, encode_job(job)).revision == 5


@pytest.mark.parametrize(
    ("targets", "options", "message"),
    [
        ([], {}, "matches no operation"),
        ([f"op{i}" for i in range(101)], {}, "more than the limit of 100"),
        (["a"], {"reason": "  "}, "needs a reason"),
        (["a"], {"rate": 0.0}, "rate 0"),
        (["a"], {"action": "delete"}, "unknown action"),
        (["a"], {"stages": ["geo"]}, "only a retry job names stages"),
        (["a.b"], {}, "invalid key"),
    ],
)
def test_an_unusable_job_is_refused(targets: list[str], options: dict[str, object], message: str) -> None:
    action = str(options.pop("action", "cancel"))
    with pytest.raises(InvalidJob, match=message):
        job_of(targets, action, **options)


def test_one_runner_at_a_time_and_a_dead_runners_job_can_be_taken_over() -> None:
    job = acquire(job_of(["a", "b"]), "r1", T0)
    assert job.state is JobState.RUNNING and job.lease is not None and job.lease.owner == "r1"
    with pytest.raises(JobBusy, match="r1"):
        acquire(job, "r2", T0 + timedelta(seconds=5))
    assert not resumable(job, T0 + timedelta(seconds=5))
    later = T0 + timedelta(seconds=job.lease_seconds + 1)  # r1 stopped renewing: it died
    assert resumable(job, later)
    taken = acquire(job, "r2", later)
    with pytest.raises(JobBusy, match="r2"):  # r1 wakes up: it cannot record a step any more
        record(taken, "a", StepResult.APPLIED, None, "r1", later)


def test_steps_are_counted_in_order_and_the_end_says_how_it_went() -> None:
    job = acquire(job_of(["a", "b", "c"]), "r", T0)
    with pytest.raises(ValueError, match="not the next target"):
        record(job, "b", StepResult.APPLIED, None, "r", T0)
    job = record(job, "a", StepResult.APPLIED, None, "r", T0)
    job = record(job, "b", StepResult.SKIPPED, "already succeeded", "r", T0)
    with pytest.raises(ValueError, match="1 targets left"):
        finish(job, "r", T0)
    job = record(job, "c", StepResult.FAILED, "corrupt value", "r", T0)
    assert next_target(job) is None
    assert (job.counts.applied, job.counts.skipped, job.counts.failed) == (1, 1, 1)
    assert [(p.op_id, p.result) for p in job.problems] == [("b", "skipped"), ("c", "failed")]
    ended = finish(job, "r", T0)
    assert ended.state is JobState.FAILED and ended.finished_at == T0 and ended.lease is None
    clean = finish(record(acquire(job_of(["a"]), "r", T0), "a", StepResult.SKIPPED, "x", "r", T0), "r", T0)
    assert clean.state is JobState.DONE


def test_a_cancelled_job_takes_no_new_runner_but_its_last_step_still_counts() -> None:
    job = acquire(job_of(["a", "b"]), "r", T0)
    cancelled = cancel_job(job, T0, by="bob", reason="wrong filter")
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at == T0
    assert cancelled.cancel is not None and cancelled.cancel.by == "bob"
    with pytest.raises(JobFinished):
        acquire(cancelled, "r2", T0)
    with pytest.raises(JobFinished):
        cancel_job(cancelled, T0)
    counted = record(cancelled, "a", StepResult.APPLIED, None, "r", T0)  # the step that ran during the cancel
    assert counted.counts.applied == 1 and counted.state is JobState.CANCELLED
    assert pause(counted, "r", T0).lease is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), min_size=1, max_size=6),
    st.lists(st.sampled_from(list(StepResult)), max_size=6),
    st.lists(st.sampled_from(["r1", "r2"]), max_size=6),
)
def test_any_sequence_of_steps_and_takeovers_counts_each_target_once(
    targets: list[str], results: list[StepResult], runners: list[str]
) -> None:
    job = job_of(targets)
    now = T0
    owner = "r0"
    job = acquire(job, owner, now)
    for i, result in enumerate(results):
        if i < len(runners) and runners[i] != owner:  # the runner dies; another takes over after the lease
            now += timedelta(seconds=job.lease_seconds + 1)
            owner = runners[i]
            job = acquire(job, owner, now)
        op_id = next_target(job)
        if op_id is None:
            break
        job = record(job, op_id, result, "why", owner, now)
        assert job.counts.processed == job.cursor <= len(job.targets)
        assert len(job.problems) <= PROBLEM_LIMIT
    if next_target(job) is None:
        ended = finish(job, owner, now)
        assert ended.done and ended.counts.processed == ended.counts.matched == len(set(targets))
        assert ended.state is (JobState.FAILED if ended.counts.failed else JobState.DONE)


def test_the_event_id_names_the_job_and_the_operation() -> None:
    assert event_id_for("01JOB", "op7") == "job:01JOB:op7"


# ---------------------------------------------------------------------- against the real server


async def make_running(client: Client, count: int) -> list[str]:
    ids = []
    for i in range(count):
        op = await client.create("orders", op_id=f"bulk{i:03d}")
        await client.start(op.id, "ingest")
        ids.append(op.id)
    return ids


async def test_a_cancel_job_runs_to_done_and_counts_what_it_skipped(client: Client) -> None:
    ids = await make_running(client, 6)
    await client.succeed(ids[2], "ingest")
    await client.start(ids[2], "validate")
    await client.fail(ids[2], "validate", "bad", retryable=False)  # already finished: skipped
    jobs = JobStore(client)
    created = await jobs.create(job_of([*ids, "gone-already"], rate=200.0))
    steps: list[int] = []
    final = await JobRunner(client, owner="t", on_step=lambda j: steps.append(j.cursor)).run(created.id)
    assert final.state is JobState.DONE and final.lease is None and final.finished_at is not None
    assert (final.counts.applied, final.counts.skipped, final.counts.failed) == (5, 2, 0)
    assert steps == list(range(1, 8))
    for op_id in ids:
        op = await client.get(op_id)
        assert op.status is OpStatus.CANCELLED if op_id != ids[2] else OpStatus.FAILED
        mine = [a for a in op.actions if a.event == event_id_for(created.id, op_id)]
        assert len(mine) == (0 if op_id == ids[2] else 1)
        if mine:
            assert (mine[0].by, mine[0].reason) == ("ops", "incident 42")
    assert {p.op_id for p in final.problems} == {ids[2], "gone-already"}
    with pytest.raises(JobFinished):
        await JobRunner(client).run(created.id)
    assert [j.id for j in await jobs.list()] == [created.id]
    with pytest.raises(JobNotFound):
        await jobs.get("nope")


async def test_a_job_record_over_the_buckets_value_size_is_refused(client: Client) -> None:
    targets = [f"{i:05d}" + "x" * 95 for i in range(3000)]  # 3,000 ids of 100 characters: about 310 KB
    with pytest.raises(InvalidJob, match="over the bucket's value size"):
        await JobStore(client).create(job_of(targets, max_operations=5000))
    assert await JobStore(client).list() == []


async def test_a_retry_job_retries_failed_operations_from_their_failed_stage(client: Client) -> None:
    ids = []
    for i in range(3):
        op = await client.create("orders", op_id=f"f{i}")
        await client.start(op.id, "ingest")
        await client.fail(op.id, "ingest", "disk full", retryable=False)
        ids.append(op.id)
    running = await client.create("orders", op_id="still-running")
    await client.start(running.id, "ingest")
    job = await JobStore(client).create(job_of([*ids, running.id], "retry", reason="disk replaced"))
    final = await JobRunner(client).run(job.id)
    assert final.state is JobState.DONE and (final.counts.applied, final.counts.skipped) == (3, 1)
    assert "only a finished operation can be retried" in final.problems[0].message
    for op_id in ids:
        op = await client.get(op_id)
        assert op.status is OpStatus.PENDING and op.actions[-1].reason == "disk replaced"


async def test_cancelling_a_job_stops_its_runner_before_the_next_operation(client: Client) -> None:
    ids = await make_running(client, 30)
    jobs = JobStore(client)
    job = await jobs.create(job_of(ids, rate=20.0))
    runner = asyncio.create_task(JobRunner(client).run(job.id))
    deadline = time.monotonic() + 10
    while (await jobs.get(job.id)).cursor < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await jobs.cancel(job.id, by="bob", reason="enough")
    final = await asyncio.wait_for(runner, 10)
    assert final.state is JobState.CANCELLED and final.lease is None
    cancelled = [op_id for op_id in ids if (await client.get(op_id)).status is OpStatus.CANCELLED]
    assert len(cancelled) == final.counts.applied < len(ids)  # every change it made is counted, no more
    assert cancelled == ids[: len(cancelled)]


async def test_stopping_a_runner_pauses_the_job_and_another_runner_resumes_it(client: Client) -> None:
    ids = await make_running(client, 12)
    jobs = JobStore(client)
    job = await jobs.create(job_of(ids, rate=30.0))
    stop = asyncio.Event()
    first = asyncio.create_task(JobRunner(client, owner="first").run(job.id, stop))
    while (await jobs.get(job.id)).cursor < 4:
        await asyncio.sleep(0.02)
    with pytest.raises(JobBusy, match="first"):
        await JobRunner(client, owner="second").run(job.id)
    stop.set()
    paused = await asyncio.wait_for(first, 10)
    assert paused.state is JobState.PAUSED and paused.lease is None
    final = await JobRunner(client, owner="second").run(job.id)
    assert final.state is JobState.DONE and final.counts.applied == len(ids)


async def test_a_step_a_dead_runner_applied_but_never_recorded_is_not_applied_again(client: Client) -> None:
    """The window a crash can hit: the operation changed, the job record not yet. Here the dead
    runner retried ``f0``, which then ran on (more events than the event window holds) and
    failed again; the resumed job must count the retry it made, not make a second one."""
    ops = []
    for i in range(2):
        op = await client.create("orders", op_id=f"f{i}")
        await client.start(op.id, "ingest")
        ops.append((await client.fail(op.id, "ingest", "disk full", retryable=False)).operation)
    job = await JobStore(client).create(job_of([o.id for o in ops], "retry", reason="disk replaced"))
    await client.retry("f0", reason="disk replaced", by="ops", event_id=event_id_for(job.id, "f0"))
    for i in range(40):  # the retried operation runs on: its retry leaves the event window
        await client.merge_metadata("f0", {"n": i})
    await client.start("f0", "ingest")
    await client.fail("f0", "ingest", "disk full again", retryable=False)
    before = await client.get("f0")
    assert event_id_for(job.id, "f0") not in before.events and before.status is OpStatus.FAILED
    final = await JobRunner(client).run(job.id)
    assert final.state is JobState.DONE and final.counts.applied == 2
    after = await client.get("f0")
    assert after.revision == before.revision and after.status is OpStatus.FAILED  # not retried a second time
    assert (await client.get("f1")).status is OpStatus.PENDING


def kvstate_cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {"NATS_URL": settings.nats_url, "KVSTATE_BUCKET": settings.bucket, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "kvstate.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )


@pytest.mark.slow
async def test_a_runner_killed_midway_and_resumed_changes_every_operation_exactly_once(
    client: Client, settings: Settings
) -> None:
    ids = await make_running(client, 40)
    jobs = JobStore(client)
    job = await jobs.create(job_of(ids, rate=25.0, lease_seconds=2.0))
    killed_at: list[int] = []
    for _ in range(2):  # killed twice, by pid, with no chance to record its last step
        if killed_at:
            await asyncio.sleep(2.1)  # the dead runner's lease expires: then the job can be taken over
        process = kvstate_cli(settings, "jobs", "run", job.id)
        try:
            deadline = time.monotonic() + 30
            start = (await jobs.get(job.id)).cursor
            while (await jobs.get(job.id)).cursor < start + 7:
                assert time.monotonic() < deadline, "the runner made no progress"
                assert process.poll() is None, process.communicate()
                await asyncio.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=10)  # reaps it and closes its pipes
        left = await jobs.get(job.id)
        assert left.state is JobState.RUNNING and left.lease is not None  # its lease is left behind
        killed_at.append(left.cursor)
    # one operation past the recorded cursor may have been changed already: the resume must not change it again
    await asyncio.sleep(2.1)  # the dead runner's lease expires
    resumed = kvstate_cli(settings, "jobs", "run", job.id)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    final = await jobs.get(job.id)
    assert final.state is JobState.DONE, final
    assert final.counts.applied == len(ids) and final.counts.processed == len(ids)
    for op_id in ids:
        op = await client.get(op_id)
        assert op.status is OpStatus.CANCELLED
        assert [a.event for a in op.actions].count(event_id_for(job.id, op_id)) == 1, op.actions
        assert [t.to for t in op.history if t.stage is None].count("cancelled") == 1
    assert killed_at[0] < killed_at[1] < len(ids)
