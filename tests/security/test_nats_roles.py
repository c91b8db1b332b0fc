"""Least privilege, as shipped: every role of deploy/nats/auth.conf does its job, and nothing else.

A real nats-server with TLS and client certificates runs the shipped file itself (included
by the test's configuration, the passwords in its environment). Each role connects the way a
deployment would (``kvstate.Settings``: user, password, CA, client certificate, the role's
inbox prefix) and does what it is for; what it is not for fails with ``PermissionDenied``,
fast: the server's violation arrives in a round trip, far inside ``KVSTATE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import pytest

from kvstate import Client, KvstateError, PermissionDenied, Pipeline, Settings, StageSpec
from kvstate._connection import Connection, SubjectDenied
from kvstate._kv import nats_errors
from kvstate.job_runner import JobRunner, JobStore
from kvstate.jobs import JobState, new_job
from kvstate.service import WriteService

RoleSettings = Callable[..., Settings]
T = TypeVar("T")
FAST = 2.0
"""seconds within which a refusal must arrive (KVSTATE_TIMEOUT is 5 s, KVSTATE_DEADLINE 10 s)"""
STREAM = "KV_operations"


@contextlib.asynccontextmanager
async def opened(settings: Settings, name: str) -> AsyncIterator[Client]:
    async with Client(settings, name=name) as client:
        yield client


async def refused(call: Callable[[], Awaitable[object]], action: str, subject_part: str) -> PermissionDenied:
    """``call()`` raises PermissionDenied for ``action`` on a subject containing ``subject_part``, within FAST."""
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as info:
        await call()
    elapsed = time.monotonic() - started
    assert elapsed < FAST, f"refused only after {elapsed:.2f}s: a timeout, not the server's violation"
    assert info.value.action == action
    assert info.value.subject is not None and subject_part.lower() in info.value.subject, info.value.subject
    return info.value


async def raw(client: Client, call: Callable[[], Awaitable[T]]) -> T:
    """A nats-py call outside kvstate's own paths, translated as kvstate translates its own."""
    with nats_errors("raw", bucket_known=True):
        return await call()


def new_id() -> str:
    return "sec" + uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- service


async def test_service_creates_updates_and_reads_operations(role_settings: RoleSettings) -> None:
    async with opened(role_settings("service"), "service") as service:
        op = await service.create("orders", op_id=new_id(), metadata={"customer": 42})
        await service.start(op.id, "ingest", worker="ingest-1")
        result = await service.succeed(op.id, "ingest", worker="ingest-1", metadata={"bytes": 10})
        assert result.operation.stages["ingest"].status.value == "succeeded"
        assert (await service.get(op.id)).revision == result.revision
        assert [p.name for p in await service.pipelines()] == ["orders"]  # a scan: an ordered consumer
        waiting = asyncio.create_task(service.wait(op.id, timeout=10))  # a watch
        await asyncio.sleep(0.2)
        await service.cancel(op.id, reason="test")
        assert (await waiting).status.value == "cancelled"


async def test_service_may_not_write_a_pipeline(role_settings: RoleSettings) -> None:
    other = Pipeline(name="evil", heartbeat_timeout=30.0, stages=(StageSpec(name="x"),))
    async with opened(role_settings("service"), "service") as service:
        denied = await refused(lambda: service.set_pipeline(other), "publish", "$kv.operations.pipeline.evil")
        assert "pipeline.evil" in str(denied)
        assert "evil" not in [p.name for p in await service.pipelines()]  # nothing was written
        # nor remove one: a removal marker is a write of the key like any other
        orders = await service._open_store().get("pipeline.orders")
        assert orders is not None
        [result] = await service._open_store().remove_many([("pipeline.orders", orders.revision)], marker_ttl=None)
        assert isinstance(result, PermissionDenied) and "pipeline.orders" in (result.subject or "")


async def test_service_may_not_open_a_change_feed_or_delete_the_archivers_consumer(role_settings: RoleSettings) -> None:
    async with opened(role_settings("service"), "service") as service:
        feed = service.feed("service-feed")
        await refused(feed.open, "publish", "$js.api.consumer.create.kv_operations.service-feed")
        js = service._open_store().js
        await refused(lambda: raw(service, lambda: js.delete_consumer(STREAM, "archiver")), "publish", ".archiver")
        await refused(lambda: raw(service, lambda: js.purge_stream(STREAM)), "publish", "stream.purge")


async def test_service_cannot_read_another_roles_replies(role_settings: RoleSettings) -> None:
    async with opened(role_settings("service"), "service") as service:
        nc = service._open_store().nc
        assert isinstance(nc, Connection)
        await nc.subscribe("_INBOX_dashboard.>")
        # Not nc.flush(): nats-py 2.16 writes its PING straight to the socket, ahead of the SUB
        # still in its buffer, so the PONG can come before the server's answer to the SUB.
        deadline = time.monotonic() + FAST
        while nc.violations.last is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert nc.violations.last is not None
        assert (nc.violations.last.action, nc.violations.last.subject) == ("subscribe", "_inbox_dashboard.>")


async def test_a_role_on_the_shared_inbox_is_told_so_at_once(role_settings: RoleSettings) -> None:
    """The deploy config gives each role its own inbox: a process left on _INBOX gets no reply at all."""
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as info:
        async with opened(role_settings("service", nats_inbox_prefix="_INBOX"), "service"):
            pass
    assert time.monotonic() - started < FAST
    assert info.value.action == "subscribe" and (info.value.subject or "").startswith("_inbox.")
    assert "NATS_INBOX_PREFIX" in str(info.value)


# ---------------------------------------------------------------- writer (kvstate serve)


async def test_writer_serves_a_service_that_only_sends_requests(role_settings: RoleSettings) -> None:
    async with (
        opened(role_settings("writer"), "writer") as writer,
        WriteService(writer),
        opened(role_settings("service"), "service") as service,
    ):
        nc = service._open_store().nc
        created = await nc.request("kvstate.operations.create.orders", b"{}", timeout=5)
        op_id = msgspec.json.decode(created.data)["operation"]["id"]
        event = msgspec.json.encode({"type": "start", "stage": "ingest", "worker": "js-1"})
        reply = await nc.request(f"kvstate.operations.apply.{op_id}", event, timeout=5)
        assert reply.headers is not None and reply.headers["Kvstate-Status"] == "OK", reply.data
        assert (await service.get(op_id)).stages["ingest"].status.value == "running"


async def test_writer_may_not_write_a_pipeline(role_settings: RoleSettings) -> None:
    other = Pipeline(name="evil", heartbeat_timeout=30.0, stages=(StageSpec(name="x"),))
    async with opened(role_settings("writer"), "writer") as writer:
        await refused(lambda: writer.set_pipeline(other), "publish", "pipeline.evil")


# ---------------------------------------------------------------- archiver


async def test_archiver_reads_its_feed_and_removes_keys(role_settings: RoleSettings) -> None:
    async with opened(role_settings("operator"), "operator") as operator:
        op = await operator.create("orders", op_id=new_id())
        done = await operator.cancel(op.id, reason="finished for the archiver")
    async with opened(role_settings("archiver"), "archiver") as archiver, archiver.feed("archiver") as feed:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 10
        while op.id not in seen and time.monotonic() < deadline:
            for message in await feed.fetch(500, timeout=1.0):
                seen[message.op_id] = message.revision
                await message.ack()
        assert seen.get(op.id) == done.revision
        assert (await feed.live_revisions())[op.id] == done.revision  # the sweep's listing consumer
        [removed] = await archiver.remove_many([(op.id, done.revision)], marker_ttl=60)
        assert isinstance(removed, int), removed
        deadline = time.monotonic() + 10
        while (marker := seen.get(op.id)) != removed and time.monotonic() < deadline:
            for message in await feed.fetch(500, timeout=1.0):  # the removal marker comes through the feed too
                seen[message.op_id] = message.revision
                await message.ack()
        assert marker == removed
        nc = archiver._open_store().nc
        floor, deadline = 0, time.monotonic() + 5
        while floor < removed and time.monotonic() < deadline:  # the consumer takes acks in its own time
            info = await raw(archiver, lambda: archiver._open_store().js.consumer_info(STREAM, "archiver"))
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            await asyncio.sleep(0.05)
        assert floor >= removed  # the acks got through (later messages may sit prefetched, unacknowledged)
        assert isinstance(nc, Connection) and nc.violations.last is None
    async with opened(role_settings("operator"), "operator") as operator:
        assert await operator._open_store().get(f"op.{op.id}") is None


async def test_archiver_may_not_watch_or_write_a_pipeline(role_settings: RoleSettings) -> None:
    other = Pipeline(name="evil", heartbeat_timeout=30.0, stages=(StageSpec(name="x"),))
    async with opened(role_settings("archiver"), "archiver") as archiver:
        await refused(lambda: archiver.set_pipeline(other), "publish", "pipeline.evil")

        async def watch() -> None:
            async with archiver.watch():
                pass

        await refused(watch, "publish", "$js.api.consumer.create.kv_operations")


# ---------------------------------------------------------------- dashboard


async def test_dashboard_reads_watches_and_cancels(role_settings: RoleSettings) -> None:
    async with opened(role_settings("operator"), "operator") as operator:
        op = await operator.create("orders", op_id=new_id())
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        assert (await dashboard.get(op.id)).status.value == "pending"
        async with dashboard.watch(op.id) as changes:
            first = await asyncio.wait_for(anext(changes), 5)
            assert first.initial and first.op_id == op.id
            result = await dashboard.cancel(op.id, reason="from the dashboard")
            assert result.operation.status.value == "cancelled"
            change = await asyncio.wait_for(anext(changes), 5)
            assert change.revision == result.revision
        history = await dashboard.history(op.id)
        assert history[-1].revision == result.revision


async def test_dashboard_creates_and_runs_a_bulk_job_a_service_cannot(role_settings: RoleSettings) -> None:
    async with opened(role_settings("operator"), "operator") as operator:
        ids = [(await operator.create("orders", op_id=new_id())).id for _ in range(3)]
    now = datetime.now(UTC)
    job = new_job(
        new_id(), "cancel", ids, now, filter="status=pending", reason="incident", max_operations=10, rate=100.0
    )
    async with opened(role_settings("service"), "service") as service:
        await refused(lambda: JobStore(service).create(job), "publish", "job.")
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        created = await JobStore(dashboard).create(job)
        final = await JobRunner(dashboard, owner="dashboard-test").run(created.id)
        assert final.state is JobState.DONE and final.counts.applied == 3
        assert all([(await dashboard.get(op_id)).status.value == "cancelled" for op_id in ids])


async def test_dashboard_may_not_delete_the_bucket_the_archivers_consumer_or_pipelines(
    role_settings: RoleSettings,
) -> None:
    other = Pipeline(name="evil", heartbeat_timeout=30.0, stages=(StageSpec(name="x"),))
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        js = dashboard._open_store().js
        await refused(lambda: dashboard.set_pipeline(other), "publish", "pipeline.evil")
        await refused(lambda: raw(dashboard, lambda: js.delete_consumer(STREAM, "archiver")), "publish", ".archiver")
        await refused(lambda: raw(dashboard, lambda: js.delete_stream(STREAM)), "publish", "stream.delete")
        await refused(lambda: raw(dashboard, lambda: js.purge_stream(STREAM)), "publish", "stream.purge")
        await refused(dashboard.feed("dashboard-feed").open, "publish", "consumer.create")
        # still usable afterwards: the refusals failed those calls only
        assert await dashboard._open_store().info()


# ---------------------------------------------------------------- operator


async def test_operator_stores_pipelines_and_manages_the_stream(role_settings: RoleSettings) -> None:
    name = "p" + uuid.uuid4().hex[:8]
    async with opened(role_settings("operator"), "operator") as operator:
        await operator.set_pipeline(Pipeline(name=name, heartbeat_timeout=30.0, stages=(StageSpec(name="x"),)))
        assert (await operator.refresh_pipeline(name)).name == name
        info = await raw(operator, lambda: operator._open_store().js.consumers_info(STREAM))
        assert isinstance(info, list)


# ---------------------------------------------------------------- the mechanism


async def test_a_refused_request_fails_with_the_subject_and_the_rest_of_the_connection_goes_on(
    role_settings: RoleSettings,
) -> None:
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        nc = dashboard._open_store().nc
        results = await asyncio.gather(
            nc.request("$JS.API.STREAM.PURGE.KV_operations", b"", timeout=5),
            nc.request("$JS.API.STREAM.INFO.KV_operations", b"", timeout=5),
            return_exceptions=True,
        )
        assert isinstance(results[0], SubjectDenied) and results[0].subject == "$js.api.stream.purge.kv_operations"
        assert not isinstance(results[1], BaseException)  # the allowed request, sent alongside, is answered


async def test_a_violation_fails_the_waiting_request_but_a_cancel_of_the_callers_own_wins(
    role_settings: RoleSettings,
) -> None:
    """The server's violation reaches a request by cancelling the task that waits on it: the
    request then raises SubjectDenied, unless its caller cancelled it too (then it is cancelled)."""
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        nc = dashboard._open_store().nc
        assert isinstance(nc, Connection)
        for also_cancelled in (False, True):
            task = asyncio.create_task(nc.request("$KV.operations.op.unanswered", b"", timeout=5))
            await asyncio.sleep(0)  # the task now waits inside the request; no reply can be read before we yield
            if also_cancelled:
                task.cancel()
            nc.violations.report(SubjectDenied("publish", "$kv.operations.op.unanswered"))
            if also_cancelled:
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(SubjectDenied):
                    await task


def test_every_kvstate_error_a_refusal_becomes_is_permission_denied() -> None:
    with pytest.raises(PermissionDenied) as info, nats_errors("pipeline.x"):
        raise SubjectDenied("publish", "$kv.operations.pipeline.x")
    assert isinstance(info.value, KvstateError) and isinstance(info.value.__cause__, SubjectDenied)
    assert info.value.subject == "$kv.operations.pipeline.x" and info.value.action == "publish"


# ---------------------------------------------------------------- the real processes, each as its role


async def test_the_archiver_archives_and_removes_as_the_archiver_role(
    role_settings: RoleSettings, database_url: str
) -> None:
    from archiver.read import ArchiveReader
    from archiver.settings import ArchiverSettings
    from archiver.worker import Archiver

    async with opened(role_settings("service"), "service") as service:
        op = await service.create("orders", op_id=new_id())
        done = await service.cancel(op.id, reason="archive me")
    settings = ArchiverSettings(
        kv=role_settings("archiver"),
        database_url=database_url,
        batch_timeout=0.05,
        grace_period=0.0,
        ack_wait=2.0,
        metrics_port=0,
    )
    async with Archiver(settings) as archiver:
        counts = await archiver.run(burst=True)
    assert counts.archived >= 1 and counts.removed >= 1, counts
    async with ArchiveReader.connect(database_url) as archive:
        archived = await archive.get(op.id)
    assert archived is not None and archived.revision == done.revision
    async with opened(role_settings("dashboard"), "dashboard") as dashboard:
        assert await dashboard._open_store().get(f"op.{op.id}") is None


async def test_the_dashboard_shows_and_cancels_as_the_dashboard_role(role_settings: RoleSettings) -> None:
    from litestar.testing import AsyncTestClient

    from dashboard.app import create_app
    from dashboard.settings import DashboardSettings

    async with opened(role_settings("service"), "service") as service:
        op = await service.create("orders", op_id=new_id())
    token = "t" * 24
    app = create_app(DashboardSettings(kv=role_settings("dashboard"), auth_token=token, secret="s" * 32))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        shown = await http.get(f"/api/operations/{op.id}")
        assert shown.status_code == 200 and shown.json()["metadata"]["status"] == "pending"
        cancelled = await http.post(
            f"/api/operations/{op.id}:cancel", json={"reason": "ops"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["metadata"]["status"] == "cancelled"


async def test_the_demos_own_connection_is_kvstates(role_settings: RoleSettings) -> None:
    from demo.errors import QueueError
    from demo.queue import close, connect

    nc = await connect(role_settings("operator"), "kvstate-demo")
    try:
        assert isinstance(nc, Connection) and nc.is_connected
    finally:
        await close(nc)
    with pytest.raises(QueueError, match="refused the credentials"):
        await connect(role_settings("operator", nats_password="wrong"), "kvstate-demo")


async def test_a_watch_of_more_than_the_flow_control_window_gets_everything(role_settings: RoleSettings) -> None:
    """A push consumer stops after about 2 MB until its client answers flow control ($JS.FC): the read set allows it."""
    tag = new_id()
    async with opened(role_settings("service"), "service") as service:
        ids = {
            (await service.create("orders", op_id=f"{tag}{i}", metadata={"blob": "x" * 120_000})).id for i in range(40)
        }
    async with opened(role_settings("dashboard"), "dashboard") as dashboard, dashboard.watch() as changes:
        seen: set[str] = set()
        async with asyncio.timeout(20):
            async for change in changes:
                seen.add(change.op_id)
                if change.last_initial:
                    break
        assert ids <= seen
        nc = dashboard._open_store().nc
        assert isinstance(nc, Connection) and nc.violations.last is None


async def test_the_feed_puts_back_what_a_watching_role_changed_in_the_archivers_consumer(
    role_settings: RoleSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role allowed to create ephemeral consumers can update any consumer by naming it in the
    legacy request's body, which no subject permission sees: the feed notices and restores it."""
    import json

    import kvstate.feed

    monkeypatch.setattr(kvstate.feed, "_VERIFY_INTERVAL", 0.2)
    async with opened(role_settings("archiver"), "archiver") as archiver, archiver.feed("archiver") as feed:
        js = archiver._open_store().js
        await feed.fetch(1000, timeout=0.3)
        await asyncio.sleep(0.25)
        await feed.fetch(1000, timeout=0.3)
        assert feed.restorations == 0  # its own settings are left alone
        tampering = {
            "name": "archiver",
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": 1_000_000_000,
            "filter_subject": "$KV.operations.op.nothing",
            "inactive_threshold": 2_000_000_000,
        }
        async with opened(role_settings("service"), "service") as service:
            body = json.dumps({"stream_name": STREAM, "config": tampering}).encode()
            reply = await service._open_store().nc.request("$JS.API.CONSUMER.CREATE.KV_operations", body, timeout=5)
            assert b'"error"' not in reply.data  # the server took it: the threat is real
            op = await service.create("orders", op_id=new_id())
        assert (await raw(archiver, lambda: js.consumer_info(STREAM, "archiver"))).config.filter_subject.endswith(
            "nothing"
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while op.id not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            for message in await feed.fetch(1000, timeout=0.3):
                seen.add(message.op_id)
                await message.ack()
        assert feed.restorations == 1 and op.id in seen
        config = (await raw(archiver, lambda: js.consumer_info(STREAM, "archiver"))).config
        assert (config.durable_name, config.filter_subject, config.ack_wait) == (
            "archiver",
            "$KV.operations.op.>",
            30.0,
        )
        assert not config.inactive_threshold  # a durable again, never deleted while the archivers are down
