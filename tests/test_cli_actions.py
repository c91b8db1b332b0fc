"""``kvstate retry`` and ``kvstate jobs`` run as real subprocesses against the real server: exit codes 0, 1, 2."""

from __future__ import annotations

import json

from kvstate import Client, JobState, JobStore, OpStatus, Settings, new_job
from kvstate._time import utcnow
from tests.test_kvstate_cli import kvstate


async def failed_op(client: Client, op_id: str) -> None:
    await client.create("orders", op_id=op_id)
    await client.start(op_id, "ingest")
    await client.fail(op_id, "ingest", "disk full", retryable=False)


async def test_retry_runs_a_failed_operation_again_and_records_who_and_why(client: Client, settings: Settings) -> None:
    await failed_op(client, "r1")
    done = kvstate(settings, "retry", "r1", "--reason", "disk replaced", "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert "applied: r1 is pending" in done.stdout and "from ingest" in done.stdout
    op = await client.get("r1")
    assert op.status is OpStatus.PENDING
    assert (op.actions[-1].by, op.actions[-1].reason, op.actions[-1].stages) == ("alice", "disk replaced", ["ingest"])
    as_json = kvstate(settings, "retry", "r1", "--reason", "again", "--json")
    assert as_json.returncode == 2 and "only a finished operation can be retried" in as_json.stderr


async def test_retry_refusals_exit_2_and_change_nothing(client: Client, settings: Settings) -> None:
    await failed_op(client, "r2")
    running = await client.create("orders", op_id="r3")
    await client.start(running.id, "ingest")
    before = {op_id: (await client.get(op_id)).revision for op_id in ("r2", "r3")}
    for args, message in [
        (("retry", "r2", "--stage", "paint", "--reason", "x"), "has no stage 'paint'"),
        (("retry", "r3", "--reason", "x"), "it is running"),
        (("retry", "r2", "--stage", "merge", "--reason", "x"), "every stage named is already waiting"),
    ]:
        refused = kvstate(settings, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr and "Traceback" not in refused.stderr
    assert kvstate(settings, "retry", "r2").returncode == 2  # --reason is required
    missing = kvstate(settings, "retry", "nope", "--reason", "x")
    assert missing.returncode == 1 and "not found" in missing.stderr
    stale = kvstate(settings, "retry", "r2", "--reason", "x", "--revision", "1")
    assert stale.returncode == 1 and "not the expected 1" in stale.stderr
    assert {op_id: (await client.get(op_id)).revision for op_id in ("r2", "r3")} == before


async def test_jobs_list_show_run_and_cancel(client: Client, settings: Settings) -> None:
    for i in range(3):
        op = await client.create("orders", op_id=f"j{i}")
        await client.start(op.id, "ingest")
    jobs = JobStore(client)
    await jobs.create(
        new_job(
            "J1",
            "cancel",
            ["j0", "j1", "j2"],
            utcnow(),
            filter="status=running",
            reason="drain",
            max_operations=10,
            rate=100.0,
            by="ops",
        )
    )
    listed = kvstate(settings, "jobs", "list")
    assert listed.returncode == 0 and "J1" in listed.stdout and "pending" in listed.stdout
    ran = kvstate(settings, "jobs", "run", "J1")
    assert ran.returncode == 0, ran.stderr
    assert "job J1 done: 3/3 (applied 3, skipped 0, failed 0)" in ran.stdout
    shown = json.loads(kvstate(settings, "jobs", "show", "J1", "--json").stdout)
    assert shown["state"] == "done" and shown["counts"]["applied"] == 3
    text = kvstate(settings, "jobs", "show", "J1").stdout
    assert "status=running" in text and "drain" in text
    again = kvstate(settings, "jobs", "run", "J1")
    assert again.returncode == 1 and "already done" in again.stderr
    finished = kvstate(settings, "jobs", "cancel", "J1")
    assert finished.returncode == 1 and "already done" in finished.stderr
    await jobs.create(
        new_job("J2", "cancel", ["j0"], utcnow(), filter="id=j0", reason="x", max_operations=10, rate=1.0)
    )
    cancelled = kvstate(settings, "jobs", "cancel", "J2", "--reason", "changed my mind")
    assert cancelled.returncode == 0, cancelled.stderr
    assert (await jobs.get("J2")).state is JobState.CANCELLED
    unknown = kvstate(settings, "jobs", "show", "nope")
    assert unknown.returncode == 1 and "not found" in unknown.stderr


def test_jobs_create_without_a_dashboard_says_where_it_looked(settings: Settings) -> None:
    refused = kvstate(
        settings,
        "jobs",
        "create",
        "--filter",
        "status=failed",
        "--action",
        "retry",
        "--reason",
        "x",
        "--dashboard",
        "http://127.0.0.1:9",
    )
    assert refused.returncode == 1 and "cannot reach the dashboard at http://127.0.0.1:9" in refused.stderr
