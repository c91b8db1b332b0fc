"""Read-only access to the archive: the reader role and its grants, checked at every start.

The archiver's role owns the archive: its migrations create the tables. Everyone else who
reads it (the dashboard, ``kvstate archive``, reports) logs in as a role that is a member
of one NOLOGIN group role, ``ARCHIVER_READER_ROLE`` (``kvstate_reader`` by default), which
may SELECT the archive's tables and nothing more (docs/security.md#postgresql).

At every start, after the migrations, the archiver makes that so, under an advisory lock
(two archivers granting at once would collide on the catalog):

1. the reader role is created (NOLOGIN) when it does not exist and the archiver's role may
   create roles (CREATEROLE); an administrator may have created it instead;
2. the reader gets USAGE on the archive's schema when it lacks it;
3. the reader gets SELECT on each archive table it cannot read yet; tables later
   migrations add are granted on the first start that has them.

Each step is taken only when needed, so a deployment where an administrator already made
the role and the grants asks nothing of the archiver. A step the archiver's role may not
take is logged as a warning with the statement an administrator can run instead, and
archiving goes on: the archiver itself needs none of it. Nothing here needs a superuser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

__all__ = ["ARCHIVE_TABLES", "DEFAULT_READER_ROLE", "ReaderAccess", "grant_reader"]

log = logging.getLogger("archiver.grants")

DEFAULT_READER_ROLE = "kvstate_reader"
ARCHIVE_TABLES = ("archived_operations", "archive_dead_letters", "archive_sources", "archive_schema_version")
"""Every table the migrations create (tests/archiver/test_roles.py checks the list against them)."""

_LOCK_ID = 0x6B7673_6772616E  # "kvs" "gran": one archiver at a time grants


@dataclass(frozen=True, slots=True)
class ReaderAccess:
    """What one start did for the reader role, and what it could not do."""

    role: str
    created: bool = False
    """the archiver created the role now"""
    granted: tuple[str, ...] = ()
    """the privileges granted now (``USAGE ON SCHEMA public``, ``SELECT ON archived_operations``, ...)"""
    problems: tuple[str, ...] = ()
    """what was left undone, each with the statement an administrator can run"""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def grant_reader(conn: asyncpg.Connection, role: str) -> ReaderAccess:
    """Make ``role`` (created NOLOGIN if missing and allowed) able to read the archive tables, only that.

    Raises asyncpg's errors other than a missing privilege (the caller translates them);
    a missing privilege is a warning and a ``problems`` entry."""
    created = False
    granted: list[str] = []
    problems: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        me = await conn.fetchval("SELECT current_user")
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            try:
                async with conn.transaction():
                    await conn.execute(f"CREATE ROLE {_ident(role)} NOLOGIN")
                created = True
            except asyncpg.DuplicateObjectError:
                pass  # an archiver of another database in this cluster created it a moment ago
            except asyncpg.InsufficientPrivilegeError:
                problems.append(
                    f"role {role} does not exist and {me} may not create it: as an administrator run "
                    f"CREATE ROLE {_ident(role)} NOLOGIN, then restart the archiver"
                )
        if not problems:
            schema = await conn.fetchval("SELECT current_schema()")
            statement = f"GRANT USAGE ON SCHEMA {_ident(schema)} TO {_ident(role)}"
            if not await conn.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", role, schema):
                await _grant(conn, statement)
                if await conn.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", role, schema):
                    granted.append(f"USAGE ON SCHEMA {schema}")
                else:
                    problems.append(f"{me} may not grant {role} the use of schema {schema}: run {statement}")
            for table in ARCHIVE_TABLES:
                qualified = f"{_ident(schema)}.{_ident(table)}"
                if await conn.fetchval("SELECT to_regclass($1)", qualified) is None:
                    continue
                check = "SELECT has_table_privilege($1, $2, 'SELECT')"
                if await conn.fetchval(check, role, qualified):
                    continue
                statement = f"GRANT SELECT ON {qualified} TO {_ident(role)}"
                await _grant(conn, statement)
                if await conn.fetchval(check, role, qualified):
                    granted.append(f"SELECT ON {table}")
                else:
                    problems.append(f"{me} may not grant {role} SELECT on {table} (not its owner): run {statement}")
    access = ReaderAccess(role, created, tuple(granted), tuple(problems))
    if created:
        log.info("created the reader role %s (NOLOGIN)", role)
    if granted:
        log.info("granted %s to %s", ", ".join(granted), role)
    for problem in problems:
        log.warning("read-only access to the archive: %s", problem)
    return access


async def _grant(conn: asyncpg.Connection, statement: str) -> None:
    """Run ``statement``; a refusal leaves the privilege missing, which the caller checks afterwards.

    PostgreSQL refuses a GRANT with an error when the role holds no privilege on the
    object, and with only a warning when it holds some but without grant option."""
    try:
        async with conn.transaction():
            await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError:
        pass
