"""Operator actions through the dashboard: :retry, bulk jobs, re-drives, their pages, and their refusals.

The app on the harness's real NATS (and PostgreSQL for re-drives) through Litestar's test
client; every refused request is checked to have changed nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from dashboard_support import csrf_token, eventually, state_of
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from kvstate import Client, JobState, JobStore, OpStatus, Settings, new_job

Http = AsyncTestClient[Litestar]


@pytest.fixture
async def writer(http: Http) -> dict[str, str]:
    return {"X-CSRFToken": await csrf_token(http)}


async def failed(client: Client, op_id: str) -> int:
    await client.create("orders", op_id=op_id)
    await client.start(op_id, "ingest")
    result = await client.fail(op_id, "ingest", "disk full", retryable=False)
    return result.revision


async def running(client: Client, op_id: str) -> int:
    await client.create("orders", op_id=op_id)
    return (await client.start(op_id, "ingest")).revision


async def indexed(app: Litestar, *ids: str) -> None:
    """Wait until the index shows each of ``ids`` at its latest state (jobs select from the index)."""
    await eventually(lambda: all(state_of(app).index.get(i) is not None for i in ids))


async def wait_job(http: Http, job_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
        if job["done"]:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- :retry


async def test_retry_runs_a_failed_operation_again_recorded_and_revision_checked(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    revision = await failed(client, "r1")
    stale = await http.post(
        "/api/operations/r1:retry", json={"reason": "disk replaced"}, headers={**writer, "If-Match": '"1"'}
    )
    assert stale.status_code == 412 and (await client.get("r1")).revision == revision
    done = await http.post(
        "/api/operations/r1:retry",
        json={"reason": "disk replaced", "by": "alice"},
        headers={**writer, "If-Match": f'"{revision}"', "Idempotency-Key": "retry-r1"},
    )
    assert done.status_code == 200, done.text
    assert done.headers["kvstate-outcome"] == "applied" and done.json()["done"] is False
    op = await client.get("r1")
    assert op.status is OpStatus.PENDING and done.headers["etag"] == f'"{op.revision}"'
    assert (op.actions[-1].kind, op.actions[-1].by, op.actions[-1].reason) == ("reopen", "alice", "disk replaced")
    assert op.actions[-1].stages == ["ingest"] and op.actions[-1].event == "retry-r1"
    again = await http.post(
        "/api/operations/r1:retry", json={"reason": "disk replaced"}, headers={**writer, "Idempotency-Key": "retry-r1"}
    )
    assert again.status_code == 200 and again.headers["kvstate-outcome"] == "duplicate"


@pytest.mark.parametrize(
    ("op_kind", "body", "status", "rpc", "message"),
    [
        ("running", {"reason": "x"}, 409, "FAILED_PRECONDITION", "only a finished operation can be retried"),
        ("failed", {"reason": "x", "stages": ["paint"]}, 400, "INVALID_ARGUMENT", "no stage 'paint'"),
        ("failed", {"reason": "  "}, 400, "INVALID_ARGUMENT", "say why"),
        ("failed", {"stages": ["ingest"]}, 400, "INVALID_ARGUMENT", "not a retry request"),
        ("failed", {"reason": "x", "extra": 1}, 400, "INVALID_ARGUMENT", "not a retry request"),
    ],
)
async def test_a_refused_retry_is_a_clear_4xx_and_changes_nothing(
    client: Client,
    http: Http,
    writer: dict[str, str],
    op_kind: str,
    body: dict[str, Any],
    status: int,
    rpc: str,
    message: str,
) -> None:
    revision = await (running if op_kind == "running" else failed)(client, "x1")
    refused = await http.post("/api/operations/x1:retry", json=body, headers=writer)
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["status"] == rpc and message in error["message"]
    assert (await client.get("x1")).revision == revision


async def test_retry_needs_the_write_token_and_csrf(client: Client, dashboard_settings: DashboardSettings) -> None:
    revision = await failed(client, "t1")
    app = create_app(replace(dashboard_settings, auth_token="secret-token"))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        token = await csrf_token(http)
        no_token = await http.post("/api/operations/t1:retry", json={"reason": "x"}, headers={"X-CSRFToken": token})
        assert no_token.status_code == 401
        # the token as basic auth, which a browser sends by itself: CSRF still applies
        no_csrf = await http.post("/api/operations/t1:retry", json={"reason": "x"}, auth=("ops", "secret-token"))
        assert no_csrf.status_code == 403
        page = await http.post(
            "/operations/t1/retry", data={"reason": "x", "_csrf_token": token}, headers={"HX-Request": "true"}
        )
        assert page.status_code == 401
        assert (await client.get("t1")).revision == revision
        ok = await http.post(
            "/api/operations/t1:retry", json={"reason": "x"}, headers={"Authorization": "Bearer secret-token"}
        )
        assert ok.status_code == 200


# ---------------------------------------------------------------------- pages: the retry form


async def test_the_detail_page_offers_retry_of_a_finished_operation_and_shows_who_retried(
    client: Client, http: Http, app: Litestar
) -> None:
    await failed(client, "p1")
    await running(client, "p2")
    page = (await http.get("/operations/p1")).text
    assert "Retry this operation" in page and 'name="stage" value="ingest" checked' in page
    assert "Retry this operation" not in (await http.get("/operations/p2")).text
    token = await csrf_token(http)
    revision = (await client.get("p1")).revision
    answer = await http.post(
        "/operations/p1/retry",
        data={"reason": "fixed the input", "stage": "ingest", "revision": str(revision), "_csrf_token": token},
        headers={"HX-Request": "true"},
    )
    assert answer.status_code == 200, answer.text
    assert "runs again" in answer.text and "fixed the input" in answer.text
    shown = (await http.get("/operations/p1")).text
    assert 'data-testid="actions"' in shown and "fixed the input" in shown
    assert "Retry this operation" not in shown  # it runs again: nothing to retry
    plain = await http.post(
        "/operations/p1/retry",
        data={"reason": "again", "revision": str(revision), "_csrf_token": token},
        follow_redirects=False,
    )
    assert plain.status_code == 412  # a second click on the same page: its revision is gone, nothing changes


# ---------------------------------------------------------------------- bulk jobs through the API


async def test_a_dry_run_counts_and_samples_and_creates_nothing(
    client: Client, http: Http, app: Litestar, writer: dict[str, str]
) -> None:
    for i in range(4):
        await running(client, f"d{i}")
    await failed(client, "d-failed")
    await indexed(app, "d0", "d1", "d2", "d3", "d-failed")
    preview = await http.post(
        "/api/jobs",
        json={"filter": "id=d", "action": "cancel", "reason": "drain", "dry_run": True},
        headers=writer,
    )
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert (body["matched"], body["eligible"], body["limit"]) == (5, 4, 5000)
    assert {s["id"] for s in body["sample"]} == {"d0", "d1", "d2", "d3", "d-failed"}
    assert (await http.get("/api/jobs")).json() == {"jobs": []}
    assert all([(await client.get(f"d{i}")).status is OpStatus.RUNNING for i in range(4)])


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"filter": "id=nothing-like-this", "action": "cancel", "reason": "x"}, "matches no operation"),
        ({"filter": "status=running", "action": "cancel", "reason": "x"}, "more than the limit of 3"),
        ({"filter": "id=b0", "action": "retry", "reason": "x", "stages": ["paint"]}, "no stage 'paint'"),
        ({"filter": "id=b0", "action": "delete", "reason": "x"}, "unknown action"),
        ({"filter": "id=b0", "action": "cancel", "reason": ""}, "needs a reason"),
        ({"filter": "colour=blue", "action": "cancel", "reason": "x"}, "unknown filter"),
        ({"filter": "id=b0", "action": "cancel", "reason": "x", "rate": 1000}, "above DASHBOARD_JOB_RATE"),
        ({"filter": "id=b0", "action": "cancel"}, "not a job request"),
    ],
)
async def test_a_refused_job_is_a_400_and_creates_nothing(
    client: Client,
    dashboard_settings: DashboardSettings,
    request_body: dict[str, Any],
    message: str,
) -> None:
    app = create_app(replace(dashboard_settings, job_max_operations=3))
    for i in range(4):
        await running(client, f"b{i}")
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        await eventually(lambda: app.state.dashboard is not None and len(state_of(app).index) == 4)
        csrf = {"X-CSRFToken": await csrf_token(http)}  # no token configured: a bearer header would be no credential
        for dry_run in (True, False):
            refused = await http.post("/api/jobs", json={**request_body, "dry_run": dry_run}, headers=csrf)
            assert refused.status_code == 400, refused.text
            assert message in refused.json()["error"]["message"]
        assert (await http.get("/api/jobs")).json() == {"jobs": []}
    assert all([(await client.get(f"b{i}")).status is OpStatus.RUNNING for i in range(4)])


async def test_a_bulk_cancel_runs_in_the_dashboard_to_done(
    client: Client, http: Http, app: Litestar, writer: dict[str, str]
) -> None:
    ids = [f"c{i}" for i in range(6)]
    for op_id in ids:
        await running(client, op_id)
    await failed(client, "c-failed")
    await indexed(app, *ids, "c-failed")
    created = await http.post(
        "/api/jobs", json={"filter": "id=c", "action": "cancel", "reason": "incident 7", "by": "ops"}, headers=writer
    )
    assert created.status_code == 201, created.text
    job = created.json()
    assert created.headers["location"] == f"/api/jobs/{job['id']}" and job["counts"]["matched"] == 7
    final = await wait_job(http, job["id"])
    assert final["state"] == "done" and final["counts"] == {"matched": 7, "applied": 6, "skipped": 1, "failed": 0}
    assert final["problems"][0]["op_id"] == "c-failed"
    for op_id in ids:
        op = await client.get(op_id)
        assert op.status is OpStatus.CANCELLED and op.cancel is not None and op.cancel.reason == "incident 7"
        assert op.actions[-1].event == f"job:{job['id']}:{op_id}" and op.actions[-1].by == "ops"
    listed = (await http.get("/api/jobs")).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    too_late = await http.post(f"/api/jobs/{job['id']}:cancel", headers=writer)
    assert too_late.status_code == 409 and too_late.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert (await http.get("/api/jobs/nope")).status_code == 404
    assert (await http.post(f"/api/jobs/{job['id']}:explode", headers=writer)).status_code == 404
    assert (await http.get(f"/api/jobs/{job['id']}:cancel")).status_code == 405


async def test_cancelling_a_running_job_stops_it_and_resume_finishes_a_paused_one(
    client: Client, http: Http, app: Litestar, writer: dict[str, str]
) -> None:
    ids = [f"s{i:02d}" for i in range(20)]
    for op_id in ids:
        await running(client, op_id)
    await indexed(app, *ids)
    created = await http.post(
        "/api/jobs", json={"filter": "id=s", "action": "cancel", "reason": "x", "rate": 10}, headers=writer
    )
    job_id = created.json()["id"]
    deadline = time.monotonic() + 10
    while (await http.get(f"/api/jobs/{job_id}")).json()["processed"] < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stopped = await http.post(f"/api/jobs/{job_id}:cancel", json={"reason": "wrong filter"}, headers=writer)
    assert stopped.status_code == 200 and stopped.json()["state"] == "cancelled"
    final = await wait_job(http, job_id)
    await asyncio.sleep(0.3)  # a runner that kept going would change another one meanwhile
    cancelled = [i for i in ids if (await client.get(i)).status is OpStatus.CANCELLED]
    assert final["cancel_reason"] == "wrong filter"
    assert len(cancelled) == (await http.get(f"/api/jobs/{job_id}")).json()["counts"]["applied"] < len(ids)

    paused = await JobStore(client).create(
        new_job(None, "cancel", ids, datetime.now(UTC), filter="id=s", reason="finish it", max_operations=50, rate=200)
    )
    resumed = await http.post(f"/api/jobs/{paused.id}:resume", headers=writer)
    assert resumed.status_code == 200
    done = await wait_job(http, paused.id)
    assert done["state"] == "done" and done["counts"]["applied"] == len(ids) - len(cancelled)
    assert all([(await client.get(i)).status is OpStatus.CANCELLED for i in ids])


async def test_job_records_stay_out_of_the_index(client: Client, http: Http, app: Litestar) -> None:
    await running(client, "only-op")
    await indexed(app, "only-op")
    await JobStore(client).create(
        new_job("J1", "cancel", ["only-op"], datetime.now(UTC), filter="x", reason="x", max_operations=5, rate=1)
    )
    await client.create("orders", op_id="after-the-job")  # the watch goes on past the job record
    await indexed(app, "after-the-job")
    assert len(state_of(app).index) == 2 and state_of(app).index.get("J1") is None
    assert (await http.get("/healthz")).json()["operations"] == 2


# ---------------------------------------------------------------------- bulk jobs through the pages


async def test_the_list_page_previews_then_creates_a_bulk_job_and_shows_its_page(
    client: Client, http: Http, app: Litestar
) -> None:
    for i in range(3):
        await running(client, f"l{i}")
    await indexed(app, "l0", "l1", "l2")
    listing = (await http.get("/operations?id=l&status=running")).text
    assert "Cancel or retry every operation this filter matches" in listing
    assert "status=running AND id=l" in listing
    token = await csrf_token(http)
    form = {"filter": "status=running AND id=l", "action": "cancel", "reason": "drain", "_csrf_token": token}
    preview = await http.post("/jobs/preview", data=form, headers={"HX-Request": "true"})
    assert preview.status_code == 200, preview.text
    assert 'data-testid="bulk-matched">3<' in preview.text and "Yes, cancel 3 operations" in preview.text
    assert (await http.get("/api/jobs")).json() == {"jobs": []}  # the preview created nothing
    created = await http.post("/jobs", data=form, headers={"HX-Request": "true"})
    assert created.status_code == 200 and created.headers["hx-redirect"].startswith("/jobs/")
    job_id = created.headers["hx-redirect"].removeprefix("/jobs/")
    await wait_job(http, job_id)
    page = (await http.get(f"/jobs/{job_id}")).text
    assert 'data-state="done"' in page and "status=running AND id=l" in page
    assert job_id in (await http.get("/jobs")).text
    empty = await http.post("/jobs/preview", data={**form, "filter": "id=zzz"}, headers={"HX-Request": "true"})
    assert empty.status_code == 400 and "matches no operation" in empty.text


# ---------------------------------------------------------------------- kvstate jobs create, through the API


async def test_kvstate_jobs_create_asks_the_dashboard(client: Client, live_server: str, settings: Settings) -> None:
    for i in range(2):
        await running(client, f"k{i}")
    await failed(client, "k-failed")

    def kvstate(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"NATS_URL": settings.nats_url, "KVSTATE_BUCKET": settings.bucket, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, "-m", "kvstate.cli", "jobs", *args, "--dashboard", live_server],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    await asyncio.sleep(0.3)  # the index follows the bucket
    dry = await asyncio.to_thread(
        kvstate, "create", "--filter", "id=k", "--action", "cancel", "--reason", "x", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "3 operations match 'id=k'; 2 can be cancelled now" in dry.stdout
    nothing = await asyncio.to_thread(kvstate, "create", "--filter", "id=zz", "--action", "cancel", "--reason", "x")
    assert nothing.returncode == 2 and "matches no operation" in nothing.stderr
    created = await asyncio.to_thread(kvstate, "create", "--filter", "id=k", "--action", "cancel", "--reason", "x")
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.strip()
    jobs = JobStore(client)
    deadline = time.monotonic() + 15
    while not (job := await jobs.get(job_id)).done:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert job.state is JobState.DONE and job.counts.applied == 2 and job.by == "kvstate-cli"


# ---------------------------------------------------------------------- re-drive


async def test_redrive_without_an_archive_is_503_and_changes_nothing(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    refused = await http.post("/api/archive/operations/gone:redrive", json={"reason": "x"}, headers=writer)
    assert refused.status_code == 503
    assert (await http.post("/api/archive/operations/gone:explode", json={}, headers=writer)).status_code == 404


async def test_redrive_an_archived_operation_from_the_api_and_the_page(
    client: Client, dashboard_settings: DashboardSettings, database_url: str
) -> None:
    from archiver.settings import ArchiverSettings
    from archiver.worker import Archiver

    for op_id in ("a1", "a2"):
        await failed(client, op_id)
    archiver_settings = ArchiverSettings(
        kv=dashboard_settings.kv, database_url=database_url, grace_period=0.0, batch_timeout=0.05, metrics_port=0
    )
    async with Archiver(archiver_settings) as archiver:
        await archiver.run(burst=True)
    app = create_app(replace(dashboard_settings, database_url=database_url))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        await eventually(lambda: app.state.dashboard is not None)
        writer = {"X-CSRFToken": await csrf_token(http)}
        archived_page = (await http.get("/operations/a1")).text
        assert "Re-drive this archived operation" in archived_page
        bad = await http.post(
            "/api/archive/operations/a1:redrive", json={"reason": "x", "stages": ["paint"]}, headers=writer
        )
        assert bad.status_code == 400
        done = await http.post(
            "/api/archive/operations/a1:redrive", json={"reason": "input fixed", "by": "carol"}, headers=writer
        )
        assert done.status_code == 200, done.text
        assert done.headers["kvstate-outcome"] == "applied" and done.json()["metadata"]["redrives"] == 1
        op = await client.get("a1")
        assert op.actions[-1].kind == "redrive" and op.actions[-1].by == "carol"
        twice = await http.post("/api/archive/operations/a1:redrive", json={"reason": "x"}, headers=writer)
        assert twice.status_code == 409 and twice.json()["error"]["status"] == "ALREADY_EXISTS"
        form = await http.post(
            "/operations/a2/redrive",
            data={"reason": "again", "_csrf_token": writer["X-CSRFToken"]},
            headers={"HX-Request": "true"},
        )
        assert form.status_code == 200 and "is back in the bucket" in form.text
        assert (await client.get("a2")).redrives == 1
        missing = await http.post("/api/archive/operations/never:redrive", json={"reason": "x"}, headers=writer)
        assert missing.status_code == 404
