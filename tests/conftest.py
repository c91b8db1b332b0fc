"""Shared fixtures: real servers started once per run, isolation per test.

- ``nats_server`` / ``postgres_server``: session-scoped child processes on random
  loopback ports, data in pytest's temp dir, stopped by pid at the end.
- ``settings``: a fresh bucket name per test, so tests never see each other's data.
- ``client``: an open kvstate Client on that bucket with ``PIPELINE`` stored.
- ``database_url``: a fresh, empty PostgreSQL database per test.
- ``private_nats``: a server of the test's own, for tests that kill or restart it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings

from devstack.servers import NatsServer, PostgresServer
from kvstate import Client, Pipeline, Settings, StageSpec

# Property tests share two cores with the servers: a slow example is load, not a bug, so
# no per-example deadline (hypothesis would otherwise report a rerun under it as flaky).
hypothesis_settings.register_profile("kvstate", deadline=None)
hypothesis_settings.load_profile("kvstate")

PIPELINE = Pipeline(
    name="orders",
    heartbeat_timeout=30.0,
    stages=(
        StageSpec(name="ingest"),
        StageSpec(name="validate", after=("ingest",), max_attempts=3),
        StageSpec(name="geo", after=("validate",)),
        StageSpec(name="fraud", after=("validate",)),
        StageSpec(name="profile", after=("validate",), optional=True),
        StageSpec(name="merge", after=("geo", "fraud", "profile")),
        StageSpec(name="notify", after=("merge",), optional=True, deadline=5.0),
    ),
)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"), die_with_parent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(
        tmp_path_factory.mktemp("pg"), settings={"fsync": "off", "max_connections": "200"}, die_with_parent=True
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def bucket_name() -> str:
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture
def settings(nats_server: NatsServer, bucket_name: str) -> Settings:
    return Settings(nats_url=nats_server.url, bucket=bucket_name)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        yield kv


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    name = "t" + uuid.uuid4().hex[:16]
    asyncio.run(_create_database(postgres_server.dsn(), name))
    return postgres_server.dsn(name)
