"""Versioned SQL migrations of the archive, applied at start, idempotently.

Files are named ``NNNN_name.sql`` and applied in order, each once, inside one
transaction that holds an advisory lock, so several archivers starting together apply
them once. ``archive_schema_version`` records what was applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from archiver.errors import MigrationError

__all__ = ["MIGRATIONS", "Migration", "apply", "current_version"]

_LOCK_ID = 0x6B7673_61726368  # "kvs" "arch": one advisory lock for migrations
_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS archive_schema_version (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: its version, name and text."""

    version: int
    name: str
    sql: str


def _load() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE_RE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration files must be numbered 1..n without gaps, found {versions}")
    return tuple(found)


MIGRATIONS = _load()


async def current_version(conn: asyncpg.Connection) -> int:
    """The highest applied migration (0 on an empty database)."""
    exists = await conn.fetchval("SELECT to_regclass('archive_schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM archive_schema_version"))


async def apply(conn: asyncpg.Connection) -> list[int]:
    """Apply every migration not yet applied; returns the versions applied now (often none).

    MigrationError when the database was migrated by a newer archiver, or a file fails.
    """
    newest = MIGRATIONS[-1].version
    applied_now: list[int] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(_VERSION_TABLE)
            applied = {
                int(v) for v in await conn.fetchval("SELECT array_agg(version) FROM archive_schema_version") or []
            }
            if applied and max(applied) > newest:
                raise MigrationError(
                    f"the archive schema is at version {max(applied)}, this archiver knows up to {newest}: "
                    "upgrade the archiver"
                )
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO archive_schema_version (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied_now.append(migration.version)
    except asyncpg.PostgresError as exc:
        detail = getattr(exc, "detail", None)
        raise MigrationError(f"migration failed: {exc}" + (f" ({detail})" if detail else "")) from exc
    return applied_now
