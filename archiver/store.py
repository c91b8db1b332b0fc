"""Writes to the archive: batches of snapshots guarded by revision, and dead letters.

One batch is one transaction. Ids not archived yet (nearly all of them) are written
with COPY straight into the table: multi-row inserts, the least WAL. Newer revisions
of archived ids are copied into a temporary staging table (not WAL-logged) and upserted
from there with

    ON CONFLICT (id) DO UPDATE ... WHERE archived_operations.revision < EXCLUDED.revision

so a replayed or late snapshot never overwrites a newer one, and a replay of the same
revision changes nothing. If another archiver inserts one of the new ids first, the
COPY fails on the primary key and the whole batch is upserted instead. The caller
acknowledges messages only after ``write`` returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Self

import asyncpg

from archiver import migrations
from archiver._pg import init_connection
from archiver.errors import ArchiveUnavailable
from archiver.rows import COLUMNS, ArchiveRow

__all__ = ["DATABASE_ERRORS", "ArchiveStore", "DeadLetter", "WriteResult", "database_error"]

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
"""What a lost, restarting or refusing PostgreSQL raises (caught by class, never by text)."""

_STAGING = "archive_staging"
_UPDATABLE = [c for c in COLUMNS if c != "id"]
_UPSERT = (
    f"INSERT INTO archived_operations ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM {_STAGING} "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATABLE)
    + " WHERE archived_operations.revision < EXCLUDED.revision RETURNING id"
)
_DEAD_LETTER = (
    "INSERT INTO archive_dead_letters (key, revision, raw, error) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (key, revision) DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A value that could not be decoded, parked with its raw bytes."""

    key: str
    revision: int
    raw: bytes
    error: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch changed: rows inserted or replaced by a newer revision, and the rest."""

    written: frozenset[str]
    duplicates: int
    dead_letters: int


def database_error(exc: BaseException, what: str) -> ArchiveUnavailable:
    """``exc`` (one of DATABASE_ERRORS) as an ArchiveUnavailable carrying PostgreSQL's detail and hint."""
    return ArchiveUnavailable(
        f"{what}: {type(exc).__name__}: {exc}",
        detail=getattr(exc, "detail", None),
        hint=getattr(exc, "hint", None),
    )


async def _init_writer(conn: asyncpg.Connection) -> None:
    await init_connection(conn)
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} "
        "(LIKE archived_operations INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


class ArchiveStore:
    """The archive tables, for writing. Open with ``async with ArchiveStore.open(dsn) as store``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, *, max_size: int = 4, timeout: float = 10.0) -> AsyncIterator[Self]:
        """Apply the migrations, then open a pool; ArchiveUnavailable when PostgreSQL cannot be reached."""
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot connect to PostgreSQL") from exc
        try:
            await migrations.apply(conn)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot apply the archive migrations") from exc
        finally:
            await conn.close()
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_size, init=_init_writer, timeout=timeout, command_timeout=60
            )
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot open a PostgreSQL pool") from exc
        try:
            yield cls(pool)
        finally:
            await pool.close()

    async def write(self, rows: Sequence[ArchiveRow], dead_letters: Sequence[DeadLetter] = ()) -> WriteResult:
        """Upsert ``rows`` and park ``dead_letters`` in one transaction.

        Rows for the same id within the batch collapse to the newest revision first.
        Raises ArchiveUnavailable (nothing written) when PostgreSQL fails.
        """
        newest: dict[str, ArchiveRow] = {}
        for row in rows:
            kept = newest.get(row.id)
            if kept is None or kept.revision < row.revision:
                newest[row.id] = row
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        written = await self._write_rows(conn, list(newest.values()), fast=True)
                        parked = await self._park(conn, dead_letters)
                except asyncpg.UniqueViolationError:
                    # One of these ids is archived already (a redelivery, a reopened operation
                    # finishing again, another instance): the guarded upsert decides row by row.
                    async with conn.transaction():
                        written = await self._write_rows(conn, list(newest.values()), fast=False)
                        parked = await self._park(conn, dead_letters)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, f"cannot write a batch of {len(rows)} rows") from exc
        return WriteResult(written, len(rows) - len(written), parked)

    @staticmethod
    async def _write_rows(
        conn: asyncpg.pool.PoolConnectionProxy, rows: list[ArchiveRow], *, fast: bool
    ) -> frozenset[str]:
        """``fast``: everything by one COPY into the table (multi-row inserts, the least WAL), which
        fails with UniqueViolationError when one of the ids is archived already; otherwise
        COPY into a staging table and the upsert guarded by revision, which writes only rows
        that are new or newer than the archived ones."""
        if not rows:
            return frozenset()
        if fast:
            await conn.copy_records_to_table("archived_operations", records=rows, columns=COLUMNS)
            return frozenset(row.id for row in rows)
        await conn.copy_records_to_table(_STAGING, records=rows, columns=COLUMNS)
        return frozenset(r["id"] for r in await conn.fetch(_UPSERT))

    @staticmethod
    async def _park(conn: asyncpg.pool.PoolConnectionProxy, dead_letters: Sequence[DeadLetter]) -> int:
        parked = 0
        for letter in dead_letters:
            status = await conn.execute(_DEAD_LETTER, letter.key, letter.revision, letter.raw, letter.error)
            parked += status.endswith(" 1")
        return parked

    async def archived_revisions(self, ids: Sequence[str]) -> dict[str, int]:
        """The archived revision of each of ``ids`` that is archived."""
        try:
            async with self._pool.acquire() as conn:
                records = await conn.fetch(
                    "SELECT id, revision FROM archived_operations WHERE id = ANY($1::text[])", list(ids)
                )
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot read archived revisions") from exc
        return {r["id"]: int(r["revision"]) for r in records}

    async def archived_snapshots(self, ids: Sequence[str]) -> dict[str, tuple[int, float]]:
        """(archived revision, finished_at as a timestamp) of each of ``ids`` that is archived."""
        try:
            async with self._pool.acquire() as conn:
                records = await conn.fetch(
                    "SELECT id, revision, finished_at FROM archived_operations WHERE id = ANY($1::text[])", list(ids)
                )
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot read archived revisions") from exc
        return {r["id"]: (int(r["revision"]), r["finished_at"].timestamp()) for r in records}

    async def ping(self) -> None:
        """Raise ArchiveUnavailable unless PostgreSQL answers."""
        try:
            async with self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "PostgreSQL does not answer") from exc
