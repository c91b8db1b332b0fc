"""Archive pages: finished operations archived by the real archiver into the harness's PostgreSQL."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import asyncpg
import pytest
from dashboard_support import archived_operations
from litestar.testing import AsyncTestClient

from archiver.grants import DEFAULT_READER_ROLE
from dashboard.app import create_app
from dashboard.archive import READER_FALLBACK_WARNING
from dashboard.settings import DashboardSettings
from devstack.servers import PostgresServer, free_port
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


async def login_role(postgres_server: PostgresServer, *member_of: str) -> str:
    """A new LOGIN role of the shared server (trust auth), a member of ``member_of``."""
    role = "dash_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(postgres_server.dsn())
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN" + (f" IN ROLE {', '.join(member_of)}" if member_of else ""))
    finally:
        await conn.close()
    return role


async def test_archive_pages_work_through_a_read_only_role_that_postgresql_keeps_from_writing(
    client: Client, dashboard_settings: DashboardSettings, database_url: str, postgres_server: PostgresServer
) -> None:
    ids = await archived_operations(client, database_url)  # the archiver granted kvstate_reader
    role = await login_role(postgres_server, DEFAULT_READER_ROLE)
    reader_url = database_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    environ = {"DASHBOARD_DATABASE_URL": reader_url, "DATABASE_URL": database_url}
    from_env = DashboardSettings.from_env(environ)
    assert (from_env.database_url, from_env.database_url_fallback) == (reader_url, False)
    app = create_app(replace(dashboard_settings, database_url=from_env.database_url))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        everything = (await http.get("/archive")).text
        assert all(op_id in everything for op_id in ids.values())
        detail = (await http.get(f"/operations/{ids['failed']}")).text
        assert "archived" in detail and "bad bytes" in detail
        api = await http.get("/api/archive/operations", params={"status": "cancelled"})
        assert api.status_code == 200
        assert [o["name"] for o in api.json()["operations"]] == [f"operations/{ids['cancelled']}"]
        assert (await http.get("/healthz")).json()["archive"] == "ok"
    conn = await asyncpg.connect(reader_url)  # the dashboard's URL: PostgreSQL itself refuses every write
    try:
        for statement in (
            "DELETE FROM archived_operations",
            "UPDATE archived_operations SET status = 'failed'",
            "INSERT INTO archived_operations SELECT * FROM archived_operations LIMIT 1",
            "TRUNCATE archive_dead_letters",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM archived_operations") == 3
    finally:
        await conn.close()


async def test_a_role_outside_the_reader_role_is_explained_on_the_archive_page(
    client: Client, dashboard_settings: DashboardSettings, database_url: str, postgres_server: PostgresServer
) -> None:
    await archived_operations(client, database_url)
    role = await login_role(postgres_server)
    outsider_url = database_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    app = create_app(replace(dashboard_settings, database_url=outsider_url))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        page = await http.get("/archive")
        assert page.status_code == 200 and "refused the dashboard&#39;s role" in page.text
        assert "permission denied for table archived_operations" in page.text
        api = await http.get("/api/archive/operations")
        assert api.status_code == 503 and "refused the dashboard's role" in api.json()["error"]["message"]


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_without_its_own_url_the_dashboard_reads_database_url_and_warns(
    client: Client, dashboard_settings: DashboardSettings, database_url: str
) -> None:
    ids = await archived_operations(client, database_url)
    from_env = DashboardSettings.from_env({"DATABASE_URL": database_url, "DASHBOARD_DATABASE_URL": " "})
    assert (from_env.database_url, from_env.database_url_fallback) == (database_url, True)
    # on the logger itself: the app's logging set-up replaces the root handlers caplog relies on
    recorder = _Recorder()
    logging.getLogger("dashboard").addHandler(recorder)
    try:
        for fallback in (False, True):
            app = create_app(replace(dashboard_settings, database_url=database_url, database_url_fallback=fallback))
            async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
                assert ids["succeeded"] in (await http.get("/archive")).text
            assert (READER_FALLBACK_WARNING in recorder.messages) is fallback
    finally:
        logging.getLogger("dashboard").removeHandler(recorder)
