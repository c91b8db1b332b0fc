"""Every failure of issue 3 on real servers: no finished operation lost, none archived twice.

Each test ends with ``assert_exactly_once``: one row per finished operation, no row
missing, no extra row, and every archived operation gone from the bucket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
from archiver_support import (
    assert_exactly_once,
    eventually,
    fetch_rows,
    finished_ops,
    live_ids,
    row_count,
    start_archiver,
    stop_child,
    succeed_all,
)

from archiver.read import ArchiveReader
from archiver.settings import ArchiverSettings
from archiver.worker import Archiver, ArchiverHooks
from devstack.servers import NatsServer, PostgresServer
from kvstate import BucketNotFound, Client, FeedMessage, OpStatus, Settings

pytestmark = pytest.mark.slow


class SimulatedCrash(Exception):
    """Raised by a test hook to stop the archiver at a chosen point."""


async def test_sigkill_mid_batch_then_restart_archives_each_operation_exactly_once(
    client: Client, archiver_settings: ArchiverSettings, tmp_path: Path
) -> None:
    settings = dataclasses.replace(archiver_settings, batch_size=20)
    first = await finished_ops(client, 600)
    proc = start_archiver(settings, tmp_path / "archiver.log")
    try:
        more = asyncio.create_task(finished_ops(client, 600))
        await eventually(lambda: _at_least(settings.database_url, 150), 30, "the archiver to commit some batches")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        killed_at = await row_count(settings.database_url)
        ids = first + await more
    finally:
        stop_child(proc)
    assert killed_at < len(ids), "the archiver finished before it was killed"

    async with Archiver(settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.archived == len(ids) - killed_at
    await assert_exactly_once(client, settings.database_url, ids)


async def _at_least(dsn: str, rows: int) -> bool:
    return await row_count(dsn) >= rows


async def test_crash_after_commit_before_ack_is_redelivered_as_duplicates(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    ids = await finished_ops(client, 250)
    committed: list[int] = []

    async def crash_on_second_batch(messages: Sequence[FeedMessage]) -> None:
        committed.append(len(messages))
        if len(committed) == 2:
            raise SimulatedCrash("after commit, before ack")

    with pytest.raises(SimulatedCrash):
        async with Archiver(archiver_settings, hooks=ArchiverHooks(after_commit=crash_on_second_batch)) as archiver:
            await archiver.run(burst=True)
    rows_after_crash = await row_count(archiver_settings.database_url)
    assert 0 < rows_after_crash < len(ids)

    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.duplicates > 0  # the committed, unacknowledged batch came back
    assert counts.archived == len(ids) - rows_after_crash
    await assert_exactly_once(client, archiver_settings.database_url, ids)


async def test_postgres_stopped_and_started_during_a_run_loses_nothing(
    client: Client, archiver_settings: ArchiverSettings, tmp_path: Path
) -> None:
    pg = PostgresServer(tmp_path / "pg", settings={"fsync": "off"})
    pg.start()
    try:
        conn = await asyncpg.connect(pg.dsn("postgres"))
        await conn.execute("CREATE DATABASE archive")
        await conn.close()
        settings = dataclasses.replace(archiver_settings, database_url=pg.dsn("archive"))
        async with Archiver(settings) as archiver:
            task = asyncio.create_task(archiver.run())
            ids = await finished_ops(client, 100)
            await eventually(lambda: _at_least(settings.database_url, 100), 20, "the first 100 rows")

            await asyncio.to_thread(pg.stop)
            ids += await finished_ops(client, 100)
            await eventually(_async(lambda: archiver.totals.failed_batches > 0), 20, "a refused batch")
            assert archiver.health()["database"] is False
            assert len(await live_ids(client)) == 100  # nothing removed while nothing was archived

            await asyncio.to_thread(pg.start)
            await eventually(lambda: _at_least(settings.database_url, 200), 30, "recovery after PostgreSQL returned")
            await eventually(_bucket_without(client, ids), 20, "removal of the archived operations")
            assert archiver.health()["database"] is True
            archiver.stop()
            await asyncio.wait_for(task, 10)
        await assert_exactly_once(client, settings.database_url, ids)
    finally:
        pg.stop()


def _async(check: object) -> object:
    async def wrapped() -> bool:
        return bool(check())  # type: ignore[operator]

    return wrapped


def _bucket_without(client: Client, ids: list[str]) -> object:
    async def check() -> bool:
        return not (await live_ids(client)) & set(ids)

    return check


async def test_duplicate_delivery_changes_nothing(client: Client, archiver_settings: ArchiverSettings) -> None:
    settings = dataclasses.replace(archiver_settings, grace_period=3600)  # keep them in the bucket
    ids = await finished_ops(client, 60)
    async with Archiver(settings) as archiver:
        assert (await archiver.run(burst=True)).archived == 60
    before = {r["id"]: r["archived_at"] for r in await fetch_rows(settings.database_url)}

    # Forget the consumer: every message is delivered again from the start of the stream.
    await client._open_store().js.delete_consumer(client._open_store().config.stream, settings.consumer)
    async with Archiver(settings) as archiver:
        replay = await archiver.run(burst=True)
    assert replay.archived == 0 and replay.duplicates == 60
    after = {r["id"]: r["archived_at"] for r in await fetch_rows(settings.database_url)}
    assert after == before  # not rewritten
    assert set(after) == set(ids)


async def test_a_consumer_deleted_under_a_running_archiver_is_created_again(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    settings = dataclasses.replace(archiver_settings, batch_timeout=0.05)
    async with Archiver(settings) as archiver:
        task = asyncio.create_task(archiver.run())
        ids = await finished_ops(client, 20)
        await eventually(lambda: _at_least(settings.database_url, 20), 20, "the first rows")

        await client._open_store().js.delete_consumer(client._open_store().config.stream, settings.consumer)
        ids += await finished_ops(client, 20)
        await eventually(lambda: _at_least(settings.database_url, 40), 30, "archiving with the new consumer")
        await eventually(_bucket_without(client, ids), 20, "removal with the new consumer")
        archiver.stop()
        await asyncio.wait_for(task, 10)
    errors = archiver.metrics.registry.get_sample_value("kvstate_archiver_errors_total", {"component": "nats"})
    assert errors is not None and errors >= 1  # the loss was noticed, not silent
    await assert_exactly_once(client, settings.database_url, ids)


async def test_garbage_values_are_dead_lettered_and_the_archiver_goes_on(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    ids = await finished_ops(client, 30)
    js, subject = client._open_store().js, client._open_store().subject
    stored = await client.raw(ids[0])
    assert stored is not None
    garbage = await js.publish(subject("op.garbage"), b"\x00\x01 not json at all")
    mismatch = await js.publish(subject("op.mismatch"), stored[1])  # a valid operation under the wrong key
    ids += await finished_ops(client, 30)

    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.dead_letters == 2 and counts.archived == 60
    await assert_exactly_once(client, archiver_settings.database_url, ids)
    conn = await asyncpg.connect(archiver_settings.database_url)
    try:
        letters = {r["key"]: r for r in await conn.fetch("SELECT * FROM archive_dead_letters")}
    finally:
        await conn.close()
    assert set(letters) == {"op.garbage", "op.mismatch"}
    assert letters["op.garbage"]["raw"] == b"\x00\x01 not json at all"
    assert letters["op.garbage"]["revision"] == garbage.seq
    assert letters["op.mismatch"]["revision"] == mismatch.seq
    assert "key says" in letters["op.mismatch"]["error"]
    assert letters["op.garbage"]["error"]


async def test_an_update_between_snapshot_and_delete_keeps_the_operation_and_archives_it_again(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    op = await client.create("orders")
    final = await succeed_all(client, op.id)
    touched: list[int] = []
    hooked: list[str] = []

    async def reopen_first(op_id: str, revision: int) -> None:
        if not hooked:  # lands after the snapshot was committed, before the delete
            hooked.append(op_id)
            result = await client.reopen(op_id, ["notify"])
            touched.append(result.revision)

    async with Archiver(archiver_settings, hooks=ArchiverHooks(before_remove=reopen_first)) as archiver:
        first = await archiver.run(burst=True)
    # refused by the revision check (the end-of-burst sweep may try once more, and be refused too)
    assert first.archived == 1 and first.remove_conflicts >= 1 and first.removed == 0
    live = await client.get(op.id)  # the delete did not happen
    assert live.revision == touched[0] > final.revision and live.status is OpStatus.RUNNING

    again = (await client.succeed(op.id, "notify", metadata={"late": "note"})).operation
    async with Archiver(archiver_settings) as archiver:
        second = await archiver.run(burst=True)
    assert second.archived == 1 and second.removed == 1
    async with ArchiveReader.connect(archiver_settings.database_url) as archive:
        item = await archive.get(op.id)
    assert item is not None and item.revision == again.revision
    assert item.operation.stages["notify"].metadata == {"late": "note"}
    await assert_exactly_once(client, archiver_settings.database_url, [op.id])


async def test_a_reopened_operation_is_archived_again_with_the_newer_revision(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    keep = dataclasses.replace(archiver_settings, grace_period=3600)
    op = await client.create("orders")
    first = await succeed_all(client, op.id)
    async with Archiver(keep) as archiver:
        assert (await archiver.run(burst=True)).archived == 1

    await client.reopen(op.id, ["merge"])
    async with Archiver(keep) as archiver:
        running = await archiver.run(burst=True)
    assert running.archived == 0 and running.skipped == 1  # running again: nothing written
    await client.start(op.id, "merge", worker="w2")
    await client.succeed(op.id, "merge", worker="w2")
    second = (await client.skip(op.id, "notify")).operation
    assert second.status is OpStatus.SUCCEEDED and second.revision > first.revision

    async with Archiver(archiver_settings) as archiver:  # grace 0 now: archived, then removed
        counts = await archiver.run(burst=True)
    assert counts.archived == 1 and counts.removed == 1
    async with ArchiveReader.connect(archiver_settings.database_url) as archive:
        item = await archive.get(op.id)
    assert item is not None and item.revision == second.revision
    assert item.operation.stages["merge"].worker == "w2"
    assert len(item.operation.history) > len(first.history)
    await assert_exactly_once(client, archiver_settings.database_url, [op.id])


async def test_nats_restart_reconnects_and_resumes(private_nats: NatsServer, database_url: str, client: Client) -> None:
    pipeline = await client.pipeline("orders")  # the test pipeline, from the session server
    kv = Settings(nats_url=private_nats.url, bucket="ops")
    settings = ArchiverSettings(kv=kv, database_url=database_url, grace_period=0, batch_timeout=0.05, metrics_port=0)
    async with Client(kv, create_bucket=True) as private:
        await private.set_pipeline(pipeline)
        async with Archiver(settings) as archiver:
            task = asyncio.create_task(archiver.run())
            ids = await finished_ops(private, 50)
            await eventually(lambda: _at_least(database_url, 50), 20, "the first rows")

            await asyncio.to_thread(private_nats.restart)
            await eventually(_async(lambda: private.connected and archiver.client.connected), 20, "reconnection")
            ids += await finished_ops(private, 50)
            await eventually(lambda: _at_least(database_url, 100), 30, "archiving after the restart")
            await eventually(_bucket_without(private, ids), 20, "removal after the restart")
            archiver.stop()
            await asyncio.wait_for(task, 10)
        await assert_exactly_once(private, database_url, ids)


async def test_the_archiver_waits_for_a_missing_bucket_and_never_creates_it(
    client: Client, archiver_settings: ArchiverSettings, caplog: pytest.LogCaptureFixture
) -> None:
    kv = dataclasses.replace(archiver_settings.kv, bucket=archiver_settings.kv.bucket + "later")
    settings = dataclasses.replace(archiver_settings, kv=kv)
    archiver = Archiver(settings)

    async def archive() -> int:
        async with archiver:
            return (await archiver.run()).archived

    task = asyncio.create_task(archive())
    await eventually(_async(lambda: "does not exist" in caplog.text), 10, "the archiver to say it waits")
    await asyncio.sleep(1.0)  # a few retries
    assert not task.done()
    assert archiver.health()["nats"] is False
    with pytest.raises(BucketNotFound):  # waiting did not create it
        async with Client(kv):
            pass

    async with Client(kv, create_bucket=True) as late:
        await late.set_pipeline(await client.pipeline("orders"))
        ids = await finished_ops(late, 20)
        await eventually(lambda: _at_least(settings.database_url, 20), 30, "archiving once the bucket exists")
        archiver.stop()
        assert await asyncio.wait_for(task, 10) == 20
        await assert_exactly_once(late, settings.database_url, ids)


async def test_an_archiver_stopped_while_it_waits_for_the_bucket_exits_cleanly(
    archiver_settings: ArchiverSettings,
) -> None:
    kv = dataclasses.replace(archiver_settings.kv, bucket=archiver_settings.kv.bucket + "never")
    archiver = Archiver(dataclasses.replace(archiver_settings, kv=kv))

    async def archive() -> int:
        async with archiver:
            return (await archiver.run()).archived

    task = asyncio.create_task(archive())
    await asyncio.sleep(0.5)
    archiver.stop()
    assert await asyncio.wait_for(task, 10) == 0


async def test_sigterm_stops_the_archiver_with_exit_0(
    client: Client, archiver_settings: ArchiverSettings, tmp_path: Path
) -> None:
    from devstack.servers import free_port

    port = free_port()
    settings = dataclasses.replace(archiver_settings, metrics_port=port)
    proc = start_archiver(settings, tmp_path / "archiver.log")
    try:
        await eventually(lambda: _healthy(port), 20, "the archiver's /healthz")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        stop_child(proc)
    log = (tmp_path / "archiver.log").read_text()
    assert "archiver stopped" in log
    assert "Traceback" not in log


async def _healthy(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.startswith(b"HTTP/1.0 200")


async def test_stream_stays_bounded_while_operations_keep_flowing(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    settings = dataclasses.replace(archiver_settings, marker_ttl=1.0)
    counts: list[int] = []
    total = 0
    async with Archiver(settings) as archiver:
        task = asyncio.create_task(archiver.run())
        loop = asyncio.get_running_loop()
        until = loop.time() + 6.0
        while loop.time() < until and total < 3000:
            total += len(await finished_ops(client, 40, concurrency=40))
            counts.append((await client._open_store().info()).state.messages)
            await asyncio.sleep(0.05)

        async def drained() -> bool:
            # only the pipeline definition is left once the last markers expired
            return (await client._open_store().info()).state.messages <= 1

        await eventually(drained, 15, "the removal markers to expire")
        archiver.stop()
        await asyncio.wait_for(task, 10)
    assert total >= 400
    # without expiry every removed key would leave a marker: at least `total` messages by the end
    assert max(counts) < 0.75 * total, (max(counts), total)
    assert await row_count(settings.database_url) == total


async def test_metrics_and_health_endpoint(client: Client, archiver_settings: ArchiverSettings) -> None:
    import httpx

    from devstack.servers import free_port

    settings = dataclasses.replace(archiver_settings, metrics_port=free_port())
    await finished_ops(client, 7)
    async with Archiver(settings) as archiver:
        await archiver.run(burst=True)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.metrics_port}") as http:
            metrics = (await http.get("/metrics")).text
            health = await http.get("/healthz")
            missing = await http.get("/nope")
    assert "kvstate_archiver_archived_total 7.0" in metrics
    assert "kvstate_archiver_removed_total 7.0" in metrics
    assert "kvstate_archiver_lag_messages 0.0" in metrics
    assert "kvstate_archiver_batches_total" in metrics
    assert "kvstate_archiver_nats_up 1.0" in metrics  # read before any /healthz call
    assert health.status_code == 200 and health.json()["ok"] is True
    assert missing.status_code == 404
