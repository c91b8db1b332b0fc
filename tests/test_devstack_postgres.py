"""The local PostgreSQL with passwords (devstack.servers, .pgauth, .pgroles), as ``kvstate up`` runs it."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import asyncpg
import pytest

from archiver import migrations
from archiver.store import ArchiveStore
from devstack.pgauth import load_passwords, scram_verifier
from devstack.pgroles import ARCHIVER_ROLE, DASHBOARD_ROLE, provision
from devstack.servers import PostgresServer
from kvstate.settings import redact_url

PASSWORD = "a-generated-password-0123"


def hba_methods(server: PostgresServer) -> set[str]:
    methods = set()
    for line in (server.data_dir / "pg_hba.conf").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            methods.add(fields[3] if fields[0] == "local" else fields[4])
    return methods


async def refused(dsn: str) -> BaseException | None:
    try:
        conn = await asyncpg.connect(dsn)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        return exc
    await conn.close()
    return None


async def test_a_password_server_asks_every_connection_for_it(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg", settings={"fsync": "off"}, password=PASSWORD)
    await asyncio.to_thread(server.start)
    try:
        assert server.auth == "scram-sha-256" and hba_methods(server) == {"scram-sha-256"}
        assert await refused(server.dsn("postgres")) is None
        wrong = await refused(server.dsn("postgres", password="nope"))
        assert isinstance(wrong, asyncpg.InvalidPasswordError)
        without = await refused(f"postgresql://postgres@127.0.0.1:{server.port}/postgres")
        assert isinstance(without, asyncpg.InvalidPasswordError), repr(without)
    finally:
        await asyncio.to_thread(server.stop)
    assert not (tmp_path / "pg" / "initdb.pwfile").exists()  # initdb's copy of the password is gone
    assert PASSWORD not in server.log_path.read_text()


async def test_a_trust_cluster_of_an_earlier_run_is_converted_and_keeps_its_data(tmp_path: Path) -> None:
    old = PostgresServer(tmp_path / "pg", settings={"fsync": "off"})  # what kvstate up made before passwords
    await asyncio.to_thread(old.start)
    try:
        assert hba_methods(old) == {"trust"}
        conn = await asyncpg.connect(old.dsn("postgres"))
        await conn.execute("CREATE DATABASE kvstate")
        await conn.close()
        async with ArchiveStore.open(old.dsn("kvstate"), reader_role=None):  # the tables, owned by postgres
            pass
    finally:
        await asyncio.to_thread(old.stop)

    passwords = load_passwords(tmp_path / "pgpass", ("postgres", ARCHIVER_ROLE, DASHBOARD_ROLE))
    server = PostgresServer(tmp_path / "pg", settings={"fsync": "off"}, password=passwords["postgres"])
    await asyncio.to_thread(server.start)
    try:
        assert hba_methods(server) == {"scram-sha-256"}
        without = await refused(f"postgresql://postgres@127.0.0.1:{server.port}/postgres")
        assert isinstance(without, asyncpg.InvalidPasswordError), repr(without)  # trust is gone
        await provision(server, "kvstate", passwords[ARCHIVER_ROLE], passwords[DASHBOARD_ROLE])
        await provision(server, "kvstate", passwords[ARCHIVER_ROLE], passwords[DASHBOARD_ROLE])  # idempotent
        archiver_url = server.dsn("kvstate", user=ARCHIVER_ROLE, password=passwords[ARCHIVER_ROLE])
        dashboard_url = server.dsn("kvstate", user=DASHBOARD_ROLE, password=passwords[DASHBOARD_ROLE])
        async with ArchiveStore.open(archiver_url) as store:  # the owner now: it grants kvstate_reader
            assert store.reader_access is not None and store.reader_access.problems == ()
        conn = await asyncpg.connect(archiver_url)
        try:
            assert (
                await conn.fetchval("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
                is False
            )
            owners = {
                r["tableowner"]
                for r in await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
            }
            assert owners == {ARCHIVER_ROLE}
        finally:
            await conn.close()
        conn = await asyncpg.connect(dashboard_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM archive_schema_version") == len(migrations.MIGRATIONS)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM archived_operations")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert not any(p in server.log_path.read_text() for p in passwords.values())  # verifiers only, never the text


def test_passwords_are_generated_once_into_a_file_no_one_else_can_read(tmp_path: Path) -> None:
    path = tmp_path / "pgpass"
    previous = os.umask(0)  # even a permissive umask leaves the file private from its creation
    try:
        first = load_passwords(path, ("postgres", "kvstate"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(set(first.values())) == 2 and all(len(p) >= 32 for p in first.values())
    assert load_passwords(path, ("postgres", "kvstate")) == first  # reused
    more = load_passwords(path, ("postgres", "kvstate", "kvstate_dashboard"))
    assert {k: more[k] for k in first} == first and more["kvstate_dashboard"] not in first.values()
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"127.0.0.1:*:*:{role}:{more[role]}" for role in more]  # libpq's password-file format
    path.chmod(0o644)
    assert load_passwords(path, ("postgres",)) == {"postgres": first["postgres"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # narrowed: libpq ignores a readable password file
    path.write_text("# edited by hand\n127.0.0.1:*:*:postgres:with\\:colon\n")
    assert load_passwords(path, ("postgres",)) == {"postgres": "with:colon"}


def test_scram_verifiers_are_salted_and_shown_urls_carry_no_password() -> None:
    one, two = scram_verifier(PASSWORD), scram_verifier(PASSWORD)
    assert one != two and one.startswith("SCRAM-SHA-256$4096:") and PASSWORD not in one
    assert scram_verifier(PASSWORD, salt=b"0" * 16) == scram_verifier(PASSWORD, salt=b"0" * 16)
    with pytest.raises(ValueError):
        scram_verifier("with space")
    url = f"postgresql://kvstate:{PASSWORD}@127.0.0.1:5432/kvstate"
    assert redact_url(url) == "postgresql://kvstate:***@127.0.0.1:5432/kvstate"
    assert redact_url("postgresql://kvstate@h/db") == "postgresql://kvstate@h/db"
