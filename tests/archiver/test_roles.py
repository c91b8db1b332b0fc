"""PostgreSQL roles: the archiver as a plain owner role, the reader role it grants, nothing more.

Roles are cluster-wide, so every test names its own (``ARCHIVER_READER_ROLE`` and logins
with a random suffix) on the shared test server.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest
from archiver_support import ROWS_PIPELINE

from archiver.errors import ArchiveAccessDenied, ArchiveUnavailable
from archiver.grants import ARCHIVE_TABLES, grant_reader
from archiver.read import ArchiveReader
from archiver.rows import row_for
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore
from archiver.worker import Archiver
from devstack.servers import PostgresServer
from kvstate import Client, OpStatus, new_operation

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

_WRITES = (
    "INSERT INTO {table} SELECT * FROM {table} LIMIT 1",
    "UPDATE {table} SET {column} = {column}",
    "DELETE FROM {table}",
    "TRUNCATE {table}",
    "ALTER TABLE {table} ADD COLUMN intruder integer",
    "DROP TABLE {table}",
)

_A_COLUMN = {
    "archived_operations": "revision",
    "archive_dead_letters": "revision",
    "archive_sources": "source",
    "archive_schema_version": "version",
}


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def as_role(database_url: str, role: str) -> str:
    """``database_url`` (the superuser's, trust auth) for ``role``."""
    return database_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


async def admin_execute(database_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def owned_database(postgres_server: PostgresServer, owner: str, *attributes: str) -> str:
    """A new database owned by a new LOGIN role ``owner`` (no superuser, no CREATEROLE unless asked); its URL as it."""
    database = name("db")
    await admin_execute(
        postgres_server.dsn(),
        f"CREATE ROLE {owner} LOGIN {' '.join(attributes)}",
        f"CREATE DATABASE {database} OWNER {owner}",
    )
    return postgres_server.dsn(database, user=owner)


def a_row(op_id: str = "op1") -> object:
    op = new_operation(op_id, ROWS_PIPELINE, T0, {"n": 1})
    op = msgspec.structs.replace(op, status=OpStatus.SUCCEEDED, finished_at=T0, updated_at=T0, revision=3)
    return row_for(op, T0)


async def test_the_archiver_runs_as_an_owner_role_without_superuser_or_createrole(
    client: Client, archiver_settings: ArchiverSettings, postgres_server: PostgresServer
) -> None:
    owner, reader = name("owner"), name("reader")
    await admin_execute(postgres_server.dsn(), f"CREATE ROLE {reader} NOLOGIN")  # made by an administrator
    url = await owned_database(postgres_server, owner)
    op = await client.create("orders")
    await client.cancel(op.id, reason="test")
    settings = dataclasses.replace(archiver_settings, database_url=url, reader_role=reader)
    async with Archiver(settings) as archiver:  # migrations, advisory locks, source registration, COPY
        counts = await archiver.run(burst=True)
    assert counts.archived == 1 and counts.removed == 1
    conn = await asyncpg.connect(url)
    try:
        me = "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        assert await conn.fetchval(me) is False
        owners = dict(await conn.fetch("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"))
        assert owners == dict.fromkeys(ARCHIVE_TABLES, owner)  # the list of archiver.grants is every table
        for table in ARCHIVE_TABLES:
            assert await conn.fetchval("SELECT has_table_privilege($1, $2, 'SELECT')", reader, table), table
            for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                assert not await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", reader, table, privilege)
    finally:
        await conn.close()


async def test_a_login_in_the_reader_role_reads_the_archive_and_postgresql_refuses_its_writes(
    database_url: str, postgres_server: PostgresServer
) -> None:
    reader, login = name("reader"), name("dash")
    async with ArchiveStore.open(database_url, reader_role=reader) as store:
        assert store.reader_access is not None and store.reader_access.created
        await store.write([a_row()])  # type: ignore[list-item]
    await admin_execute(postgres_server.dsn(), f"CREATE ROLE {login} LOGIN IN ROLE {reader}")
    async with ArchiveReader.connect(as_role(database_url, login)) as archive:
        assert (await archive.get("op1")) is not None
        assert [i.id for i in (await archive.search(limit=10)).items] == ["op1"]
        assert await archive.dead_letters() == []
    conn = await asyncpg.connect(as_role(database_url, login))
    try:
        for table in ARCHIVE_TABLES:
            for statement in _WRITES:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement.format(table=table, column=_A_COLUMN[table]))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.intruder (x integer)")
        assert await conn.fetchval("SELECT count(*) FROM archived_operations") == 1  # nothing changed
    finally:
        await conn.close()


async def test_a_login_outside_the_reader_role_gets_archive_access_denied_not_asyncpg_errors(
    database_url: str, postgres_server: PostgresServer
) -> None:
    outsider = name("outsider")
    async with ArchiveStore.open(database_url, reader_role=name("reader")) as store:
        await store.write([a_row()])  # type: ignore[list-item]
    await admin_execute(postgres_server.dsn(), f"CREATE ROLE {outsider} LOGIN")
    async with ArchiveReader.connect(as_role(database_url, outsider)) as archive:
        for call in (archive.get("op1"), archive.search(limit=5), archive.dead_letters()):
            with pytest.raises(ArchiveAccessDenied) as info:
                await call
            assert isinstance(info.value, ArchiveUnavailable)  # callers that catch the base keep working
            assert isinstance(info.value.__cause__, asyncpg.InsufficientPrivilegeError)
            assert "permission denied" in str(info.value)
    with pytest.raises(ArchiveAccessDenied) as unknown:
        async with ArchiveReader.connect(as_role(database_url, name("nobody"))):
            pass
    assert "does not exist" in str(unknown.value)


async def test_an_archiver_with_createrole_creates_the_reader_role_nologin(postgres_server: PostgresServer) -> None:
    reader = name("reader")
    url = await owned_database(postgres_server, name("owner"), "CREATEROLE")
    async with ArchiveStore.open(url, reader_role=reader) as store:
        assert store.reader_access is not None
        assert store.reader_access.created and store.reader_access.problems == ()
        assert set(store.reader_access.granted) == {f"SELECT ON {table}" for table in ARCHIVE_TABLES}
    async with ArchiveStore.open(url, reader_role=reader) as again:
        assert again.reader_access == dataclasses.replace(store.reader_access, created=False, granted=())
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", reader) is False
    finally:
        await conn.close()


async def test_a_reader_role_the_archiver_may_not_create_is_a_warning_and_archiving_goes_on(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    reader = name("reader")
    url = await owned_database(postgres_server, name("owner"))
    with caplog.at_level(logging.WARNING, logger="archiver.grants"):
        async with ArchiveStore.open(url, reader_role=reader) as store:
            assert store.reader_access is not None and not store.reader_access.created
            (problem,) = store.reader_access.problems
            assert f'CREATE ROLE "{reader}" NOLOGIN' in problem
            result = await store.write([a_row()])  # type: ignore[list-item]
            assert result.written == {"op1"}
    assert f'CREATE ROLE "{reader}" NOLOGIN' in caplog.text
    # an administrator creates the role: the next start grants it
    await admin_execute(postgres_server.dsn(), f"CREATE ROLE {reader} NOLOGIN")
    async with ArchiveStore.open(url, reader_role=reader) as store:
        assert store.reader_access is not None and store.reader_access.problems == ()
        assert "SELECT ON archived_operations" in store.reader_access.granted


async def test_tables_another_role_owns_are_reported_with_the_grant_to_run(
    database_url: str, postgres_server: PostgresServer
) -> None:
    """An archiver that may write the tables but does not own them cannot grant them: it says what to run."""
    writer, reader = name("writer"), name("reader")
    async with ArchiveStore.open(database_url, reader_role=None):  # migrated by the superuser, no grants
        pass
    await admin_execute(
        database_url,
        f"CREATE ROLE {writer} LOGIN",
        f"CREATE ROLE {reader} NOLOGIN",
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {writer}",
    )
    conn = await asyncpg.connect(as_role(database_url, writer))
    try:
        access = await grant_reader(conn, reader)
        assert access.granted == ()
        assert {p.rsplit("run ", 1)[1] for p in access.problems} == {
            f'GRANT SELECT ON "public"."{table}" TO "{reader}"' for table in ARCHIVE_TABLES
        }
        assert not await conn.fetchval("SELECT has_table_privilege($1, 'archived_operations', 'SELECT')", reader)
    finally:
        await conn.close()
