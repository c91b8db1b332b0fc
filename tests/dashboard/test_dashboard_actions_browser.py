"""Operator actions in a real browser (Debian's Chromium via Playwright) on the dashboard served by uvicorn:
a retry from the detail page and a bulk cancel from the list, each through its confirmation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from kvstate import Client, JobState, JobStore, OpStatus

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"


async def test_retry_from_the_detail_page(client: Client, live_server: str, browser: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    await client.fail(op.id, "ingest", "disk full", retryable=False)
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{live_server}/operations/{op.id}")
    await page.click("text=Retry this operation")
    assert await page.is_checked('#retry-form input[name="stage"][value="ingest"]')  # the failed stage
    await page.fill('#retry-form input[name="reason"]', "disk replaced")
    await page.screenshot(path=str(ARTIFACTS / "retry-form.png"), full_page=True)
    await page.click("text=Yes, retry the operation")
    await expect(page.locator('[data-testid="action-result"]')).to_contain_text("runs again", timeout=3000)
    stored = await client.get(op.id)
    assert stored.status is OpStatus.PENDING
    assert (stored.actions[-1].reason, stored.actions[-1].by) == ("disk replaced", "dashboard")
    # the live refresh shows it waiting to run again: the form goes, the answer and the record stay
    await expect(page.locator("#retry-form")).to_have_count(0, timeout=3000)
    await expect(page.locator('[data-testid="action-result"]')).to_be_visible()
    await expect(page.locator('[data-testid="actions"]')).to_contain_text("disk replaced")
    await page.screenshot(path=str(ARTIFACTS / "retry-done.png"), full_page=True)
    assert errors == [], errors


async def test_bulk_cancel_from_the_list_with_its_confirmation(client: Client, live_server: str, browser: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(4):
        op = await client.create("orders", op_id=f"bulk{i}")
        await client.start(op.id, "ingest")
        ids.append(op.id)
    other = await client.create("orders", op_id="other")
    await client.start(other.id, "ingest")
    page = await browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{live_server}/operations?status=running&id=bulk")
    await expect(page.locator('[data-testid="bulk-filter"]')).to_have_text("status=running AND id=bulk")
    await page.click("text=Cancel or retry every operation this filter matches")
    await page.select_option('#bulk-form select[name="action"]', "cancel")
    await page.fill('#bulk-form input[name="reason"]', "incident 7")
    await page.click("text=Show what it would change")
    await expect(page.locator('[data-testid="bulk-matched"]')).to_have_text("4", timeout=3000)
    await expect(page.locator('[data-testid="bulk-eligible"]')).to_have_text("4")
    await page.screenshot(path=str(ARTIFACTS / "bulk-confirm.png"), full_page=True)
    assert [o.status for o in [await client.get(i) for i in ids]] == [OpStatus.RUNNING] * 4  # nothing yet
    await page.click("text=Yes, cancel 4 operations")
    await page.wait_for_url(re.compile(r".*/jobs/[0-9A-Z]{26}$"), timeout=5000)
    await expect(page.locator(".op-head [data-state]")).to_have_attribute("data-state", "done", timeout=10000)
    await expect(page.locator('[data-testid="job-applied"]')).to_have_text("4")
    await page.screenshot(path=str(ARTIFACTS / "bulk-job.png"), full_page=True)
    job_id = page.url.rsplit("/", 1)[1]
    job = await JobStore(client).get(job_id)
    assert job.state is JobState.DONE and job.reason == "incident 7" and job.by == "dashboard"
    assert [o.status for o in [await client.get(i) for i in ids]] == [OpStatus.CANCELLED] * 4
    assert (await client.get("other")).status is OpStatus.RUNNING  # outside the filter: untouched
    await page.goto(f"{live_server}/jobs")
    await expect(page.locator(f'tr[data-job="{job_id}"]')).to_contain_text("done")
    assert errors == [], errors
