"""Helpers of the archiver tests: lifecycles on the test pipeline, archive and bucket checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from archiver.settings import ArchiverSettings
from kvstate import Client, Operation, Pipeline, StageSpec

ROWS_PIPELINE = Pipeline(
    name="orders",
    heartbeat_timeout=30.0,
    stages=(StageSpec(name="ingest"), StageSpec(name="geo", after=("ingest",))),
)
"""A two-stage pipeline for operations built in memory (store and read tests)."""


async def succeed_all(client: Client, op_id: str) -> Operation:
    """Run every required stage of the test pipeline to success, skipping the optional ones."""
    for stage in ("ingest", "validate"):
        await client.start(op_id, stage, worker="w")
        await client.succeed(op_id, stage, worker="w")
    for stage in ("geo", "fraud"):
        await client.start(op_id, stage, worker="w")
        await client.succeed(op_id, stage, metadata={"stage": stage}, worker="w")
    await client.skip(op_id, "profile", reason="not needed")
    await client.start(op_id, "merge", worker="w")
    await client.succeed(op_id, "merge", worker="w")
    result = await client.skip(op_id, "notify", reason="quiet")
    assert result.operation.done, result.operation.status
    return result.operation


async def fail_at_ingest(client: Client, op_id: str) -> Operation:
    """Fail the first stage for good: the operation fails with failed_stage "ingest"."""
    await client.start(op_id, "ingest", worker="w")
    result = await client.fail(op_id, "ingest", "bad input", retryable=False, code="E_INPUT")
    assert result.operation.done, result.operation.status
    return result.operation


async def finished_ops(client: Client, count: int, *, concurrency: int = 32, metadata_every: int = 0) -> list[str]:
    """``count`` finished operations: cancelled ones (two writes each), a full success every tenth."""
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            op = await client.create("orders", metadata={"n": i, "group": i % 3})
            if i % 10 == 0:
                await succeed_all(client, op.id)
            else:
                await client.cancel(op.id, reason="test", by="tests")
            ids.append(op.id)

    await asyncio.gather(*(one(i) for i in range(count)))
    return ids


async def fetch_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT id, revision, status, archived_at FROM archived_operations")
    finally:
        await conn.close()


async def row_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('archived_operations') IS NOT NULL")
        return int(await conn.fetchval("SELECT count(*) FROM archived_operations")) if exists else 0
    finally:
        await conn.close()


async def live_ids(client: Client) -> set[str]:
    """Ids of the operations in the bucket.

    Retried: ``client.scan()`` can wait forever when keys are purged while it runs (its
    end-of-scan marker is a message with num_pending 0, which a purge can take away).
    """
    for _ in range(5):
        try:
            async with asyncio.timeout(5.0):
                return {op.id async for op in client.scan()}
        except TimeoutError:
            continue
    raise AssertionError("client.scan() did not finish, 5 times in a row")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until ``check()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def assert_exactly_once(client: Client, dsn: str, ids: list[str]) -> None:
    """Every operation archived once (one row per id, none missing, none extra) and gone from the bucket."""
    rows = await fetch_rows(dsn)
    archived = [r["id"] for r in rows]
    assert len(archived) == len(set(archived)), "duplicate rows"
    assert set(archived) == set(ids), f"missing {len(set(ids) - set(archived))}, extra {len(set(archived) - set(ids))}"
    assert not (await live_ids(client)) & set(ids), "archived operations still in the bucket"


def archiver_env(settings: ArchiverSettings, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m archiver`` child running with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHIVER_", "KVSTATE_", "NATS_", "DATABASE_"))}
    env.update(
        NATS_URL=settings.kv.nats_url,
        KVSTATE_BUCKET=settings.kv.bucket,
        DATABASE_URL=settings.database_url,
        ARCHIVER_BATCH_SIZE=str(settings.batch_size),
        ARCHIVER_BATCH_TIMEOUT=str(settings.batch_timeout),
        ARCHIVER_GRACE_PERIOD=str(settings.grace_period),
        ARCHIVER_ACK_WAIT=str(settings.ack_wait),
        ARCHIVER_METRICS_PORT=str(settings.metrics_port),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_archiver(settings: ArchiverSettings, log_path: Path, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    """``python -m archiver`` as a child process of its own session, output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "archiver", *args],
            env=archiver_env(settings, **extra),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child (by its pid) if it is still running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
