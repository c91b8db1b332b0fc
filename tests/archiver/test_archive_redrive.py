"""Re-drive: an archived operation put back into the bucket, run again and archived again as a row
of its own, never overwriting the first snapshot, never removed from the bucket while it runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
import pytest
from archiver_support import archiver_env, fail_at_ingest, succeed_all

from archiver.read import ArchiveReader, redrive
from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from kvstate import (
    Client,
    JobStore,
    NotRetryable,
    OperationExists,
    OperationNotFound,
    OpStatus,
    Outcome,
    UnknownStage,
    new_job,
)


async def archive_all(settings: ArchiverSettings) -> None:
    async with Archiver(settings) as archiver:
        await archiver.run(burst=True)


async def archived_failure(client: Client, settings: ArchiverSettings, op_id: str = "again") -> int:
    """An operation failed at ingest, archived and removed from the bucket; returns its archived revision."""
    op = await client.create("orders", op_id=op_id, metadata={"customer": 7})
    failed = await fail_at_ingest(client, op.id)
    await archive_all(settings)
    with pytest.raises(OperationNotFound):
        await client.get(op_id)
    return failed.revision


async def rows_of(dsn: str, op_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT redrives, revision, status, actions FROM archived_operations WHERE id = $1 ORDER BY redrives",
            op_id,
        )
    finally:
        await conn.close()


async def test_a_redriven_operation_runs_again_and_is_archived_as_a_new_row(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    first = await archived_failure(client, archiver_settings)
    dsn = archiver_settings.database_url
    async with ArchiveReader.connect(dsn) as archive:
        result = await redrive(archive, client, "again", reason="input fixed", by="alice")
    assert result.applied
    live = await client.get("again")
    assert live.status is OpStatus.PENDING and live.redrives == 1 and live.metadata == {"customer": 7}
    action = live.actions[-1]
    assert (action.kind, action.archived_revision, action.by, action.reason) == (
        "redrive",
        first,
        "alice",
        "input fixed",
    )
    assert action.stages == ["ingest"] and live.revision > first

    await archive_all(archiver_settings)  # its sweep must not remove it: the archive holds another life
    assert (await client.get("again")).revision == live.revision

    done = await succeed_all(client, "again")
    async with Archiver(dataclasses.replace(archiver_settings, grace_period=3600)) as archiver:
        await archiver.run(burst=True)  # archived again, not removed yet: the grace period is not over
        assert (await client.get("again")).revision == done.revision
        archiver.settings = dataclasses.replace(archiver.settings, grace_period=0)
        assert await archiver.sweep() == 1  # the sweep compares with the newest life, not the first snapshot
    with pytest.raises(OperationNotFound):
        await client.get("again")
    rows = await rows_of(dsn, "again")
    assert [(r["redrives"], r["revision"], r["status"]) for r in rows] == [
        (0, first, "failed"),  # the first snapshot is still there, as it was
        (1, done.revision, "succeeded"),
    ]
    assert [a["kind"] for a in json.loads(rows[1]["actions"])] == ["redrive"]
    async with ArchiveReader.connect(dsn) as archive:
        newest = await archive.get("again")
        every = await archive.snapshots("again")
        page = await archive.search(id_prefix="again", limit=1)
        rest = await archive.search(id_prefix="again", limit=1, page_token=page.next_token)
    assert newest is not None and newest.redrives == 1 and newest.operation.status is OpStatus.SUCCEEDED
    assert newest.operation.actions == done.actions  # the actions read back with the row
    assert [(s.redrives, s.status) for s in every] == [(1, "succeeded"), (0, "failed")]
    assert [i.redrives for i in page.items + rest.items] == [1, 0] and rest.next_token is None

    async with ArchiveReader.connect(dsn) as archive:  # and once more: a third life, a third row
        second = await redrive(archive, client, "again", ["merge"], reason="re-merge", by="bob")
    assert second.operation.redrives == 2 and second.operation.actions[-1].archived_revision == done.revision


async def test_a_redrive_is_refused_while_the_bucket_holds_the_operation_and_for_bad_stages(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    await archived_failure(client, archiver_settings)
    dsn = archiver_settings.database_url
    async with ArchiveReader.connect(dsn) as archive:
        with pytest.raises(UnknownStage):
            await redrive(archive, client, "again", ["paint"], reason="x")
        with pytest.raises(NotRetryable):
            await redrive(archive, client, "again", ["merge"], reason="x")  # merge never ran: nothing to do
        with pytest.raises(OperationNotFound, match="not in the archive either"):
            await redrive(archive, client, "never-was", reason="x")
        with pytest.raises(OperationNotFound):
            await client.get("again")  # nothing written by the refusals
        result = await redrive(archive, client, "again", reason="x", event_id="d-1")
        again = await redrive(archive, client, "again", reason="x", event_id="d-1")  # a retried call
        assert again.outcome is Outcome.DUPLICATE and again.revision == result.revision
        with pytest.raises(OperationExists):
            await redrive(archive, client, "again", reason="x")
    assert len(await rows_of(dsn, "again")) == 1


def kvstate(settings: ArchiverSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstate.cli", *args],
        env=archiver_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_kvstate_archive_redrive(client: Client, archiver_settings: ArchiverSettings) -> None:
    revision = await archived_failure(client, archiver_settings)
    for args, code, message in [
        (("--stage", "paint"), 2, "has no stage 'paint'"),
        (("--stage", "merge"), 2, "every stage named is already waiting"),
    ]:
        refused = await asyncio.to_thread(
            kvstate, archiver_settings, "archive", "redrive", "again", "--reason", "x", *args
        )
        assert refused.returncode == code, refused.stderr
        assert message in refused.stderr and "Traceback" not in refused.stderr
    missing = await asyncio.to_thread(kvstate, archiver_settings, "archive", "redrive", "nope", "--reason", "x")
    assert missing.returncode == 1 and "not in the archive either" in missing.stderr
    done = await asyncio.to_thread(
        kvstate, archiver_settings, "archive", "redrive", "again", "--reason", "fixed", "--by", "carol"
    )
    assert done.returncode == 0, done.stderr
    assert f"re-drive 1 of archived revision {revision}" in done.stdout and "from ingest" in done.stdout
    assert (await client.get("again")).actions[-1].by == "carol"
    twice = await asyncio.to_thread(kvstate, archiver_settings, "archive", "redrive", "again", "--reason", "x")
    assert twice.returncode == 2 and "still in the bucket" in twice.stderr


async def test_job_records_are_neither_archived_nor_removed(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    """The archiver follows op.> only: a finished bulk job's record stays in the bucket for kvstate jobs."""
    await archived_failure(client, archiver_settings, "before")
    jobs = JobStore(client)
    job = await jobs.create(
        new_job("J1", "retry", ["before"], datetime.now(UTC), filter="id=before", reason="x", max_operations=5, rate=5)
    )
    await jobs.cancel(job.id)  # a finished job
    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.archived == 0 and counts.dead_letters == 0
    assert (await jobs.get("J1")).state.value == "cancelled"
    assert len(await rows_of(archiver_settings.database_url, "J1")) == 0
