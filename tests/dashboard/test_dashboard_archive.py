"""Archive pages: finished operations archived by the real archiver into the harness's PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

from dashboard_support import archived_operations
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from devstack.servers import free_port
from kvstate import Client


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
