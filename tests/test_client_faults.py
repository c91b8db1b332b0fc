"""Faults with real processes: several writer processes, a nats-server restart under a watch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from nats.js.api import PersistMode

from devstack.servers import NatsServer
from kvstate import (
    BucketError,
    BucketNotFound,
    Client,
    ConnectionLostError,
    Outcome,
    Settings,
    StageStatus,
    WaitTimeout,
)
from kvstate.watch import Watcher
from tests.conftest import PIPELINE

WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    from kvstate import Client, Settings

    async def main(url, bucket, tag, ids, start_at):
        async with Client(Settings(nats_url=url, bucket=bucket, max_retries=200)) as kv:
            await asyncio.sleep(max(0.0, start_at - time.time()))  # all writers start together
            for i in range(25):
                await asyncio.gather(*(kv.merge_metadata(op_id, {f"{tag}-{i}": i}) for op_id in ids))
            print(kv.stats["conflicts"])

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), float(sys.argv[5])))
    """
)


async def test_several_processes_updating_the_same_operations_lose_nothing(client: Client, settings: Settings) -> None:
    ops = [await client.create("orders") for _ in range(4)]
    ids = ",".join(op.id for op in ops)
    start_at = str(time.time() + 2.0)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            settings.nats_url,
            settings.bucket,
            f"p{n}",
            ids,
            start_at,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(3)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outputs]
    conflicts = sum(int(o[0].decode().split()[-1]) for o in outputs)
    expected = {f"p{n}-{i}": i for n in range(3) for i in range(25)}
    for op in ops:
        assert (await client.get(op.id)).metadata == expected
    assert conflicts > 0  # the processes did collide; compare-and-set resolved every collision


@pytest.mark.slow
async def test_watch_survives_a_nats_server_restart(private_nats: NatsServer, bucket_name: str) -> None:
    # history 10: the bucket keeps every revision, so the test can compare what the watch saw with them
    settings = Settings(nats_url=private_nats.url, bucket=bucket_name, timeout=2.0, history=10)
    async with Client(settings, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create("orders")
        seen: list[int] = []
        async with kv.watch(op.id) as changes:

            async def collect() -> None:
                async for change in changes:
                    seen.append(change.revision)
                    done = change.operation is not None and change.operation.stage("validate").status
                    if done is StageStatus.SUCCEEDED:
                        return

            collector = asyncio.create_task(collect())
            await kv.start(op.id, "ingest")
            await asyncio.sleep(0.3)
            await asyncio.to_thread(private_nats.restart)
            # Writes land while the watch's consumer is gone with the old server process.
            await _retry(lambda: kv.succeed(op.id, "ingest"))
            await _retry(lambda: kv.start(op.id, "validate"))
            await _retry(lambda: kv.succeed(op.id, "validate"))
            await asyncio.wait_for(collector, 30)
        history = [r.revision for r in await kv.history(op.id)]
    assert len(history) == 5 < settings.history  # every revision is still in the stream
    assert seen == history, "each revision exactly once, in order: no gap, no duplicate"


async def _retry(call, attempts: int = 50):  # type: ignore[no-untyped-def]
    from kvstate import ConnectionLostError

    for _ in range(attempts):
        try:
            return await call()
        except ConnectionLostError:
            await asyncio.sleep(0.2)
    return await call()


async def test_remove_many_reports_no_stream_leader_for_each_pair(nats_server: NatsServer, bucket_name: str) -> None:
    """A pipelined removal nobody answered is reported per pair, as a transient (the archiver's sweep retries it)."""
    settings = Settings(nats_url=nats_server.url, bucket=bucket_name, timeout=2.0)
    async with Client(settings, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        ops = [await kv.create("orders") for _ in range(3)]
        await kv._open_store().js.delete_stream(kv._open_store().config.stream)
        results = await kv.remove_many([(op.id, op.revision) for op in ops])
    assert [type(r).__name__ for r in results] == ["ConnectionLostError"] * 3


async def test_a_write_with_no_stream_leader_retries_until_the_deadline_then_connection_lost(
    settings: Settings,
) -> None:
    """Once the bucket is open, "no responders" is a stream without a leader (an election):
    retried until KVSTATE_DEADLINE, then ConnectionLostError, not BucketError."""
    async with Client(
        Settings(nats_url=settings.nats_url, bucket=settings.bucket, deadline=1.0), create_bucket=True
    ) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create("orders")
        await kv._open_store().js.delete_stream(
            kv._open_store().config.stream
        )  # now nobody answers the bucket's subjects
        started = time.monotonic()
        with pytest.raises(ConnectionLostError, match="KVSTATE_DEADLINE"):
            await kv.start(op.id, "ingest")
        assert time.monotonic() - started >= 0.9


async def test_a_bucket_missing_when_the_client_opens_is_still_a_bucket_error(settings: Settings) -> None:
    with pytest.raises(BucketNotFound):
        async with Client(settings):
            pass


async def test_a_stream_that_acknowledges_before_disk_is_refused(settings: Settings) -> None:
    async with Client(settings, create_bucket=True) as kv:
        config = (await kv._open_store().info()).config
    name = settings.bucket + "async"
    async with Client(Settings(nats_url=settings.nats_url, bucket=name), create_bucket=True) as other:
        stream = other._open_store().config.stream
        await other._open_store().js.delete_stream(stream)
        await other._open_store().js.add_stream(
            config.evolve(name=stream, subjects=[f"$KV.{name}.>"], persist_mode=PersistMode.ASYNC)
        )
    with pytest.raises(BucketError, match="persist_mode"):
        async with Client(Settings(nats_url=settings.nats_url, bucket=name)):
            pass


async def test_a_watcher_blocked_on_a_full_queue_loses_no_change_when_it_resubscribes(settings: Settings) -> None:
    """A resubscribe cancels the put that waits for room in the queue: that change must be
    delivered by the new consumer, not skipped (history 64, so every revision is still there)."""
    async with Client(
        Settings(nats_url=settings.nats_url, bucket=settings.bucket, history=64), create_bucket=True
    ) as kv:
        await kv.set_pipeline(PIPELINE)
        await _watch_through_a_resubscribe(kv)


async def _watch_through_a_resubscribe(client: Client) -> None:
    op = await client.create("orders")
    watcher = Watcher(client._open_store(), op_id=op.id, include_existing=False, queue_size=1, check_interval=0.2)
    async with watcher:
        revisions = [(await client.merge_metadata(op.id, {f"k{i}": i})).revision for i in range(4)]
        await asyncio.sleep(0.5)  # one change queued, the next one's put waits for room
        sub = watcher._sub
        assert sub is not None
        info = await sub.consumer_info()
        await client._open_store().js.delete_consumer(
            client._open_store().config.stream, info.name
        )  # as a server restart would
        for _ in range(100):  # the supervisor notices within a few checks and subscribes again
            if watcher.resubscribes:
                break
            await asyncio.sleep(0.05)
        assert watcher.resubscribes == 1
        seen: list[int] = []
        async with asyncio.timeout(20):
            async for change in watcher:
                seen.append(change.revision)
                if change.revision == revisions[-1]:
                    break
    assert seen == revisions


async def test_a_write_whose_acknowledgement_was_lost_reports_applied_not_duplicate(client: Client) -> None:
    """The write lands but its ack never comes (a timeout): the re-read finds the event applied.
    That was this call's own write, so the caller hears "applied", not "duplicate"."""
    op = await client.create("orders")
    store = client._open_store()
    real_update = store.update
    lost: list[int] = []

    async def update_then_lose_the_ack(key: str, value: bytes, last: int) -> int:
        revision = await real_update(key, value, last)
        if not lost:
            lost.append(revision)
            raise ConnectionLostError("NATS did not answer in time (the acknowledgement was lost)")
        return revision

    store.update = update_then_lose_the_ack  # type: ignore[method-assign]
    try:
        result = await client.start(op.id, "ingest", event_id="only-once")
    finally:
        store.update = real_update  # type: ignore[method-assign]
    assert lost, "the fault was not injected"
    assert result.outcome is Outcome.APPLIED and result.revision == lost[0]
    assert [t.event for t in result.operation.history].count("only-once") >= 1
    again = await client.start(op.id, "ingest", event_id="only-once")
    assert again.outcome is Outcome.DUPLICATE  # a real redelivery is still a duplicate


async def test_a_stopped_watcher_leaves_no_consumer_on_the_server(client: Client) -> None:
    """Each wait() opens a watch: its consumer must go when it stops, not 60 s later."""
    stream = client._open_store().config.stream
    before = (await client._open_store().info()).state.consumer_count
    op = await client.create("orders")
    for _ in range(5):
        async with client.watch(op.id) as changes:
            async for _change in changes:
                break
    with pytest.raises(WaitTimeout):
        await client.wait(op.id, timeout=0.2)
    after = (await client._open_store().js.stream_info(stream)).state.consumer_count
    assert after == before
