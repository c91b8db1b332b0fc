"""Faults with real processes: several writer processes, a nats-server restart under a watch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from kvstate import Client, Settings, StageStatus
from kvstate.servers import NatsServer
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


async def test_remove_many_reports_a_missing_bucket_for_each_pair(nats_server: NatsServer, bucket_name: str) -> None:
    settings = Settings(nats_url=nats_server.url, bucket=bucket_name, timeout=2.0)
    async with Client(settings, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        ops = [await kv.create("orders") for _ in range(3)]
        await kv.store.js.delete_stream(kv.store.config.stream)
        results = await kv.remove_many([(op.id, op.revision) for op in ops])
    assert [type(r).__name__ for r in results] == ["BucketError"] * 3
