import asyncpg

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
