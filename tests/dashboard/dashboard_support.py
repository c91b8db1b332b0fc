"""Helpers shared by the dashboard tests (imported as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from litestar import Litestar
from litestar.testing import AsyncTestClient

from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from dashboard.contexts import DashboardState
from kvstate import Client, OperationNotFound


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (the index follows the bucket asynchronously)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def state_of(app: Litestar) -> DashboardState:
    state: DashboardState = app.state.dashboard
    return state


async def populate(client: Client, count: int = 24, prefix: str = "") -> list[str]:
    """Operations in a spread of states (created through the real client): for pages worth looking at."""
    ids = []
    for i in range(count):
        op = await client.create(
            "orders",
            op_id=f"{prefix}op{i:03d}" if prefix else None,
            metadata={"customer": f"c{i % 5}", "amount": 10 * i},
        )
        ids.append(op.id)
        kind = i % 6
        await client.start(op.id, "ingest", worker=f"ingest-{i % 2}")
        if kind == 0:
            continue
        await client.succeed(op.id, "ingest", metadata={"bytes": 100 + i})
        await client.start(op.id, "validate", worker="validate-1")
        if kind == 1:
            continue
        if kind == 2:
            await client.fail(
                op.id, "validate", "schema check failed: field 'total' missing", retryable=False, code="E_SCHEMA"
            )
            continue
        await client.succeed(op.id, "validate")
        for stage in ("geo", "fraud"):
            await client.start(op.id, stage, worker=f"{stage}-1")
        if kind == 3:
            await client.fail(op.id, "geo", "upstream timeout", retryable=True)
            continue
        for stage in ("geo", "fraud"):
            await client.succeed(op.id, stage, metadata={"score": i})
        await client.skip(op.id, "profile", reason="no profile service")
        await client.start(op.id, "merge", worker="merge-1")
        if kind == 4:
            continue
        await client.succeed(op.id, "merge")
        await client.skip(op.id, "notify", reason="customer opted out")
    return ids


async def csrf_token(http: AsyncTestClient[Litestar]) -> str:
    """A CSRF token (and its cookie, kept by ``http``) for writes without a bearer token."""
    response = await http.get("/api/csrf")
    assert response.status_code == 200
    token = response.json()["csrf_token"]
    assert http.cookies.get("csrftoken")
    return str(token)


async def archived_operations(client: Client, database_url: str) -> dict[str, str]:
    """One succeeded, one failed and one cancelled operation, archived by the real archiver and removed from
    the bucket; their ids by status."""
    ids = {}
    for status in ("succeeded", "failed", "cancelled"):
        op = await client.create("orders", metadata={"customer": f"{status}-c", "tier": 2})
        ids[status] = op.id
        if status == "cancelled":
            await client.cancel(op.id, reason="test")
            continue
        await client.start(op.id, "ingest")
        if status == "failed":
            await client.fail(op.id, "ingest", "bad bytes", retryable=False)
            continue
        await client.succeed(op.id, "ingest")
        for stage in ("validate", "geo", "fraud", "merge"):
            if stage in ("geo", "fraud"):
                continue
            if stage == "merge":
                for parallel in ("geo", "fraud"):
                    await client.start(op.id, parallel)
                    await client.succeed(op.id, parallel)
                await client.skip(op.id, "profile")
            await client.start(op.id, stage)
            await client.succeed(op.id, stage)
        await client.skip(op.id, "notify")
    archiver_settings = ArchiverSettings(
        kv=client.settings,
        database_url=database_url,
        grace_period=0.0,
        batch_timeout=0.05,
        ack_wait=2.0,
        metrics_port=0,
    )
    async with Archiver(archiver_settings) as archiver:
        await archiver.run(burst=True)
    for op_id in ids.values():
        try:
            await client.get(op_id)
        except OperationNotFound:
            continue
        raise AssertionError(f"{op_id} was not archived and removed")
    return ids
