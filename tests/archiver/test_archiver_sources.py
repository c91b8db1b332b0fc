"""Removal only of what the archive holds at that revision; ids reused by another bucket incarnation.

Issue #10, items 2 and 3: a key leaves the bucket only once its (id, revision) is durably
archived from the bucket incarnation it lives in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec
import pytest
from archiver_support import assert_exactly_once, eventually, live_ids, succeed_all

from archiver.read import ArchiveReader
from archiver.rows import row_for
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore
from archiver.worker import Archiver, ArchiverHooks
from devstack.servers import PostgresServer
from kvstate import Client, FeedMessage, OpStatus, Settings
from tests.conftest import PIPELINE

pytestmark = pytest.mark.slow


async def _rows_of(dsn: str, op_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT revision, status FROM archived_operations WHERE id = $1 ORDER BY finished_at", op_id
        )
    finally:
        await conn.close()


async def test_an_id_reused_by_a_recreated_bucket_is_archived_as_a_row_of_its_own(
    client: Client, settings: Settings, archiver_settings: ArchiverSettings
) -> None:
    first = await succeed_all(client, (await client.create("orders", op_id="reused")).id)
    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.archived == 1 and counts.removed == 1

    # The bucket is deleted and created again; the same id comes back at a lower revision.
    await client._open_store().js.delete_stream(client._open_store().config.stream)
    async with Client(settings, create_bucket=True) as fresh:
        await fresh.set_pipeline(PIPELINE)
        await fresh.create("orders", op_id="reused", metadata={"incarnation": 2})
        second = (await fresh.cancel("reused", reason="again", by="tests")).operation
        assert second.revision < first.revision
        async with Archiver(archiver_settings) as archiver:
            counts = await archiver.run(burst=True)
        assert (counts.archived, counts.duplicates, counts.removed) == (1, 0, 1)
        assert "reused" not in await live_ids(fresh)

    rows = await _rows_of(archiver_settings.database_url, "reused")
    assert [(r["revision"], r["status"]) for r in rows] == [
        (first.revision, "succeeded"),
        (second.revision, "cancelled"),
    ]
    async with ArchiveReader.connect(archiver_settings.database_url) as archive:
        newest = await archive.get("reused")
        both = await archive.snapshots("reused")
        page = await archive.search(id_prefix="reused", limit=1)
        rest = await archive.search(id_prefix="reused", limit=1, page_token=page.next_token)
    assert newest is not None and newest.revision == second.revision
    assert newest.operation.metadata == {"incarnation": 2}
    assert [s.revision for s in both] == [second.revision, first.revision]
    assert [i.revision for i in page.items + rest.items] == [second.revision, first.revision]
    assert rest.next_token is None


async def test_two_buckets_sharing_one_archive_keep_a_row_each_for_the_same_id(
    client: Client, settings: Settings, archiver_settings: ArchiverSettings
) -> None:
    busy = await succeed_all(client, (await client.create("orders", op_id="shared")).id)
    other_kv = dataclasses.replace(settings, bucket=settings.bucket + "b")
    other = dataclasses.replace(archiver_settings, kv=other_kv)
    async with Client(other_kv, create_bucket=True) as second_bucket:
        await second_bucket.set_pipeline(PIPELINE)
        await second_bucket.create("orders", op_id="shared")
        quick = (await second_bucket.cancel("shared")).operation
        assert quick.revision < busy.revision
        async with Archiver(archiver_settings) as archiver:
            assert (await archiver.run(burst=True)).archived == 1
        async with Archiver(other) as archiver:
            counts = await archiver.run(burst=True)
        assert (counts.archived, counts.duplicates, counts.removed) == (1, 0, 1)
        await assert_no_key(second_bucket, "shared")
    rows = await _rows_of(archiver_settings.database_url, "shared")
    assert sorted(r["revision"] for r in rows) == sorted([busy.revision, quick.revision])


async def assert_no_key(kv: Client, op_id: str) -> None:
    assert op_id not in await live_ids(kv)


async def test_a_snapshot_the_guarded_upsert_refused_is_not_removed_from_the_bucket(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    op = await client.create("orders")
    live = (await client.cancel(op.id, reason="test")).operation
    # The archive holds a newer revision of this very id from this very bucket (written by
    # another archiver, a restored backup...): the live snapshot is refused, so it must stay.
    info = await client._open_store().info()
    assert info.created is not None
    async with ArchiveStore.open(archiver_settings.database_url) as store:
        source = await store.register_source(client.settings.bucket, info.created)
        newer = msgspec.structs.replace(live, revision=live.revision + 1000, status=OpStatus.SUCCEEDED)
        await store.write([row_for(newer, datetime.now(UTC), source)])
    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.archived == 0 and counts.duplicates == 1
    assert counts.removed == 0  # neither after the commit nor by the end-of-burst sweep
    assert (await client.get(op.id)).revision == live.revision


async def test_a_commit_survives_a_postgres_crash_right_after_it_although_the_server_commits_asynchronously(
    client: Client, archiver_settings: ArchiverSettings, tmp_path: Path
) -> None:
    # synchronous_commit = off, as `kvstate up` runs it, and a WAL writer that waits 10 s:
    # a commit acknowledged but not yet written is lost when every PostgreSQL process dies.
    pg = PostgresServer(tmp_path / "pg", settings={"synchronous_commit": "off", "wal_writer_delay": "10000ms"})
    pg.start()
    try:
        conn = await asyncpg.connect(pg.dsn("postgres"))
        await conn.execute("CREATE DATABASE archive")
        await conn.close()
        settings = dataclasses.replace(archiver_settings, database_url=pg.dsn("archive"))
        async with Archiver(settings) as archiver:
            await archiver.run(burst=True)  # migrated, consumer created, nothing to archive yet
        op = await client.create("orders")
        await client.cancel(op.id, reason="test")
        crashed: list[int] = []

        async def crash_postgres(messages: Sequence[FeedMessage]) -> None:
            assert pg.proc is not None
            os.killpg(pg.proc.pid, signal.SIGKILL)  # the whole server, as a power cut would
            pg.proc.wait(10)
            crashed.append(len(messages))

        async with Archiver(settings, hooks=ArchiverHooks(after_commit=crash_postgres)) as archiver:
            task = asyncio.create_task(archiver.run())
            await eventually(_true(lambda: archiver.totals.removed == 1), 20, "the removal after the commit")
            archiver.stop()
            await asyncio.wait_for(task, 20)
        assert crashed == [1]
        pg.start()
        rows = await _rows_of(settings.database_url, op.id)
        assert [r["status"] for r in rows] == ["cancelled"], "removed from the bucket and lost by PostgreSQL"
        await assert_exactly_once(client, settings.database_url, [op.id])
    finally:
        pg.stop()


def _true(check: object) -> object:
    async def wrapped() -> bool:
        return bool(check())  # type: ignore[operator]

    return wrapped
