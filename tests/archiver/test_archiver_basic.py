"""The happy path: finished operations archived once, removed from the bucket, readable back."""

from __future__ import annotations

import dataclasses

import msgspec
from archiver_support import assert_exactly_once, fail_at_ingest, finished_ops, succeed_all

from archiver.read import ArchiveReader
from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from kvstate import Client


async def test_burst_archives_every_finished_operation_once_and_removes_it(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    ids = await finished_ops(client, 120)
    running = await client.create("orders")
    await client.start(running.id, "ingest", worker="w")

    async with Archiver(archiver_settings) as archiver:
        counts = await archiver.run(burst=True)

    assert counts.archived == 120
    assert counts.duplicates == 0
    assert counts.removed == 120
    assert counts.skipped > 0  # creations, stage updates and the running operation
    await assert_exactly_once(client, archiver_settings.database_url, ids)
    assert (await client.get(running.id)).status == "running"  # never archived, never removed


async def test_archived_snapshot_reads_back_as_the_final_operation(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    op = await client.create("orders", metadata={"customer": 42, "tags": ["a", "b"]})
    final = await succeed_all(client, op.id)
    failed = await fail_at_ingest(client, (await client.create("orders")).id)

    async with Archiver(archiver_settings) as archiver:
        await archiver.run(burst=True)

    async with ArchiveReader.connect(archiver_settings.database_url) as archive:
        item = await archive.get(op.id)
        bad = await archive.get(failed.id)
        missing = await archive.get("nope")
    assert item is not None and bad is not None and missing is None
    assert item.status == "succeeded" and item.failed_stage is None
    assert item.revision == final.revision
    assert item.duration == final.duration
    expected = msgspec.structs.replace(final, events=[])  # the event-id window is not archived
    assert item.operation == expected
    assert bad.status == "failed" and bad.failed_stage == "ingest"
    assert bad.operation.stages["ingest"].error is not None
    assert bad.operation.stages["ingest"].error.code == "E_INPUT"


async def test_the_sweep_leaves_no_consumer_behind(client: Client, archiver_settings: ArchiverSettings) -> None:
    """A lingering last-per-subject consumer makes nats-server recount every key on each purge."""
    ids = await finished_ops(client, 20)
    stream = client._open_store().config.stream
    async with Archiver(dataclasses.replace(archiver_settings, grace_period=3600)) as archiver:
        await archiver.run(burst=True)  # archived, not removed: the grace period is not over
        consumers = {c.name for c in await client._open_store().js.consumers_info(stream)}
        assert consumers == {archiver_settings.consumer}
        assert await archiver.sweep() == 0  # still within the grace period
        archiver.settings = dataclasses.replace(archiver.settings, grace_period=0)
        assert await archiver.sweep() == 20
        consumers = {c.name for c in await client._open_store().js.consumers_info(stream)}
        assert consumers == {archiver_settings.consumer}
    await assert_exactly_once(client, archiver_settings.database_url, ids)
