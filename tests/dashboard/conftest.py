"""Fixtures of the dashboard tests: the app on the harness's real NATS (and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.contexts import DashboardState
from dashboard.settings import DashboardSettings
from kvstate import Client, Settings


@pytest.fixture
def dashboard_settings(settings: Settings) -> DashboardSettings:
    return DashboardSettings(kv=settings, debounce=0.05, page_size=5, secret="s" * 32)


@pytest.fixture
def app(dashboard_settings: DashboardSettings) -> Litestar:
    return create_app(dashboard_settings)


@pytest.fixture
async def http(client: Client, app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    # Litestar's test client runs the app (and its lifespan) on an event loop in another thread:
    # poll the feed's readiness instead of awaiting its asyncio.Event across loops.
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as test_client:
        state: DashboardState = app.state.dashboard
        deadline = time.monotonic() + 10
        while not state.feed.ready.is_set():
            assert time.monotonic() < deadline, "the dashboard's index never became ready"
            await asyncio.sleep(0.005)
        yield test_client


@pytest.fixture
async def live_server(client: Client, dashboard_settings: DashboardSettings) -> AsyncIterator[str]:
    """The dashboard served by uvicorn on a free loopback port, in this test's event loop."""
    import uvicorn

    from devstack.servers import free_port

    app = create_app(dashboard_settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.02)
    await asyncio.wait_for(app.state.dashboard.feed.ready.wait(), 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    """Debian's Chromium through Playwright (never a downloaded browser). Fails clearly when missing."""
    import os

    from playwright.async_api import async_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the project setup (scripts/setup.sh) installs Debian's chromium package")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()
