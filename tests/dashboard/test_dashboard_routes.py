"""Pages, fragments, the JSON API and the security rules, through Litestar's test client on real NATS."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

import pytest
from dashboard_support import csrf_token, eventually, populate, state_of
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from kvstate import Client, OpStatus

Http = AsyncTestClient[Litestar]


async def test_overview_shows_live_counts_with_links_to_filtered_lists(
    client: Client, app: Litestar, http: Http
) -> None:
    ids = await populate(client, 12)
    await eventually(lambda: len(state_of(app).index) == 12 and state_of(app).index.changes >= 12 * 3)
    await eventually(lambda: state_of(app).index.status_counts().get("failed") == 2)
    html = (await http.get("/")).text
    assert 'data-testid="total">12<' in html
    running = re.search(r'data-testid="total-running" href="([^"]+)"', html)
    assert running is not None
    link = running.group(1).replace("&amp;", "&")
    listed = (await http.get(link)).text
    running_ids = {op.id for op in await client.list(status="running")}
    shown = set(re.findall(r'data-op="([^"]+)"', listed))
    assert len(shown) == 5 and shown <= running_ids  # page size 5, and only running ones
    assert 'data-testid="count-validate-failed"' in html
    fragment = (await http.get("/partials/overview")).text
    assert "<html" not in fragment and 'data-testid="total">12<' in fragment
    assert ids[2] in html  # validate failed: listed under recent failures


async def test_api_overview_has_the_overview_pages_figures(client: Client, app: Litestar, http: Http) -> None:
    ids = await populate(client, 12)
    index = state_of(app).index
    await eventually(lambda: len(index) == 12 and index.status_counts().get("failed") == 2)
    await eventually(lambda: index.status_counts().get("succeeded") == 2)
    response = await http.get("/api/overview")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["pipeline"] == "orders" and body["pipelines"] == ["orders"]
    assert body["total"] == body["operations_in_bucket"] == 12
    assert body["totals"] == {"pending": 0, "running": 8, "succeeded": 2, "failed": 2, "cancelled": 0}
    html = (await http.get("/")).text  # the page shows the same figures
    for status, n in body["totals"].items():
        assert re.search(rf'data-testid="total-{status}" href="[^"]*">\s*<span class="n">{n}<', html), status
    stages = {stage["name"]: stage for stage in body["stages"]}
    assert list(stages) == ["ingest", "validate", "geo", "fraud", "profile", "merge", "notify"]  # the DAG's order
    assert [stages[name]["layer"] for name in ("ingest", "validate", "geo", "fraud", "merge")] == [0, 1, 2, 2, 3]
    validate = stages["validate"]
    assert validate["counts"]["failed"] == 2 and validate["counts"]["running"] == 2 and validate["samples"] == 6
    assert validate["p50_seconds"] is not None and validate["p95_seconds"] >= validate["p50_seconds"]
    assert stages["ingest"]["counts"] == {
        "waiting": 0, "running": 2, "retrying": 0, "succeeded": 10, "failed": 0, "skipped": 0, "cancelled": 0
    }  # fmt: skip
    assert stages["profile"]["optional"] is True and stages["notify"]["deadline_seconds"] == 5.0
    assert sum(stage["counts"]["retrying"] for stage in stages.values()) == 2  # geo of ops 3 and 9
    minutes = body["throughput"]["minutes"]
    assert len(minutes) == 30 and sum(m["started"] for m in minutes) == 12
    assert minutes[-1]["minute"] <= time.time() < minutes[-1]["minute"] + 60
    assert body["throughput"]["started_per_minute"] == sum(m["started"] for m in minutes[-5:]) / 5
    failures = {f["id"]: f for f in body["recent_failures"]}
    assert set(failures) == {ids[2], ids[8]}
    assert failures[ids[2]]["stage"] == "validate" and "schema check failed" in failures[ids[2]]["message"]
    assert body["stuck"] == [] and body["stuck_total"] == 0  # nothing past the 30 s heartbeat timeout yet
    assert body["nats_connected"] is True and body["index_ready"] is True and body["disconnected_since"] is None
    assert body["stats_window_seconds"] == 900
    unknown = await http.get("/api/overview", params={"pipeline": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "pipeline" in unknown.json()["error"]["message"]


async def test_stuck_counts_link_to_the_list_of_stuck_operations(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    # A clock a minute ahead: every running stage is past the pipeline's 30 s heartbeat timeout.
    app = create_app(dashboard_settings, clock=lambda: time.time() + 60)
    ids = await populate(client, 12)
    stuck_ids = {ids[i] for i in range(12) if i % 6 in (0, 1, 3, 4)}  # ingest, validate, fraud or merge running
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        index = state_of(app).index
        await eventually(lambda: len(index) == 12 and index.stuck(0)[1] == 8)
        html = (await http.get("/")).text
        heading = re.search(r'data-testid="stuck-total" href="([^"]+)">8 stages<', html)
        fraud = re.search(r'data-testid="stuck-fraud" href="([^"]+)">⚠ 2 stuck<', html)
        assert heading is not None and fraud is not None
        listed = (await http.get(heading.group(1).replace("&amp;", "&"))).text
        shown = set(re.findall(r'data-op="([^"]+)"', listed))
        assert len(shown) == 5 and shown <= stuck_ids and "page_token" in listed  # page size 5: a next page
        assert 'name="stuck" value="1" checked' in listed
        by_stage = (await http.get(fraud.group(1).replace("&amp;", "&"))).text
        assert set(re.findall(r'data-op="([^"]+)"', by_stage)) == {ids[3], ids[9]}
        api = (await http.get("/api/operations", params={"filter": "stuck=1", "page_size": "50"})).json()
        assert {op["metadata"]["id"] for op in api["operations"]} == stuck_ids
        overview = (await http.get("/api/overview")).json()  # the same figures as JSON
        assert overview["stuck_total"] == 8 and {s["id"] for s in overview["stuck"]} == stuck_ids
        assert {s["name"]: s["stuck"] for s in overview["stages"]}["fraud"] == 2
        assert all("heartbeat" in s["reason"] or "deadline" in s["reason"] for s in overview["stuck"])


async def test_the_metadata_filter_says_what_it_can_match(http: Http) -> None:
    html = (await http.get("/operations")).text
    assert "first 4 top-level metadata keys" in html and "archive search matches any JSON" in html


async def test_empty_bucket_explains_how_to_start_the_demo(http: Http) -> None:
    html = (await http.get("/")).text
    assert "No operations yet" in html and "scripts/run" in html


async def test_operations_list_filters_paginates_and_sorts(client: Client, app: Litestar, http: Http) -> None:
    ids = await populate(client, 12)
    await eventually(lambda: len(state_of(app).index) == 12)
    await eventually(lambda: state_of(app).index.status_counts().get("succeeded") == 2)
    first = await http.get("/operations", params={"order": "oldest"})
    assert first.status_code == 200
    assert ids[0] in first.text and ids[5] not in first.text  # page size 5
    next_link = re.search(r'href="(/operations\?[^"]*page_token=[^"]+)"', first.text)
    assert next_link is not None
    second = (await http.get(next_link.group(1).replace("&amp;", "&"))).text
    assert ids[5] in second and ids[0] not in second
    succeeded = (await http.get("/operations", params=[("status", "succeeded"), ("status", "cancelled")])).text
    assert ids[5] in succeeded and ids[11] in succeeded and ids[0] not in succeeded
    by_meta = (await http.get("/operations", params={"meta": "customer=c1"})).text
    assert ids[1] in by_meta and ids[6] in by_meta and ids[2] not in by_meta
    by_stage = (await http.get("/operations", params={"stage": "validate", "stage_status": "failed"})).text
    assert ids[2] in by_stage and ids[8] in by_stage and ids[1] not in by_stage
    by_worker = (await http.get("/operations", params={"worker": "ingest-1", "order": "oldest"})).text
    assert ids[1] in by_worker and ids[0] not in by_worker


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "nonsense"}, "status"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "0001-01-01T00:00:00+01:00"}, "created_after"),  # year 0 in UTC
        ({"created_before": "9999-12-31T23:59:59-10:00"}, "created_before"),  # year 10000 in UTC
        ({"page_token": "!!!"}, "page_token"),
        ({"stage_status": "running"}, "stage_status"),
        ({"bogus": "1"}, "bogus"),
        ({"stuck": "maybe"}, "stuck"),
    ],
)
async def test_bad_filters_are_a_clear_400(http: Http, params: dict[str, str], field: str) -> None:
    response = await http.get("/operations", params=params)
    assert response.status_code == 400
    assert field in response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-10:00"])
@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/operations", "created_after"),
        ("/archive", "finished_after"),
        ("/archive", "finished_before"),
        ("/api/archive/operations", "finished_after"),
    ],
)
async def test_out_of_range_times_are_a_clear_400_in_the_api_and_archive(
    http: Http, url: str, field: str, value: str
) -> None:
    response = await http.get(url, params={field: value})
    assert response.status_code == 400
    assert field in response.text and "out of range" in response.text
    assert "Traceback" not in response.text


async def test_detail_page_shows_timeline_metadata_history_and_revisions(
    client: Client, app: Litestar, http: Http
) -> None:
    op = await client.create("orders", metadata={"customer": "ada"})
    await client.start(op.id, "ingest", worker="ingest-7")
    await client.fail(op.id, "ingest", "disk full", retryable=True, code="E_DISK")
    retrying = (await http.get(f"/operations/{op.id}")).text
    assert "disk full" in retrying and "E_DISK" in retrying and "retryable" in retrying
    await client.start(op.id, "ingest", worker="ingest-8")
    result = await client.succeed(op.id, "ingest", metadata={"bytes": 1234})
    html = (await http.get(f"/operations/{op.id}")).text
    assert "&#34;customer&#34;: &#34;ada&#34;" in html  # pretty JSON, escaped
    assert html.count('class="st-retrying"') == 1 and 'class="st-succeeded"' in html  # two attempts of ingest
    assert f"<td>{result.revision}</td>" in html  # the KV revision history
    assert "ingest-8" in html
    assert "Cancel this operation" in html


async def test_the_cancel_form_is_part_of_the_live_fragment_until_the_operation_finishes(
    client: Client, http: Http
) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    running = (await http.get(f"/partials/operations/{op.id}", headers={"HX-Request": "true"})).text
    assert "<html" not in running and "Cancel this operation" in running
    assert '<details id="cancel-form" hx-preserve="true">' in running  # a refresh keeps the open form as it is
    assert 'name="_csrf_token" value="' in running and f'hx-post="/operations/{op.id}/cancel"' in running
    await client.fail(op.id, "ingest", "broken", retryable=False)
    finished = (await http.get(f"/partials/operations/{op.id}", headers={"HX-Request": "true"})).text
    assert "Cancel this operation" not in finished and "cancel-form" not in finished
    assert f'hx-post="/operations/{op.id}/cancel"' not in finished
    assert f'hx-post="/operations/{op.id}/retry"' in finished  # what a finished operation offers instead
    assert '<div id="cancel-result" hx-preserve="true"' in finished  # a cancel's answer stays on the page
    page = (await http.get(f"/operations/{op.id}")).text
    assert "Cancel this operation" not in page


async def test_detail_page_shows_stages_cut_off_by_the_failure_as_cancelled(client: Client, http: Http) -> None:
    op = await client.create("orders")
    for stage in ("ingest", "validate"):
        await client.start(op.id, stage)
        await client.succeed(op.id, stage)
    await client.start(op.id, "geo")
    await client.start(op.id, "fraud")
    await client.fail(op.id, "fraud", "timeout", retryable=True)
    await client.start(op.id, "profile")
    failed = await client.fail(op.id, "geo", "unknown country", retryable=False)
    assert failed.operation.status is OpStatus.FAILED
    html = (await http.get(f"/operations/{op.id}")).text
    main = html[html.index("<main>") :]
    assert main.count('<span class="badge st-cancelled">') >= 2  # fraud and profile, in the timeline and history
    assert 'class="st-failed"><title>geo attempt 1: failed' in main
    assert 'class="st-retrying"><title>fraud attempt 1: retrying' in main  # it failed before the end
    assert 'class="st-cancelled"><title>profile attempt 1: cancelled' in main
    assert "still running" not in main


async def test_unknown_operation_is_a_404_page_without_internals(http: Http) -> None:
    response = await http.get("/operations/doesnotexist")
    assert response.status_code == 404
    assert "not found" in response.text and "Traceback" not in response.text
    bad = await http.get("/operations/bad%20id")
    assert bad.status_code == 400


async def test_cancel_needs_csrf_then_is_revision_checked(client: Client, http: Http) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    refused = await http.post(f"/operations/{op.id}/cancel", data={"reason": "no token"})
    assert refused.status_code == 403
    assert (await client.get(op.id)).status is OpStatus.RUNNING
    token = await csrf_token(http)
    done = await http.post(
        f"/operations/{op.id}/cancel", data={"reason": "operator"}, headers={"X-CSRFToken": token, "HX-Request": "true"}
    )
    assert done.status_code == 200 and "cancelled" in done.text
    cancelled = await client.get(op.id)
    assert cancelled.status is OpStatus.CANCELLED and cancelled.cancel is not None
    assert cancelled.cancel.reason == "operator" and cancelled.cancel.by == "dashboard"
    again = await http.post(f"/operations/{op.id}/cancel", headers={"X-CSRFToken": token, "HX-Request": "true"})
    assert again.status_code == 409 and "already cancelled" in again.text


async def test_cancel_works_after_a_restart_with_another_csrf_secret(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    # The default secret is random per process: after a restart the browser still holds the
    # old process's csrftoken cookie, which the new secret does not sign.
    from dataclasses import replace

    op = await client.create("orders")
    before = create_app(replace(dashboard_settings, secret="a" * 32))
    after = create_app(replace(dashboard_settings, secret="b" * 32))
    async with AsyncTestClient(app=before, base_url="http://127.0.0.1") as old:
        assert (await old.get(f"/operations/{op.id}")).status_code == 200
        stale = old.cookies["csrftoken"]
        jar = old.cookies
    async with AsyncTestClient(app=after, base_url="http://127.0.0.1") as new:
        new.cookies = jar  # the same browser
        page = await new.get(f"/operations/{op.id}")
        found = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
        assert found is not None
        token = found.group(1)
        assert token != stale and new.cookies["csrftoken"] == token  # a fresh token, and the cookie replaced
        done = await new.post(
            f"/operations/{op.id}/cancel",
            data={"_csrf_token": token, "reason": "after restart"},
            headers={"HX-Request": "true"},
        )
        assert done.status_code == 200, done.text[:300]
        again = await new.get("/")  # a valid cookie is kept as it is
        assert "set-cookie" not in again.headers and new.cookies["csrftoken"] == token
    assert (await client.get(op.id)).status is OpStatus.CANCELLED


async def test_get_never_changes_state(client: Client, http: Http) -> None:
    op = await client.create("orders")
    response = await http.get(f"/operations/{op.id}/cancel")
    assert response.status_code in (404, 405)
    assert (await client.get(op.id)).status is OpStatus.PENDING


async def test_security_headers_on_pages_and_errors(client: Client, http: Http) -> None:
    op = await client.create("orders")
    responses = [await http.get(url) for url in ("/", "/operations/nothere", "/static/dashboard.css", "/nope")]
    framework = {
        404: responses[-1],  # no route: answered by the router, before any route middleware
        405: await http.put("/"),
        403: await http.post(f"/operations/{op.id}/cancel", data={"reason": "no token"}),  # the CSRF middleware
        # too large while the CSRF middleware reads the form for its token
        413: await http.post(f"/operations/{op.id}/cancel", data={"reason": "x" * 40_000}),
    }
    for status, response in framework.items():
        assert response.status_code == status, (status, response.text[:200])
    for response in [*responses, *framework.values()]:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    assert (await client.get(op.id)).status is OpStatus.PENDING


async def test_htmx_is_served_locally_with_its_version(http: Http) -> None:
    html = (await http.get("/")).text
    assert '<script src="/static/vendor/htmx-2.0.11/htmx.min.js" defer></script>' in html
    assert "unpkg" not in html and "cdn" not in html.lower()
    assert "<script>" not in html and " on" + "click=" not in html
    script = await http.get("/static/vendor/htmx-2.0.11/htmx.min.js")
    assert script.status_code == 200 and "htmx" in script.text[:2000]
    assert (await http.get("/static/vendor/htmx-ext-sse-2.2.4/sse.min.js")).status_code == 200


async def test_request_body_limit(client: Client, http: Http) -> None:
    op = await client.create("orders")
    token = await csrf_token(http)
    response = await http.post(
        f"/api/operations/{op.id}:cancel",
        content=b'{"reason": "' + b"x" * 40_000 + b'"}',
        headers={"X-CSRFToken": token, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert (await client.get(op.id)).status is OpStatus.PENDING


async def test_api_operation_is_shaped_like_a_long_running_operation(client: Client, http: Http) -> None:
    op = await client.create("orders", metadata={"k": "v"})
    await client.start(op.id, "ingest")
    failed = await client.fail(op.id, "ingest", "bad input", retryable=False, code="E1")
    response = await http.get(f"/api/operations/{op.id}")
    body = response.json()
    assert response.headers["etag"] == f'"{failed.revision}"'
    assert body["name"] == f"operations/{op.id}" and body["done"] is True
    assert body["error"]["message"] == "stage ingest failed: bad input"
    assert body["error"]["details"][0]["code"] == "E1"
    assert "response" not in body and body["metadata"]["metadata"] == {"k": "v"}
    cached = await http.get(f"/api/operations/{op.id}", headers={"If-None-Match": f'"{failed.revision}"'})
    assert cached.status_code == 304
    missing = await http.get("/api/operations/nothere")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


async def test_api_list_with_filter_expression_and_page_token(client: Client, app: Litestar, http: Http) -> None:
    ids = await populate(client, 12)
    await eventually(lambda: state_of(app).index.status_counts().get("failed") == 2)
    response = await http.get(
        "/api/operations",
        params={"filter": "status=failed AND stage=validate AND stage_status=failed", "page_size": "1"},
    )
    body = response.json()
    assert len(body["operations"]) == 1 and body["next_page_token"]
    second = (
        await http.get(
            "/api/operations",
            params={"filter": "status=failed", "page_token": body["next_page_token"], "page_size": "1"},
        )
    ).json()
    found = {body["operations"][0]["metadata"]["id"], second["operations"][0]["metadata"]["id"]}
    assert found == {ids[2], ids[8]}
    bad = await http.get("/api/operations", params={"filter": "status"})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_api_cancel_with_csrf_and_colon_method(client: Client, http: Http) -> None:
    op = await client.create("orders")
    assert (await http.post(f"/api/operations/{op.id}:cancel")).status_code == 403
    token = await csrf_token(http)
    response = await http.post(
        f"/api/operations/{op.id}:cancel", json={"reason": "api test"}, headers={"X-CSRFToken": token}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["done"] is True and body["error"]["code"] == 1 and "api test" in body["error"]["message"]
    again = await http.post(f"/api/operations/{op.id}:cancel", headers={"X-CSRFToken": token})
    assert again.status_code == 409
    unknown_method = await http.post(f"/api/operations/{op.id}:delete", headers={"X-CSRFToken": token})
    assert unknown_method.status_code == 404


async def test_write_token_is_required_when_configured(client: Client, dashboard_settings: DashboardSettings) -> None:
    from dataclasses import replace

    app = create_app(replace(dashboard_settings, auth_token="secret-token"))
    op = await client.create("orders")
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        token = await csrf_token(http)
        headers = {"X-CSRFToken": token}
        refused = await http.post(f"/api/operations/{op.id}:cancel", headers=headers)
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        wrong = await http.post(f"/api/operations/{op.id}:cancel", headers={**headers, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await client.get(op.id)).status is OpStatus.PENDING
        page = (await http.get(f"/operations/{op.id}")).text  # reads stay open
        assert 'name="token"' in page
        basic = base64.b64encode(b"anyone:secret-token").decode()
        ok = await http.post(f"/api/operations/{op.id}:cancel", headers={**headers, "Authorization": f"Basic {basic}"})
        assert ok.status_code == 200
        op2 = await client.create("orders")
        form = await http.post(
            f"/operations/{op2.id}/cancel", data={"token": "secret-token"}, headers={**headers, "HX-Request": "true"}
        )
        assert form.status_code == 200
        assert (await client.get(op2.id)).status is OpStatus.CANCELLED


async def test_bearer_token_writes_without_csrf_and_ambient_credentials_still_need_it(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    from dataclasses import replace

    app = create_app(replace(dashboard_settings, auth_token="secret-token"))
    op = await client.create("orders")
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:  # no cookie, no CSRF token
        basic = base64.b64encode(b"anyone:secret-token").decode()
        ambient = await http.post(f"/api/operations/{op.id}:cancel", headers={"Authorization": f"Basic {basic}"})
        assert ambient.status_code == 403  # a browser resends basic auth by itself: CSRF still applies
        plain = await http.post(f"/api/operations/{op.id}:cancel")
        assert plain.status_code == 401  # no credentials at all: asked for the token first
        wrong = await http.post(f"/api/operations/{op.id}:cancel", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await client.get(op.id)).status is OpStatus.PENDING
        ok = await http.post(
            f"/api/operations/{op.id}:cancel",
            json={"reason": "script"},
            headers={"Authorization": "Bearer secret-token"},
        )
        assert ok.status_code == 200, ok.text
        assert "csrftoken" not in http.cookies
    cancelled = await client.get(op.id)
    assert cancelled.status is OpStatus.CANCELLED
    assert cancelled.cancel is not None and cancelled.cancel.reason == "script"


async def test_openapi_healthz_and_metrics(client: Client, app: Litestar, http: Http) -> None:
    await client.create("orders")
    await eventually(lambda: len(state_of(app).index) == 1)
    schema = (await http.get("/schema/openapi.json")).json()
    assert "/api/operations/{name}" in schema["paths"] and "/" not in schema["paths"]
    assert {"/api/overview", "/api/archive/operations"} <= set(schema["paths"])
    overview = schema["paths"]["/api/overview"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert overview["$ref"].endswith("/Overview")
    health = await http.get("/healthz")
    assert health.status_code == 200 and health.json()["operations"] == 1 and health.json()["archive"] == "disabled"
    await http.get("/")
    metrics = (await http.get("/metrics")).text
    assert 'kvstate_dashboard_operations{status="pending"} 1.0' in metrics
    assert 'kvstate_dashboard_render_seconds_count{view="overview.html"}' in metrics


async def test_corrupt_value_is_shown_as_corrupt_not_a_crash(client: Client, app: Litestar, http: Http) -> None:
    await client._open_store().js.publish(client._open_store().subject("op.broken"), b"\x00\x01not json <b>bold</b>")
    await eventually(lambda: "broken" in state_of(app).index)
    listing = (await http.get("/operations", params={"status": "corrupt"})).text
    assert "broken" in listing
    detail = await http.get("/operations/broken")
    assert detail.status_code == 200
    main = detail.text[detail.text.index("<main>") :]
    assert "corrupt, revision" in main and "first 22 of 22 bytes" in main, main[:1500]
    assert "<b>bold</b>" not in detail.text
    api = (await http.get("/api/operations", params={"status": "corrupt"})).json()
    assert api["operations"][0]["error"]["code"] == 15


async def test_api_reports_a_corrupt_value_as_data_loss_and_refuses_to_cancel_it(client: Client, http: Http) -> None:
    await client._open_store().js.publish(client._open_store().subject("op.broken"), b"\x00\x01not json")
    response = await http.get("/api/operations/broken")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == "operations/broken" and body["done"] is False
    assert body["error"]["code"] == 15 and "corrupt value at revision" in body["error"]["message"]  # as in the list
    assert body["metadata"]["status"] == "corrupt"
    assert response.headers["etag"] == f'"{body["metadata"]["revision"]}"'
    token = await csrf_token(http)
    cancel = await http.post("/api/operations/broken:cancel", headers={"X-CSRFToken": token})
    assert cancel.status_code == 409, cancel.text
    error = cancel.json()["error"]
    assert error["code"] == 409 and error["status"] == "DATA_LOSS" and "corrupt value" in error["message"]
    form = await http.post("/operations/broken/cancel", headers={"X-CSRFToken": token, "HX-Request": "true"})
    assert form.status_code == 409 and "Corrupt value" in form.text


async def test_archive_page_explains_when_not_configured(http: Http) -> None:
    html = (await http.get("/archive")).text
    assert "not configured" in html and "DATABASE_URL" in html


async def test_api_archive_search_without_an_archive_is_a_503_problem(http: Http) -> None:
    response = await http.get("/api/archive/operations", params={"status": "failed"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == 503 and error["status"] == "UNAVAILABLE"
    assert "not configured" in error["message"] and "DATABASE_URL" in error["message"]
    bad = await http.get("/api/archive/operations", params={"status": "running"})  # the filters are checked first
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    unknown = await http.get("/api/archive/operations", params={"stage": "geo"})
    assert unknown.status_code == 400 and "unknown archive filter" in unknown.json()["error"]["message"]


async def test_api_archive_search_has_the_archive_pages_filters_and_keyset_pages(
    client: Client, dashboard_settings: DashboardSettings, database_url: str
) -> None:
    from dataclasses import replace

    from test_dashboard_archive import archived_operations

    ids = await archived_operations(client, database_url)
    app = create_app(replace(dashboard_settings, database_url=database_url))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:

        async def search(**params: str) -> list[dict[str, Any]]:
            response = await http.get("/api/archive/operations", params=params)
            assert response.status_code == 200, response.text
            operations: list[dict[str, Any]] = response.json()["operations"]
            return operations

        everything = await search()
        assert {op["name"] for op in everything} == {f"operations/{op_id}" for op_id in ids.values()}
        by_id = {op["metadata"]["id"]: op for op in everything}
        api_get = (await http.get(f"/api/operations/{ids['failed']}")).json()
        assert by_id[ids["failed"]] == api_get  # the same resource as GET /api/operations/{id}
        assert all(op["done"] and op["metadata"]["archived"] is True for op in everything)
        assert by_id[ids["failed"]]["error"]["code"] == 10 and "bad bytes" in by_id[ids["failed"]]["error"]["message"]
        assert by_id[ids["cancelled"]]["error"]["code"] == 1 and "response" in by_id[ids["succeeded"]]
        failed = await search(status="failed", failed_stage="ingest")
        assert [op["metadata"]["id"] for op in failed] == [ids["failed"]]
        assert [op["metadata"]["id"] for op in await search(status="succeeded,cancelled", pipeline="orders")] == [
            ids["cancelled"],
            ids["succeeded"],
        ]  # newest finished first
        assert [op["metadata"]["id"] for op in await search(meta="customer=succeeded-c")] == [ids["succeeded"]]
        by_json = await search(meta="tier=2", id=ids["cancelled"][:20])
        assert [op["metadata"]["id"] for op in by_json] == [ids["cancelled"]]
        assert await search(finished_before="2000-01-01T00:00:00") == []
        assert len(await search(finished_after="2000-01-01T00:00:00")) == 3

        pages, token = [], ""
        for _ in range(4):
            params = {"page_size": "1", **({"page_token": token} if token else {})}
            body = (await http.get("/api/archive/operations", params=params)).json()
            pages.append([op["metadata"]["id"] for op in body["operations"]])
            token = body["next_page_token"]
            if not token:
                break
        assert [op_id for page in pages for op_id in page] == [op["metadata"]["id"] for op in everything]
        assert all(len(page) == 1 for page in pages)
        garbage = await http.get("/api/archive/operations", params={"page_token": "garbage"})
        assert garbage.status_code == 400 and garbage.json()["error"]["status"] == "INVALID_ARGUMENT"
        too_big = await http.get("/api/archive/operations", params={"page_size": "501"})
        assert too_big.status_code == 400 and "page_size" in too_big.json()["error"]["message"]


async def test_sse_stream_signals_a_change(client: Client, live_server: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=live_server, timeout=5) as http, http.stream("GET", "/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith(": connected")
        await client.create("orders")
        received = []
        async with asyncio.timeout(3):
            async for line in lines:
                received.append(line)
                if line.startswith("data:"):
                    break
        assert "event: change" in received and "data: 1" in received  # a signal, never operation data
