"""A demo service under kvstate errors, on real servers: transient errors never lose the
message or the result of work done, permanent ones drop the message once, with a log line.

Each test runs one ``StageWorker`` (no supervisor, so nothing but the worker itself can
rescue an update) against a bucket and a work stream of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from demo.orders import random_order
from demo.queue import WorkItem, WorkQueue, close, connect
from demo.runner import load_pipeline
from demo.services import SERVICES, Service
from demo.settings import DemoSettings
from demo.stats import DemoStats
from demo.worker import Router, StageWorker
from devstack.servers import NatsServer
from kvstate import Client, KvstateError, Operation, Settings, StageStatus

PIPELINE = load_pipeline()


def slow(stage: str, seconds: float) -> Service:
    """The demo's service for ``stage``, taking exactly ``seconds`` and never failing on its own."""
    real = SERVICES[stage]
    return dataclasses.replace(real, median=seconds, sigma=0.0, transient=0.0, errors=())


def quiet(settings: DemoSettings) -> DemoSettings:
    """No simulated misbehaviour: every error the worker meets is a real one."""
    return dataclasses.replace(settings, failure_rate=0.0, stuck_rate=0.0, chaos_rate=0.0, concurrency=4)


def impatient(url: str, bucket: str) -> Settings:
    """Client settings that give up on NATS within about a second, so the worker meets the fault.

    Built from the environment mapping so ``KVSTATE_DEADLINE`` (how long one call retries
    transient failures itself) applies wherever the client reads it."""
    return Settings.from_env(
        {
            "NATS_URL": url,
            "KVSTATE_BUCKET": bucket,
            "KVSTATE_TIMEOUT": "1.0",
            "KVSTATE_DEADLINE": "1.0",
            "KVSTATE_MAX_RETRIES": "2",
        }
    )


@dataclass
class Running:
    client: Client
    queue: WorkQueue
    stats: DemoStats


@asynccontextmanager
async def worker_running(settings: DemoSettings, service: Service) -> AsyncIterator[Running]:
    """One demo service pulling its stage's work, on a connection that reconnects forever."""
    nc = await connect(settings.kv, "test-worker")
    try:
        async with Client(settings.kv, nc=nc, create_bucket=True) as client:
            await client.set_pipeline(PIPELINE)
            queue = await WorkQueue.open(nc, settings.stream, settings.subject_prefix)
            stats = DemoStats()
            worker = StageWorker(
                client, queue, Router(queue, PIPELINE, settings), PIPELINE, service, settings, stats, random.Random(1)
            )
            stopping = asyncio.Event()
            task = asyncio.get_running_loop().create_task(worker.run(stopping))
            try:
                yield Running(client, queue, stats)
            finally:
                stopping.set()
                await asyncio.wait_for(task, timeout=15.0)
    finally:
        await close(nc)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` every 0.1 s until it holds; fail after ``timeout`` seconds. Errors count as "not yet"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if await check():
                return
        except KvstateError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {timeout:g}s: {what}")


async def new_order(settings: Settings) -> Operation:
    """An operation created by another process (so the worker's client has nothing cached)."""
    async with Client(settings, create_bucket=True) as other:
        await other.set_pipeline(PIPELINE)
        return await other.create(PIPELINE.name, metadata={"input": random_order(random.Random(5), 1)})


@pytest.mark.timeout(90)
async def test_a_result_reported_during_a_nats_outage_lands_after_the_restart(
    private_nats: NatsServer, bucket_name: str
) -> None:
    """The server stops while ingest runs, so its success report fails past the client's
    deadline. The worker must not give the result up: it retries the report with the same
    event id and it lands once the server is back: one attempt, succeeded, next step queued."""
    kv = impatient(private_nats.url, bucket_name)
    settings = quiet(DemoSettings(kv=kv, stream=f"W_{bucket_name}", subject_prefix=f"w.{bucket_name}"))
    op = await new_order(kv)
    async with worker_running(settings, slow("ingest", 2.0)) as run:
        await run.queue.publish(WorkItem(op=op.id, stage="ingest"))

        async def running() -> bool:
            return (await run.client.get(op.id)).stage("ingest").status is StageStatus.RUNNING

        await eventually(running, 10.0, "ingest started")
        await asyncio.to_thread(private_nats.stop)  # while the attempt runs: its report meets the outage
        await asyncio.sleep(3.5)
        await asyncio.to_thread(private_nats.start)

        async def succeeded() -> bool:
            return (await run.client.get(op.id)).stage("ingest").status is StageStatus.SUCCEEDED

        await eventually(succeeded, 40.0, "ingest's success landed after the restart")

        async def only_the_next_step_left() -> bool:
            return await run.queue.pending() == 1  # ingest's message acknowledged, validate's queued

        await eventually(only_the_next_step_left, 10.0, "ingest acknowledged and validate queued")
        done = await run.client.get(op.id)
        ingest = [(e.from_, e.to, e.attempt) for e in done.history if e.stage == "ingest"]
        assert ingest == [("waiting", "running", 1), ("running", "succeeded", 1)]
        assert done.stage("ingest").metadata["lines"] == len(op.metadata["input"]["items"])  # type: ignore[index,arg-type]
        assert run.stats.transient >= 1  # the outage was met, and retried rather than dropped
        assert (run.stats.rejected, run.stats.errors) == (0, 0)


async def test_work_is_not_dropped_while_the_bucket_is_missing(demo_settings: DemoSettings) -> None:
    """A BucketError after the service opened the bucket (here: the stream deleted and then
    re-created by an operator) is transient: the message is handed back with a delay, again
    and again, and handled once the bucket is back."""
    settings = dataclasses.replace(
        quiet(demo_settings), kv=impatient(demo_settings.kv.nats_url, demo_settings.kv.bucket)
    )
    op = await new_order(settings.kv)
    async with worker_running(settings, slow("ingest", 0.05)) as run:
        nc = await connect(settings.kv, "test-operator")
        try:
            await nc.jetstream().delete_stream(f"KV_{settings.kv.bucket}")
            await run.queue.publish(WorkItem(op=op.id, stage="ingest"))

            async def redelivered() -> bool:
                info = await nc.jetstream().consumer_info(settings.stream, "demo-ingest")
                return info.num_redelivered >= 1 and run.stats.transient >= 2

            await eventually(redelivered, 20.0, "the message handed back and redelivered while the bucket is missing")
            assert await run.queue.pending() == 1  # not acknowledged: still queued
            restored = await new_order_with_id(settings.kv, op)
            assert restored.stage("ingest").status is StageStatus.WAITING
        finally:
            await close(nc)

        async def succeeded() -> bool:
            return (await run.client.get(op.id)).stage("ingest").status is StageStatus.SUCCEEDED

        await eventually(succeeded, 30.0, "ingest ran once the bucket was back")
        assert (run.stats.rejected, run.stats.errors) == (0, 0)


async def new_order_with_id(settings: Settings, op: Operation) -> Operation:
    """Re-create the bucket and the operation under its old id (what restoring a bucket does)."""
    async with Client(settings, create_bucket=True) as operator:
        await operator.set_pipeline(PIPELINE)
        return await operator.create(PIPELINE.name, op_id=op.id, metadata=op.metadata)


async def test_a_permanent_error_drops_the_message_once_with_its_reason(
    demo_settings: DemoSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Work that kvstate refuses for good (merge before its dependencies: InvalidTransition;
    an operation that does not exist: OperationNotFound) is terminated, counted and logged
    once; it is not redelivered, and the service goes on with its other work."""
    settings = quiet(demo_settings)
    op = await new_order(settings.kv)
    caplog.set_level(logging.WARNING, logger="demo.worker")
    async with worker_running(settings, slow("merge", 0.05)) as run:
        early = WorkItem(op=op.id, stage="merge")
        missing = WorkItem(op="no-such-operation", stage="merge")
        for item in (early, missing):
            await run.queue.publish(item)

        async def both_rejected() -> bool:
            return run.stats.rejected == 2 and await run.queue.pending() == 0

        await eventually(both_rejected, 15.0, "both messages rejected and gone from the queue")
        await asyncio.sleep(2.0)  # long enough for a redelivery of a nak'ed message
        assert run.stats.rejected == 2
        assert (run.stats.transient, run.stats.errors) == (0, 0)
        for item, error in ((early, "InvalidTransition"), (missing, "OperationNotFound")):
            lines = [r.getMessage() for r in caplog.records if item.key in r.getMessage()]
            assert len(lines) == 1, lines
            assert "rejected for good" in lines[0] and error in lines[0], lines[0]
        assert (await run.client.get(op.id)).stage("merge").status is StageStatus.WAITING
