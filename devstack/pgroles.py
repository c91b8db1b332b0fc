"""The roles of the PostgreSQL that ``kvstate up`` starts: an owner for the archiver, a reader for the dashboard.

As the superuser ``postgres`` (the only role that may do it), at every start:

- ``kvstate`` (``ARCHIVER_ROLE``): LOGIN, no other attribute; owns the database ``kvstate``
  and, through its migrations, the archive's tables;
- ``kvstate_reader`` (``archiver.grants.DEFAULT_READER_ROLE``): NOLOGIN; the archiver grants it
  SELECT on its tables when it starts;
- ``kvstate_dashboard`` (``DASHBOARD_ROLE``): LOGIN, a member of ``kvstate_reader`` and nothing else.

Each role gets its password as a SCRAM verifier (``devstack.pgauth``), set again at every
start so that the password file stays the truth. A database an earlier, trust-only
``kvstate up`` made (owned by ``postgres``, its tables too) is handed to ``kvstate``.
"""

from __future__ import annotations

import asyncpg

from archiver.grants import DEFAULT_READER_ROLE
from devstack.pgauth import scram_verifier
from devstack.servers import PostgresServer

__all__ = ["ARCHIVER_ROLE", "DASHBOARD_ROLE", "provision"]

ARCHIVER_ROLE = "kvstate"
DASHBOARD_ROLE = "kvstate_dashboard"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _login_role(conn: asyncpg.Connection, role: str, password: str) -> None:
    verifier = scram_verifier(password)  # base64 and "$:" only: nothing to escape in the literal
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    verb = "ALTER" if exists else "CREATE"
    await conn.execute(f"{verb} ROLE {_ident(role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{verifier}'")


async def provision(server: PostgresServer, database: str, archiver_password: str, dashboard_password: str) -> None:
    """Create (or bring up to date) the roles and the database ``database`` of ``server``, as its superuser."""
    conn = await asyncpg.connect(server.dsn("postgres"))
    try:
        await _login_role(conn, ARCHIVER_ROLE, archiver_password)
        await _login_role(conn, DASHBOARD_ROLE, dashboard_password)
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DEFAULT_READER_ROLE):
            await conn.execute(f"CREATE ROLE {_ident(DEFAULT_READER_ROLE)} NOLOGIN")
        await conn.execute(f"GRANT {_ident(DEFAULT_READER_ROLE)} TO {_ident(DASHBOARD_ROLE)}")
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
            database,
        )
        if owner is None:
            await conn.execute(f"CREATE DATABASE {_ident(database)} OWNER {_ident(ARCHIVER_ROLE)}")
        elif owner != ARCHIVER_ROLE:
            await conn.execute(f"ALTER DATABASE {_ident(database)} OWNER TO {_ident(ARCHIVER_ROLE)}")
    finally:
        await conn.close()
    await _hand_over_tables(server.dsn(database))


async def _hand_over_tables(database_dsn: str) -> None:
    """Give ``ARCHIVER_ROLE`` the tables of the public schema some other role owns (a trust-era archive
    whose archiver connected as postgres), so that it can migrate them and grant their reader."""
    conn = await asyncpg.connect(database_dsn)
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(tablename) AS name FROM pg_tables WHERE schemaname = 'public' AND tableowner <> $1",
            ARCHIVER_ROLE,
        )
        for table in tables:
            await conn.execute(f"ALTER TABLE public.{table['name']} OWNER TO {_ident(ARCHIVER_ROLE)}")
    finally:
        await conn.close()
