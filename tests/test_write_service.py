"""The write service (kvstate serve): requests from any NATS client go through the state machine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from kvstate import Client, Settings, StageStatus
from kvstate.service import MAX_REQUEST_BYTES, WriteService

JS_DIR = Path(__file__).parent / "js"


@pytest.fixture
async def service(client: Client) -> AsyncIterator[WriteService]:
    async with WriteService(client) as svc:
        yield svc


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[NATS]:
    raw = NATS()
    await raw.connect(settings.nats_url)
    yield raw
    await raw.drain()


async def request(nc: NATS, subject: str, body: object, headers: dict[str, str] | None = None) -> tuple[str, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=10, headers=headers)
    return (msg.headers or {})["Kvstate-Status"], json.loads(msg.data)


async def test_events_from_a_raw_nats_client_go_through_the_state_machine(
    service: WriteService, nc: NATS, client: Client, settings: Settings
) -> None:
    prefix = f"kvstate.{settings.bucket}"
    code, created = await request(nc, f"{prefix}.create.orders", {"metadata": {"order": 7}, "event_id": "c1"})
    assert code == "OK" and created["operation"]["metadata"] == {"order": 7}
    op_id = created["operation"]["id"]
    code, again = await request(nc, f"{prefix}.create.orders", {"op_id": op_id, "event_id": "c1"})
    assert code == "OK" and again["revision"] == created["revision"]  # a retried create is idempotent
    start = {"type": "start", "stage": "ingest", "worker": "w", "event_id": "e1"}
    code, started = await request(nc, f"{prefix}.apply.{op_id}", start)
    assert code == "OK" and started["outcome"] == "applied"
    code, duplicate = await request(nc, f"{prefix}.apply.{op_id}", start)
    assert duplicate["outcome"] == "duplicate" and duplicate["revision"] == started["revision"]
    done = {"type": "succeed", "stage": "ingest", "event_id": "e2"}
    code, succeeded = await request(nc, f"{prefix}.apply.{op_id}", done, {"If-Match": str(started["revision"])})
    assert code == "OK" and succeeded["operation"]["stages"]["ingest"]["status"] == "succeeded"
    late = {"type": "start", "stage": "ingest", "attempt": 1, "event_id": "e3"}
    code, stale = await request(nc, f"{prefix}.apply.{op_id}", late)
    assert code == "OK" and stale["outcome"] == "stale"
    stored = await client.get(op_id)
    assert stored.revision == succeeded["revision"] and stored.stage("ingest").status is StageStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("subject_tail", "body", "headers", "code", "error_type"),
    [
        ("apply.{id}", b"{not json", None, "INVALID_ARGUMENT", "ValidationError"),
        ("apply.{id}", {"type": "explode", "stage": "ingest"}, None, "INVALID_ARGUMENT", "ValidationError"),
        ("apply.{id}", {"type": "start", "stage": "nope"}, None, "INVALID_ARGUMENT", "UnknownStage"),
        ("apply.{id}", {"type": "start", "stage": "merge"}, None, "FAILED_PRECONDITION", "InvalidTransition"),
        (
            "apply.{id}",
            {"type": "merge", "patch": {"a": 1}},
            {"If-Match": "1"},
            "FAILED_PRECONDITION",
            "RevisionMismatch",
        ),
        (
            "apply.{id}",
            {"type": "merge", "patch": {"a": 1}},
            {"If-Match": "W/x"},
            "INVALID_ARGUMENT",
            "ValidationError",
        ),
        (
            "apply.{id}",
            {"type": "merge", "patch": {"a": "x" * MAX_REQUEST_BYTES}},
            None,
            "INVALID_ARGUMENT",
            "ValidationError",
        ),
        ("apply.nosuchop", {"type": "start", "stage": "ingest"}, None, "NOT_FOUND", "OperationNotFound"),
        ("apply.{id}", {"type": "merge", "patch": [1, 2]}, None, "INVALID_ARGUMENT", "ValidationError"),
        ("create.nosuchpipeline", {}, None, "INVALID_ARGUMENT", "UnknownPipeline"),
        ("create.orders", {"op_id": "{id}"}, None, "ALREADY_EXISTS", "OperationExists"),
        ("create.orders", {"op_id": "bad id!"}, None, "INVALID_ARGUMENT", "InvalidKey"),
        ("create.orders", {"surprise": 1}, None, "INVALID_ARGUMENT", "ValidationError"),
    ],
)
async def test_bad_requests_get_a_typed_error_and_change_nothing(
    service: WriteService,
    nc: NATS,
    client: Client,
    settings: Settings,
    subject_tail: str,
    body: object,
    headers: dict[str, str] | None,
    code: str,
    error_type: str,
) -> None:
    op = await client.create("orders")
    await client.merge_metadata(op.id, {"before": 1})
    before = await client.get(op.id)
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{id}", op.id))
    got, reply = await request(nc, f"kvstate.{settings.bucket}.{subject_tail.format(id=op.id)}", body, headers)
    assert (got, reply["error"]["code"], reply["error"]["type"]) == (code, code, error_type), reply
    assert (await client.get(op.id)).revision == before.revision
    code_after, still = await request(
        nc, f"kvstate.{settings.bucket}.apply.{op.id}", {"type": "start", "stage": "ingest"}
    )
    assert code_after == "OK" and still["outcome"] == "applied"  # the service goes on


async def test_several_instances_share_the_requests_as_a_queue_group(
    client: Client, settings: Settings, nc: NATS
) -> None:
    async with Client(settings) as other_client, WriteService(client) as one, WriteService(other_client) as two:
        ops = [await client.create("orders") for _ in range(40)]
        replies = await asyncio.gather(
            *(
                request(nc, f"kvstate.{settings.bucket}.apply.{op.id}", {"type": "start", "stage": "ingest"})
                for op in ops
            )
        )
        assert all(code == "OK" and reply["outcome"] == "applied" for code, reply in replies)
        assert one.replies.get("OK", 0) > 0 and two.replies.get("OK", 0) > 0
        assert one.replies["OK"] + two.replies["OK"] == 40


@pytest.mark.slow
async def test_a_javascript_service_reports_stages_alongside_python_services(
    service: WriteService, client: Client, settings: Settings
) -> None:
    """geo is reported by node with the NATS JavaScript client while Python reports fraud and profile."""
    node = shutil.which("node")
    assert node is not None and (JS_DIR / "node_modules").is_dir(), "scripts/setup.sh installs node and tests/js"
    ops = [await client.create("orders") for _ in range(30)]
    for op in ops:
        for stage in ("ingest", "validate"):
            await client.start(op.id, stage)
            await client.succeed(op.id, stage)
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "KVSTATE_BUCKET": settings.bucket,
        "OP_IDS": ",".join(op.id for op in ops),
    }
    js = await asyncio.create_subprocess_exec(
        node, str(JS_DIR / "report_stages.mjs"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    async def python_stages(op_id: str) -> None:
        await client.start(op_id, "fraud", worker="fraud-py")
        await client.succeed(op_id, "fraud", worker="fraud-py", metadata={"score": 3})
        await client.skip(op_id, "profile", reason="anonymous")

    await asyncio.gather(*(python_stages(op.id) for op in ops))
    out, err = await asyncio.wait_for(js.communicate(), 60)
    assert js.returncode == 0, err.decode()
    counts = json.loads(out)
    n = len(ops)
    assert counts == {
        "applied": 2 * n,
        "duplicate": n,
        "stale": n,
        "FAILED_PRECONDITION": n,
        "INVALID_ARGUMENT": 1,
    }, counts
    for op in ops:
        final = await client.get(op.id)
        assert final.stage("geo").status is StageStatus.SUCCEEDED and final.stage("geo").metadata == {
            "country": "NL",
            "by": "js",
        }
        assert final.stage("fraud").metadata == {"score": 3}  # 0 lost on either side
        assert final.stage("profile").status is StageStatus.SKIPPED
        assert "js" not in final.metadata  # the conditional patch on an old revision wrote nothing


async def test_kvstate_serve_answers_until_sigterm(settings: Settings, client: Client, nc: NATS) -> None:
    env = {**os.environ, "NATS_URL": settings.nats_url, "KVSTATE_BUCKET": settings.bucket}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "kvstate"), "serve", env=env, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"answering" in line
        op = await client.create("orders")
        code, reply = await request(nc, f"kvstate.{settings.bucket}.apply.{op.id}", {"type": "cancel", "reason": "x"})
        assert code == "OK" and reply["operation"]["status"] == "cancelled"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b'"OK": 1' in err
