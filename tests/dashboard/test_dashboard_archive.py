"""Archive pages: finished operations archived by the real archiver into the harness's PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

from litestar.testing import AsyncTestClient

from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from devstack.servers import free_port
from kvstate import Client, OperationNotFound


async def archived_operations(client: Client, database_url: str) -> dict[str, str]:
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


async def test_archive_search_and_archived_detail(
    client: Client, dashboard_settings: DashboardSettings, database_url: str
) -> None:
    ids = await archived_operations(client, database_url)
    app = create_app(replace(dashboard_settings, database_url=database_url))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        everything = (await http.get("/archive")).text
        assert all(op_id in everything for op_id in ids.values())
        failed = (await http.get("/archive", params={"status": "failed", "failed_stage": "ingest"})).text
        assert ids["failed"] in failed and ids["succeeded"] not in failed
        by_meta = (await http.get("/archive", params={"meta": "customer=succeeded-c"})).text
        assert ids["succeeded"] in by_meta and ids["failed"] not in by_meta
        by_json = (await http.get("/archive", params={"meta": "tier=2", "id": ids["cancelled"][:20]})).text
        assert ids["cancelled"] in by_json
        paged = await http.get("/archive", params={"page_token": "garbage"})
        assert paged.status_code == 400
        detail = (await http.get(f"/operations/{ids['failed']}")).text
        assert "archived" in detail and "bad bytes" in detail and "Cancel this operation" not in detail
        api = (await http.get(f"/api/operations/{ids['succeeded']}")).json()
        assert api["done"] is True and api["metadata"]["archived"] is True and "result" in api
        health = (await http.get("/healthz")).json()
        assert health["archive"] == "ok"


async def test_unreachable_archive_is_explained_not_fatal(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(replace(dashboard_settings, database_url=dead))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        page = await http.get("/archive")
        assert page.status_code == 200
        assert "cannot be searched right now" in page.text and "unreachable" in page.text
        missing = await http.get("/operations/neverexisted")
        assert missing.status_code == 404 and "archive cannot be searched" in missing.text
        assert (await http.get("/")).status_code == 200
