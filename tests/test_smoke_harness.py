import asyncio
from pathlib import Path

import asyncpg

from devstack.servers import PostgresServer
from kvstate import Client


async def test_client_reaches_real_nats(client: Client) -> None:
    op = await client.create("orders")
    assert (await client.get(op.id)).revision == op.revision


async def test_database_url_is_a_fresh_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetchval("select count(*) from pg_tables where schemaname = 'public'")
    finally:
        await conn.close()
    assert tables == 0


async def test_postgres_starts_in_a_folder_too_deep_for_a_unix_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # the socket path would pass the kernel's 107 bytes
    server = PostgresServer(deep, settings={"fsync": "off"})
    await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(server.dsn("postgres"))
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
