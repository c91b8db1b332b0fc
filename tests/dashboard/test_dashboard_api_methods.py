"""The operation methods of the JSON API (AIP-151 shapes): :apply, :cancel with If-Match, the :wait long poll.

Through Litestar's test client on the harness's real NATS; every refused write is checked
to have changed nothing by reading the revision before and after.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace
from typing import Any

import pytest
from dashboard_support import csrf_token
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from kvstate import Client, OpStatus, StageStatus

Http = AsyncTestClient[Litestar]


@pytest.fixture
async def writer(http: Http) -> dict[str, str]:
    """Headers of an API write from a browser-like client: the CSRF token (its cookie is in ``http``)."""
    return {"X-CSRFToken": await csrf_token(http)}


async def revision_of(client: Client, op_id: str) -> int:
    return (await client.get(op_id)).revision


async def test_apply_runs_an_event_and_answers_the_operation_with_its_etag(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    op = await client.create("orders")
    started = await http.post(
        f"/api/operations/{op.id}:apply", json={"type": "start", "stage": "ingest", "worker": "js-1"}, headers=writer
    )
    assert started.status_code == 200, started.text
    stored = await client.get(op.id)
    assert started.headers["etag"] == f'"{stored.revision}"' and started.headers["kvstate-outcome"] == "applied"
    body = started.json()
    assert body["name"] == f"operations/{op.id}" and body["done"] is False
    assert "response" not in body and "error" not in body
    assert (
        body["metadata"]["stages"]["ingest"]["status"] == "running" and body["metadata"]["revision"] == stored.revision
    )
    assert stored.stage("ingest").worker == "js-1"

    event = {"type": "succeed", "stage": "ingest", "metadata": {"bytes": 12}}
    done = await http.post(
        f"/api/operations/{op.id}:apply",
        json=event,
        headers={**writer, "Idempotency-Key": '"ingest-done-1"', "If-Match": started.headers["etag"]},
    )
    assert done.status_code == 200, done.text
    after = await client.get(op.id)
    assert after.stage("ingest").status is StageStatus.SUCCEEDED and after.stage("ingest").metadata == {"bytes": 12}
    assert "ingest-done-1" in after.events  # the Idempotency-Key is the event id
    retried = await http.post(
        f"/api/operations/{op.id}:apply", json=event, headers={**writer, "Idempotency-Key": "ingest-done-1"}
    )
    assert retried.status_code == 200 and retried.headers["kvstate-outcome"] == "duplicate"
    # The same request again, If-Match and all (its answer was lost): the write's duplicate, not a 412.
    same_request = await http.post(
        f"/api/operations/{op.id}:apply",
        json=event,
        headers={**writer, "Idempotency-Key": '"ingest-done-1"', "If-Match": started.headers["etag"]},
    )
    assert same_request.status_code == 200 and same_request.headers["kvstate-outcome"] == "duplicate"
    assert same_request.headers["etag"] == f'"{after.revision}"'
    assert retried.headers["etag"] == f'"{after.revision}"' and await revision_of(client, op.id) == after.revision
    same_id = await http.post(
        f"/api/operations/{op.id}:apply",
        json={**event, "event_id": "ingest-done-1"},
        headers={**writer, "Idempotency-Key": "ingest-done-1"},
    )
    assert same_id.status_code == 200 and same_id.headers["kvstate-outcome"] == "duplicate"  # agreeing ids are fine


async def test_apply_of_a_late_event_is_stale_and_writes_nothing(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    await client.fail(op.id, "ingest", "flaky", retryable=True)
    await client.start(op.id, "ingest")  # attempt 2 supersedes attempt 1
    before = await revision_of(client, op.id)
    late = await http.post(
        f"/api/operations/{op.id}:apply", json={"type": "succeed", "stage": "ingest", "attempt": 1}, headers=writer
    )
    assert late.status_code == 200 and late.headers["kvstate-outcome"] == "stale"  # as the write service says
    assert late.headers["etag"] == f'"{before}"' and await revision_of(client, op.id) == before


async def test_apply_finishing_the_operation_answers_response_in_the_aip_151_shape(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    op = await client.create("orders", metadata={"customer": 7})
    for stage in ("ingest", "validate", "geo", "fraud"):
        await client.start(op.id, stage)
        await client.succeed(op.id, stage, metadata={"score": 1} if stage == "geo" else None)
    await client.skip(op.id, "profile")
    await client.start(op.id, "merge")
    await client.succeed(op.id, "merge")
    await client.start(op.id, "notify")
    response = await http.post(
        f"/api/operations/{op.id}:apply", json={"type": "succeed", "stage": "notify"}, headers=writer
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["done"] is True and "error" not in body
    assert body["response"] == {
        "@type": "kvstate.OperationResult",
        "metadata": {"customer": 7},
        "stages": {"geo": {"score": 1}},
    }
    assert body["result"] == {"metadata": {"customer": 7}, "stages": {"geo": {"score": 1}}}  # deprecated alias
    assert body["metadata"]["@type"] == "kvstate.Operation" and body["metadata"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "headers", "status", "rpc", "words"),
    [
        (b"{not json", {}, 400, "INVALID_ARGUMENT", "not JSON"),
        (b"", {}, 400, "INVALID_ARGUMENT", "empty"),
        (b"[1, 2]", {}, 400, "INVALID_ARGUMENT", "not a kvstate event"),
        (b'{"type": "explode", "stage": "ingest"}', {}, 400, "INVALID_ARGUMENT", "not a kvstate event"),
        (b'{"type": "succeed"}', {}, 400, "INVALID_ARGUMENT", "stage"),  # a required field missing
        (b'{"type": "start", "stage": "paint"}', {}, 400, "INVALID_ARGUMENT", "paint"),  # unknown stage
        (b'{"type": "start", "stage": "geo"}', {}, 409, "FAILED_PRECONDITION", "geo"),  # dependencies not finished
        (b'{"type": "skip", "stage": "ingest"}', {}, 409, "FAILED_PRECONDITION", "optional"),
        (b'{"type": "start", "stage": "ingest", "traceparent": "nope"}', {}, 400, "INVALID_ARGUMENT", "traceparent"),
        (b'{"type": "start", "stage": "ingest"}', {"If-Match": '"1"'}, 412, "FAILED_PRECONDITION", "revision"),
        (b'{"type": "start", "stage": "ingest"}', {"If-Match": 'W/"2"'}, 400, "INVALID_ARGUMENT", "If-Match"),
        (b'{"type": "start", "stage": "ingest"}', {"If-Match": "two"}, 400, "INVALID_ARGUMENT", "If-Match"),
        (b'{"type": "start", "stage": "ingest"}', {"If-Match": '"1", "2"'}, 400, "INVALID_ARGUMENT", "If-Match"),
        (
            b'{"type": "start", "stage": "ingest", "event_id": "a"}',
            {"Idempotency-Key": "b"},
            400,
            "INVALID_ARGUMENT",
            "Idempotency-Key",
        ),
        (b'{"type": "start", "stage": "ingest"}', {"Idempotency-Key": "has space"}, 400, "INVALID_ARGUMENT", "Idem"),
        (b'{"type": "start", "stage": "ingest"}', {"Idempotency-Key": "k" * 129}, 400, "INVALID_ARGUMENT", "Idem"),
        (
            b'{"type": "merge", "patch": {"blob": "' + b"x" * 70_000 + b'"}}',
            {},
            413,
            "INVALID_ARGUMENT",
            "too large",
        ),
    ],
    ids=[
        "malformed-json",
        "empty",
        "not-an-object",
        "unknown-type",
        "missing-field",
        "unknown-stage",
        "illegal-transition",
        "skip-required-stage",
        "bad-traceparent",
        "wrong-revision",
        "weak-etag",
        "malformed-if-match",
        "two-revisions",
        "conflicting-event-id",
        "bad-key",
        "long-key",
        "oversized-body",
    ],
)
async def test_bad_apply_is_a_clear_4xx_and_changes_nothing(
    client: Client,
    http: Http,
    writer: dict[str, str],
    body: bytes,
    headers: dict[str, str],
    status: int,
    rpc: str,
    words: str,
) -> None:
    op = await client.create("orders")
    await client.merge_metadata(op.id, {"k": 1})  # revision 2: "1" is a stale If-Match
    before = await client.get(op.id)
    response = await http.post(
        f"/api/operations/{op.id}:apply",
        content=body,
        headers={**writer, "Content-Type": "application/json", **headers},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == rpc and words.lower() in error["message"].lower(), error
    assert "Traceback" not in response.text
    after = await client.get(op.id)
    assert after.revision == before.revision and after == before


async def test_apply_takes_a_body_up_to_64_kib_though_other_requests_stop_at_dashboard_max_body(
    client: Client, http: Http, writer: dict[str, str]
) -> None:
    op = await client.create("orders")
    blob = "x" * 40_000  # over DASHBOARD_MAX_BODY (16 KiB), under the write service's 64 KiB
    response = await http.post(
        f"/api/operations/{op.id}:apply", json={"type": "merge", "patch": {"blob": blob}}, headers=writer
    )
    assert response.status_code == 200, response.text
    assert (await client.get(op.id)).metadata == {"blob": blob}


async def test_apply_on_a_missing_or_corrupt_operation(client: Client, http: Http, writer: dict[str, str]) -> None:
    event = {"type": "start", "stage": "ingest"}
    missing = await http.post("/api/operations/nothere:apply", json=event, headers=writer)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    await client._open_store().js.publish(client._open_store().subject("op.broken"), b"not json")
    corrupt = await http.post("/api/operations/broken:apply", json=event, headers=writer)
    assert corrupt.status_code == 409 and corrupt.json()["error"]["status"] == "DATA_LOSS"
    bad_id = await http.post("/api/operations/bad%20id:apply", json=event, headers=writer)
    assert bad_id.status_code == 400 and bad_id.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_apply_needs_the_write_token_and_csrf_as_cancel_does(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    app = create_app(replace(dashboard_settings, auth_token="secret-token"))
    op = await client.create("orders")
    before = await revision_of(client, op.id)
    event = {"type": "start", "stage": "ingest"}
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        anonymous = await http.post(f"/api/operations/{op.id}:apply", json=event)
        assert anonymous.status_code == 401  # the token is asked for first, before the CSRF check
        basic = {"Authorization": "Basic " + base64.b64encode(b"me:secret-token").decode()}
        no_csrf = await http.post(f"/api/operations/{op.id}:apply", json=event, headers=basic)
        assert no_csrf.status_code == 403  # the token as basic auth, which browsers resend: CSRF applies
        token = await csrf_token(http)
        no_token = await http.post(f"/api/operations/{op.id}:apply", json=event, headers={"X-CSRFToken": token})
        assert no_token.status_code == 401 and no_token.json()["error"]["status"] == "UNAUTHENTICATED"
        wrong = await http.post(f"/api/operations/{op.id}:apply", json=event, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        assert await revision_of(client, op.id) == before
        http.cookies.clear()  # a script: no cookie, no CSRF token, the bearer token alone
        ok = await http.post(
            f"/api/operations/{op.id}:apply", json=event, headers={"Authorization": "Bearer secret-token"}
        )
        assert ok.status_code == 200, ok.text
    assert (await client.get(op.id)).stage("ingest").status is StageStatus.RUNNING


async def test_cancel_honours_if_match_and_idempotency_key(client: Client, http: Http, writer: dict[str, str]) -> None:
    op = await client.create("orders")
    started = await client.start(op.id, "ingest")
    stale_tag = f'"{started.revision - 1}"'
    refused = await http.post(
        f"/api/operations/{op.id}:cancel", json={"reason": "old view"}, headers={**writer, "If-Match": stale_tag}
    )
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert await revision_of(client, op.id) == started.revision
    malformed = await http.post(f"/api/operations/{op.id}:cancel", headers={**writer, "If-Match": "latest"})
    assert malformed.status_code == 400 and await revision_of(client, op.id) == started.revision
    headers = {**writer, "If-Match": f'"{started.revision}"', "Idempotency-Key": "cancel-1"}
    cancelled = await http.post(f"/api/operations/{op.id}:cancel", json={"reason": "seen"}, headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    stored = await client.get(op.id)
    assert stored.status is OpStatus.CANCELLED and cancelled.headers["etag"] == f'"{stored.revision}"'
    body = cancelled.json()
    assert body["done"] is True and body["error"] == {"code": 1, "message": "cancelled: seen"}
    retried = await http.post(
        f"/api/operations/{op.id}:cancel", json={"reason": "seen"}, headers={**writer, "Idempotency-Key": "cancel-1"}
    )
    assert retried.status_code == 200 and retried.headers["kvstate-outcome"] == "duplicate"  # a retry, not a 409
    again = await http.post(f"/api/operations/{op.id}:cancel", headers=writer)
    assert again.status_code == 409 and await revision_of(client, op.id) == stored.revision


async def test_every_operation_answer_carries_its_etag(client: Client, http: Http) -> None:
    op = await client.create("orders")
    revision = await revision_of(client, op.id)
    for url in (f"/api/operations/{op.id}", f"/api/operations/{op.id}:wait?timeout=0s"):
        response = await http.get(url)
        assert response.status_code == 200 and response.headers["etag"] == f'"{revision}"', url
        assert response.json()["metadata"]["revision"] == revision


async def test_wait_answers_as_soon_as_another_task_finishes_the_operation(client: Client, live_server: str) -> None:
    # A real server in this event loop (Litestar's test client blocks the loop for the length of a request).
    import httpx

    op = await client.create("orders")
    await client.start(op.id, "ingest")

    async def finish_soon() -> float:
        await asyncio.sleep(0.3)
        await client.fail(op.id, "ingest", "disk on fire", retryable=False)
        return time.monotonic()

    async with httpx.AsyncClient(base_url=live_server, timeout=30) as http:
        began = time.monotonic()
        finisher = asyncio.create_task(finish_soon())
        response = await http.get(f"/api/operations/{op.id}:wait", params={"timeout": "20s"})
        answered = time.monotonic()
        finished = await finisher
    assert response.status_code == 200, response.text
    assert began + 0.3 <= finished <= answered < finished + 5, answered - began  # woke on the change
    body = response.json()
    assert body["done"] is True and body["error"]["code"] == 10
    assert body["error"]["message"] == "stage ingest failed: disk on fire"  # kvstate.derive.failure_message
    assert response.headers["etag"] == f'"{await revision_of(client, op.id)}"'


async def test_wait_times_out_with_the_current_operation_not_an_error(client: Client, http: Http) -> None:
    op = await client.create("orders")
    started = await client.start(op.id, "ingest")
    began = time.monotonic()
    response = await http.get(f"/api/operations/{op.id}:wait", params={"timeout": "700ms"})
    elapsed = time.monotonic() - began
    assert response.status_code == 200, response.text
    assert 0.7 <= elapsed < 5, elapsed
    body = response.json()
    assert body["done"] is False and "error" not in body and "response" not in body
    assert body["metadata"]["stages"]["ingest"]["status"] == "running"
    assert response.headers["etag"] == f'"{started.revision}"'


async def test_wait_on_a_finished_missing_or_corrupt_operation_answers_at_once(client: Client, http: Http) -> None:
    op = await client.create("orders")
    await client.cancel(op.id, reason="done already")
    began = time.monotonic()
    finished = await http.get(f"/api/operations/{op.id}:wait", params={"timeout": "30s"})
    assert finished.status_code == 200 and finished.json()["done"] is True
    missing = await http.get("/api/operations/nothere:wait")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    await client._open_store().js.publish(client._open_store().subject("op.broken"), b"not json")
    corrupt = await http.get("/api/operations/broken:wait", params={"timeout": "30s"})
    assert corrupt.status_code == 200 and corrupt.json()["error"]["code"] == 15  # it will not become done
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("timeout", ["soon", "-1s", "1h", "1e9"])
async def test_wait_with_an_unusable_timeout_is_a_400(client: Client, http: Http, timeout: str) -> None:
    op = await client.create("orders")
    response = await http.get(f"/api/operations/{op.id}:wait", params={"timeout": timeout})
    assert response.status_code == 400 and "timeout" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/api/operations/abc:cancel", 405),
        ("GET", "/api/operations/abc:apply", 405),
        ("POST", "/api/operations/abc:wait", 405),
        ("POST", "/api/operations/abc", 405),
        ("POST", "/api/operations/abc:delete", 404),
        ("GET", "/api/operations/abc:delete", 404),
        ("GET", "/api/operations/%7Bname%7D:wait", 400),  # the literal documentation path: not an id
    ],
)
async def test_methods_answer_404_when_unknown_and_405_for_the_wrong_verb(
    http: Http, writer: dict[str, str], method: str, url: str, status: int
) -> None:
    response = await http.request(method, url, headers=writer)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status


async def test_openapi_shows_each_method_at_its_real_path(http: Http) -> None:
    schema: dict[str, Any] = (await http.get("/schema/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths["/api/operations/{name}"]) == {"get"}  # the dispatching POST is not listed under {name}
    apply = paths["/api/operations/{name}:apply"]["post"]
    assert [(p["name"], p["in"]) for p in apply["parameters"]] == [
        ("name", "path"),
        ("If-Match", "header"),
        ("Idempotency-Key", "header"),
    ]
    assert {"oneOf"} <= set(apply["requestBody"]["content"]["application/json"]["schema"])  # the event union
    assert {"ETag", "Kvstate-Outcome"} <= set(apply["responses"]["200"]["headers"])
    assert apply["responses"]["412"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "post" in paths["/api/operations/{name}:cancel"]
    wait = paths["/api/operations/{name}:wait"]["get"]
    assert ("timeout", "query") in [(p["name"], p["in"]) for p in wait["parameters"]]
    resource = schema["components"]["schemas"]["OperationResource"]["properties"]
    assert {"name", "done", "metadata", "error", "response"} <= set(resource)
