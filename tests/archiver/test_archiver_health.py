"""Issue #10, items 5 and 6: the consumer's stall guard, /healthz that sees stalls and dead tasks,
and an acknowledgement that fails after the commit."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import httpx
import pytest
from archiver_support import assert_exactly_once, eventually, finished_ops, row_count

from archiver.settings import ArchiverSettings
from archiver.worker import Archiver, ArchiverHooks
from devstack.servers import free_port
from kvstate import Client, FeedMessage

pytestmark = pytest.mark.slow


def _holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


def _rows(dsn: str, at_least: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await row_count(dsn) >= at_least

    return check


def _sample(archiver: Archiver, name: str, labels: dict[str, str] | None = None) -> float:
    return archiver.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_a_consumer_that_stops_delivering_is_restarted_and_then_recreated(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    settings = dataclasses.replace(archiver_settings, stall_after=1.5)  # the guard acts after 0.5 s
    async with Archiver(settings) as archiver:
        task = asyncio.create_task(archiver.run())
        ids = await finished_ops(client, 10)
        await eventually(_rows(settings.database_url, 10), 20, "the first rows")

        # Deliveries stop while messages are pending: the consumer is paused on the server.
        stream = client._open_store().config.stream
        paused = await client._open_store().js.pause_consumer(stream, settings.consumer, "2099-01-01T00:00:00Z")
        assert paused.paused
        ids += await finished_ops(client, 10)
        await eventually(_rows(settings.database_url, 20), 20, "archiving once the guard acted")
        archiver.stop()
        await asyncio.wait_for(task, 10)
    stalls = "kvstate_archiver_consumer_stalls_total"
    assert _sample(archiver, stalls, {"action": "restart_pull"}) >= 1  # a new pull did not help here
    assert _sample(archiver, stalls, {"action": "recreate_consumer"}) >= 1
    info = await client._open_store().js.consumer_info(stream, settings.consumer)
    assert not info.paused
    await assert_exactly_once(client, settings.database_url, ids)


async def test_healthz_says_stalled_while_messages_wait_and_nothing_progresses(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    settings = dataclasses.replace(archiver_settings, stall_after=1.0, metrics_port=free_port())
    release = asyncio.Event()

    async def hold(messages: Sequence[FeedMessage]) -> None:
        await release.wait()  # committed, not acknowledged: the messages wait

    ids = await finished_ops(client, 5)
    async with (
        Archiver(settings, hooks=ArchiverHooks(after_commit=hold)) as archiver,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.metrics_port}") as http,
    ):
        task = asyncio.create_task(archiver.run())
        healthy = await http.get("/healthz")
        assert healthy.status_code == 200, healthy.json()

        async def reports_stalled() -> bool:
            return (await http.get("/healthz")).status_code == 503

        await eventually(reports_stalled, 15, "/healthz to report the stall")
        body = (await http.get("/healthz")).json()
        assert body["stalled"] is True and body["ok"] is False
        assert body["ack_pending"] > 0 and body["seconds_since_progress"] > 1.0
        assert body["tasks"] == {"remover": "running", "sweeper": "running", "monitor": "running", "writer": "running"}

        release.set()

        async def reports_ok() -> bool:
            return (await http.get("/healthz")).status_code == 200

        await eventually(reports_ok, 15, "/healthz to recover once acknowledgements flow")
        archiver.stop()
        await asyncio.wait_for(task, 10)
    await assert_exactly_once(client, settings.database_url, ids)


async def test_healthz_is_not_ok_once_a_task_of_the_run_died(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    settings = dataclasses.replace(archiver_settings, metrics_port=free_port())

    async def broken_remover(op_id: str, revision: int) -> None:
        raise RuntimeError("the remover breaks")

    await finished_ops(client, 3)
    async with (
        Archiver(settings, hooks=ArchiverHooks(before_remove=broken_remover)) as archiver,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.metrics_port}") as http,
    ):
        task = asyncio.create_task(archiver.run())
        await eventually(_holds(lambda: archiver.health()["tasks"].get("remover") == "dead"), 15, "the remover to die")  # type: ignore[union-attr]
        health = await http.get("/healthz")
        archiver.stop()
        await asyncio.wait_for(task, 10)
    assert health.status_code == 503
    assert health.json()["ok"] is False and health.json()["tasks"]["remover"] == "dead"
    assert health.json()["nats"] is True and health.json()["database"] is True


async def test_an_ack_that_fails_after_the_commit_is_counted_and_the_archiver_carries_on(
    client: Client, archiver_settings: ArchiverSettings
) -> None:
    ids = await finished_ops(client, 30)
    hooked: list[int] = []

    async def lose_nats(messages: Sequence[FeedMessage]) -> None:
        if not hooked:
            hooked.append(len(messages))
            await archiver.client._open_store().nc.close()  # the connection is gone between commit and ack

    archiver = Archiver(archiver_settings, hooks=ArchiverHooks(after_commit=lose_nats))
    async with archiver:
        task = asyncio.create_task(archiver.run())
        await eventually(
            _holds(lambda: _sample(archiver, "kvstate_archiver_ack_failures_total") >= 1), 15, "a failed ack"
        )
        await asyncio.sleep(1.5)  # fetches fail meanwhile; the run goes on
        assert not task.done()
        archiver.stop()
        counts = await asyncio.wait_for(task, 15)  # returns, no traceback
    assert counts.batches >= 1 and hooked
    assert _sample(archiver, "kvstate_archiver_errors_total", {"component": "nats"}) >= 1

    # The unacknowledged messages come back to the next archiver and are absorbed as duplicates.
    async with Archiver(archiver_settings) as again:
        replay = await again.run(burst=True)
    assert replay.duplicates >= 1
    await assert_exactly_once(client, archiver_settings.database_url, ids)
