"""A real browser (Debian's Chromium via Playwright) on the dashboard served by uvicorn.

Screenshots go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from dashboard_support import populate
from playwright.async_api import expect

from dashboard.settings import DashboardSettings
from devstack.servers import NatsServer
from kvstate import Client, Settings

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"


async def test_overview_updates_live_and_detail_page_renders(client: Client, live_server: str, browser: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ids = await populate(client, 18)
    page = await browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(live_server + "/")
    total = page.locator('[data-testid="total"]')
    assert await total.inner_text() == "18"
    assert await page.evaluate("typeof htmx") == "object"  # the vendored script loaded under the CSP
    await page.wait_for_timeout(300)  # let the event stream connect
    await page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

    started = time.monotonic()
    await client.create("orders")
    await expect(total).to_have_text("19", timeout=3000)
    latency = time.monotonic() - started
    (ARTIFACTS / "latency.json").write_text(json.dumps({"change_to_page_seconds": latency}))
    assert latency <= 1.0, f"a change took {latency:.2f}s to reach the page"

    running = page.locator('[data-testid="count-ingest-running"] .n')
    before = int(await running.inner_text())
    fresh = await client.create("orders")
    await client.start(fresh.id, "ingest", worker="browser-test")
    await expect(running).to_have_text(str(before + 1), timeout=3000)
    await page.screenshot(path=str(ARTIFACTS / "overview-after-change.png"), full_page=True)

    await page.goto(f"{live_server}/operations/{ids[3]}")
    assert ids[3] in await page.locator("h1").first.inner_text()
    assert await page.locator(".gantt-row").count() == 7
    await page.screenshot(path=str(ARTIFACTS / "detail.png"), full_page=True)

    await page.goto(f"{live_server}/operations?status=running")
    await page.screenshot(path=str(ARTIFACTS / "list.png"), full_page=True)

    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto(live_server + "/")
    await page.screenshot(path=str(ARTIFACTS / "overview-narrow.png"), full_page=True)
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the narrow page scrolls sideways ({width}px)"
    assert errors == [], errors


async def test_cancel_from_the_detail_page(client: Client, live_server: str, browser: Any) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    page = await browser.new_page()
    await page.goto(f"{live_server}/operations/{op.id}")
    await page.click("text=Cancel this operation")
    await page.fill('input[name="reason"]', "browser says stop")
    await page.click("text=Yes, cancel the operation")
    await page.wait_for_selector("#cancel-result .badge.st-cancelled", timeout=3000)
    stored = await client.get(op.id)
    assert (
        stored.status.value == "cancelled" and stored.cancel is not None and stored.cancel.reason == "browser says stop"
    )
    # the live refresh shows the operation cancelled: the form goes, the cancel's answer stays
    await expect(page.locator("#cancel-form")).to_have_count(0, timeout=3000)
    await expect(page.locator(".op-head .badge.st-cancelled")).to_be_visible()
    await expect(page.locator("#cancel-result .badge.st-cancelled")).to_be_visible()


async def test_cancel_form_stays_while_running_and_goes_when_the_operation_finishes(
    client: Client, live_server: str, browser: Any
) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    page = await browser.new_page()
    await page.goto(f"{live_server}/operations/{op.id}")
    await page.click("text=Cancel this operation")
    await page.fill('input[name="reason"]', "half typed")
    await client.succeed(op.id, "ingest")
    await client.start(op.id, "validate")  # still running: the refresh must leave the open form alone
    await expect(page.locator(".op-head .facts")).to_contain_text("validate", timeout=3000)
    assert await page.input_value('input[name="reason"]') == "half typed"
    assert await page.locator("#cancel-form").get_attribute("open") is not None
    await client.fail(op.id, "validate", "bad", retryable=False)  # finished: nothing left to cancel
    await expect(page.locator(".op-head .badge.st-failed")).to_be_visible(timeout=3000)
    await expect(page.locator("#cancel-form")).to_have_count(0)
    await expect(page.get_by_text("Cancel this operation")).to_have_count(0)


class TestNatsOutage:
    """The detail page on a NATS server of the test's own, killed and started again."""

    @pytest.fixture
    def settings(self, private_nats: NatsServer, bucket_name: str) -> Settings:
        return Settings(nats_url=private_nats.url, bucket=bucket_name)

    @pytest.mark.slow
    async def test_detail_page_keeps_its_content_shows_the_banner_and_fills_in_after_an_outage(
        self, client: Client, live_server: str, browser: Any, private_nats: NatsServer
    ) -> None:
        op = await client.create("orders")
        await client.start(op.id, "ingest")
        opened = await browser.new_page()
        errors: list[str] = []  # htmx logs a swap it could not do, or an error response, to the console
        opened.on("pageerror", lambda exc: errors.append(str(exc)))
        opened.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        await opened.goto(f"{live_server}/operations/{op.id}")
        await expect(opened.locator(".op-head h1")).to_have_text(op.id)

        def refresh(status: int) -> Any:
            return lambda r: r.url.endswith(f"/partials/operations/{op.id}") and r.status == status

        # the open page: the refresh that NATS's loss triggers keeps the content, and the banner comes
        async with opened.expect_response(refresh(204), timeout=10_000):
            private_nats.kill()
        try:
            await expect(opened.locator("#banner")).to_contain_text("NATS is unreachable", timeout=10_000)
            await expect(opened.locator(".op-head h1")).to_have_text(op.id)
            await expect(opened.locator(".error-card")).to_have_count(0)
            await expect(opened.locator("#cancel-form")).to_have_count(1)

            # a page opened during the outage: the banner and a card that waits for NATS
            late = await browser.new_page()
            response = await late.goto(f"{live_server}/operations/{op.id}")
            assert response is not None and response.status == 503
            await expect(late.locator("#banner")).to_contain_text("NATS is unreachable")
            await expect(late.locator('[data-testid="waiting-for-nats"]')).to_contain_text("running")  # last known
            async with late.expect_response(refresh(204), timeout=5_000):  # it keeps polling
                pass
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await late.screenshot(path=str(ARTIFACTS / "detail-during-outage.png"), full_page=True)

            private_nats.start()
            await client.succeed(op.id, "ingest")  # the client reconnects by itself
            for page in (opened, late):  # both fill in by themselves, with the cancel form
                await expect(page.locator('[data-testid="waiting-for-nats"]')).to_have_count(0, timeout=15_000)
                await expect(page.locator(".op-head h1")).to_have_text(op.id)
                await expect(page.locator(".gantt-row .badge.st-succeeded")).to_have_count(1, timeout=5_000)
                await expect(page.locator("#banner")).not_to_contain_text("NATS is unreachable", timeout=10_000)
                await expect(page.locator("#cancel-form")).to_have_count(1)
            assert errors == [], errors
            await late.screenshot(path=str(ARTIFACTS / "detail-after-outage.png"), full_page=True)
        finally:  # a failure during the outage must not leave the server down for the teardown
            if private_nats.proc is not None and private_nats.proc.poll() is not None:
                private_nats.start()


XSS = "<script>window.__xss=1;alert(1)</script>"
ATTR = '" onmouseover="window.__xss=2" x="'
IMG = '<img src=x onerror="window.__xss=3">'


async def test_stored_xss_payloads_never_run(client: Client, live_server: str, browser: Any) -> None:
    payloads = {"a": XSS, "b": ATTR, "c": IMG, XSS: ATTR}
    op = await client.create("orders", metadata=payloads)
    await client.start(op.id, "ingest", worker=ATTR)
    await client.fail(op.id, "ingest", XSS + IMG, retryable=True, code=ATTR, metadata={"x": IMG})
    # Raw values written past the client's validation: a hostile stage name, id field and pipeline name.
    stored = json.loads((await client.raw(op.id) or (0, b"{}"))[1])
    stored["stages"][XSS] = {"status": "running", "worker": IMG}
    stored["pipeline"] = ATTR
    stored["history"].append({"at": stored["created_at"], "to": XSS, "stage": IMG, "worker": ATTR})
    await client._open_store().js.publish(client._open_store().subject(f"op.{op.id}"), json.dumps(stored).encode())
    evil_id = dict(stored, id=XSS)
    await client._open_store().js.publish(client._open_store().subject("op.evil"), json.dumps(evil_id).encode())
    await client._open_store().js.publish(client._open_store().subject("op.raw"), (XSS + ATTR).encode())

    page = await browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    for path in (
        "/",
        "/operations",
        "/operations?status=corrupt",
        f"/operations/{op.id}",
        "/operations/evil",
        "/operations/raw",
    ):
        await page.goto(live_server + path)
        await page.wait_for_timeout(150)
        for selector in ("td", "pre", "h1", "h3", ".badge"):
            for element in (await page.query_selector_all(selector))[:12]:
                await element.hover()
        assert await page.evaluate("window.__xss") is None, path
        assert await page.locator("script:not([src])").count() == 0, path
        assert await page.locator("[onmouseover], [onerror]").count() == 0, path
    await page.goto(f"{live_server}/operations/{op.id}")
    assert XSS in await page.locator("pre.value").first.inner_text()  # shown as text, not run
    await page.screenshot(path=str(ARTIFACTS / "xss-detail.png"), full_page=True)
    assert dialogs == []


class TestWithTheTokenForReads:
    """The dashboard as the compose file runs it: every read and write needs the token (basic auth)."""

    TOKEN = "browser-token-0123456789abcdef"

    @pytest.fixture
    def dashboard_settings(self, settings: Settings) -> DashboardSettings:
        return DashboardSettings(
            kv=settings, debounce=0.05, page_size=5, secret="s" * 32, auth_token=self.TOKEN, auth_reads=True
        )

    async def test_pages_live_updates_and_cancel_work_with_basic_auth_and_nothing_without_it(
        self, client: Client, live_server: str, browser: Any
    ) -> None:
        op = await client.create("orders")
        await client.start(op.id, "ingest")
        stranger = await browser.new_context()  # no credentials: a headless browser cannot even load the page
        for path in ("/", f"/operations/{op.id}", "/events", f"/api/operations/{op.id}"):
            refused = await stranger.request.get(live_server + path)
            assert refused.status == 401 and op.id not in await refused.text(), path
            assert refused.headers["www-authenticate"].startswith("Basic")
        await stranger.close()

        context = await browser.new_context(http_credentials={"username": "operator", "password": self.TOKEN})
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        await page.goto(live_server + "/")
        total = page.locator('[data-testid="total"]')
        await expect(total).to_have_text("1")
        await page.wait_for_timeout(300)  # the event stream connects, with the same credentials
        await client.create("orders")
        await expect(total).to_have_text("2", timeout=3000)  # a live update through the authenticated stream

        await page.goto(f"{live_server}/operations/{op.id}")
        await page.click("text=Cancel this operation")
        await page.fill('input[name="reason"]', "with the token")
        await page.click("text=Yes, cancel the operation")
        await page.wait_for_selector("#cancel-result .badge.st-cancelled", timeout=3000)
        stored = await client.get(op.id)
        assert stored.status.value == "cancelled" and stored.cancel is not None
        assert stored.cancel.reason == "with the token"
        assert errors == [], errors
        await context.close()
