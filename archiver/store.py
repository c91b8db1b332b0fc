"""Writes to the archive: batches of snapshots guarded by revision, and dead letters.

A row is identified by (id, source, redrives): ``source`` names the bucket incarnation it
came from (``register_source``), so an id reused by a re-created bucket or another bucket
is a row of its own, and ``redrives`` the operation's life (a re-drive from the archive
starts a new one), so an operation re-driven and finished again keeps its earlier row.
One batch is one transaction, committed with ``synchronous_commit = on`` whatever the
server's default (the caller removes keys once it returns). Ids not archived yet (nearly
all of them) are written with COPY straight into the table: multi-row inserts, the least
WAL. Newer revisions of archived ids are copied into a temporary staging table (not WAL-logged) and upserted
from there with

    ON CONFLICT (id, source, redrives) DO UPDATE ... WHERE archived_operations.revision < EXCLUDED.revision

so a replayed or late snapshot never overwrites a newer one, and a replay of the same
revision changes nothing. If another archiver inserts one of the new ids first, the
COPY fails on the primary key and the whole batch is upserted instead. ``write``
reports which (id, source, revision) the archive holds at exactly that revision after
the commit: only those may be removed from the bucket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Self

import asyncpg

from archiver import grants, migrations
from archiver._pg import DATABASE_ERRORS, database_error, init_connection
from archiver.rows import COLUMNS, ArchiveRow

__all__ = [
    "DATABASE_ERRORS",
    "ArchiveStore",
    "DeadLetter",
    "WriteResult",
    "database_error",
    "init_connection",  # the archive's json/jsonb codecs, for anything that reads or copies its rows
]

_STAGING = "archive_staging"
_KEY = ("id", "source", "redrives")
_UPDATABLE = [c for c in COLUMNS if c not in _KEY]
_UPSERT = (
    f"INSERT INTO archived_operations ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM {_STAGING} "
    "ON CONFLICT (id, source, redrives) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATABLE)
    + " WHERE archived_operations.revision < EXCLUDED.revision RETURNING id, source, redrives"
)
_HELD = (
    "SELECT a.id, a.source, a.redrives, a.revision FROM archived_operations a "
    "JOIN unnest($1::text[], $2::integer[], $3::integer[]) AS k(id, source, redrives) USING (id, source, redrives)"
)
_WRITER_SETTINGS = {"synchronous_commit": "on"}
"""startup parameters of the writer's connections: its commits are durable whatever the server
default (``kvstate up`` runs PostgreSQL with synchronous_commit = off), since keys are
removed from the bucket once they are committed; RESET ALL (on pool release) keeps them"""
_SOURCE_LOCK = 0x6B7673_736F7263  # "kvs" "sorc": registering bucket incarnations one at a time
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
    """ids of the rows inserted or replaced"""
    duplicates: int
    """rows the archive already held at that revision or a newer one"""
    dead_letters: int
    archived: frozenset[tuple[str, int, int]]
    """(id, source, revision) of every row the archive holds at exactly that revision after the
    commit: written now, or a replay of the revision already archived. Rows refused because a
    newer revision is archived are not in it."""


async def _init_writer(conn: asyncpg.Connection) -> None:
    await init_connection(conn)
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} "
        "(LIKE archived_operations INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


class ArchiveStore:
    """The archive tables, for writing. Open with ``async with ArchiveStore.open(dsn) as store``."""

    def __init__(self, pool: asyncpg.Pool, reader_access: grants.ReaderAccess | None = None) -> None:
        self._pool = pool
        self.reader_access = reader_access
        """what the start did for the reader role (``archiver.grants``), None when no role was asked for"""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        max_size: int = 4,
        timeout: float = 10.0,
        reader_role: str | None = grants.DEFAULT_READER_ROLE,
    ) -> AsyncIterator[Self]:
        """Apply the migrations, let ``reader_role`` read the tables (``archiver.grants``; None: leave
        grants alone), then open a pool; ArchiveUnavailable when PostgreSQL cannot be reached."""
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot connect to PostgreSQL") from exc
        reader_access = None
        try:
            await migrations.apply(conn)
            if reader_role is not None:
                reader_access = await grants.grant_reader(conn, reader_role)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot prepare the archive (migrations, reader grants)") from exc
        finally:
            await conn.close()
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                init=_init_writer,
                timeout=timeout,
                command_timeout=60,
                server_settings=_WRITER_SETTINGS,
            )
        except DATABASE_ERRORS as exc:
            raise database_error(exc, "cannot open a PostgreSQL pool") from exc
        try:
            yield cls(pool, reader_access)
        finally:
            await pool.close()

    async def register_source(self, bucket: str, stream_created: datetime) -> int:
        """The source number of the incarnation of ``bucket`` whose stream was created at ``stream_created``.

        Registered on first use; the first incarnation registered after migration 0003
        claims source 0, the rows archived before it.
        """
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SOURCE_LOCK)
                known = await conn.fetchval(
                    "SELECT source FROM archive_sources WHERE bucket = $1 AND stream_created = $2",
                    bucket,
                    stream_created,
                )
                if known is None:
                    known = await conn.fetchval(
                        "UPDATE archive_sources SET bucket = $1, stream_created = $2 "
                        "WHERE source = 0 AND bucket IS NULL RETURNING source",
                        bucket,
                        stream_created,
                    )
                if known is None:
                    known = await conn.fetchval(
                        "INSERT INTO archive_sources (bucket, stream_created) VALUES ($1, $2) RETURNING source",
                        bucket,
                        stream_created,
                    )
        except DATABASE_ERRORS as exc:
            raise database_error(exc, f"cannot register the bucket {bucket!r}") from exc
        return int(known)

    async def write(self, rows: Sequence[ArchiveRow], dead_letters: Sequence[DeadLetter] = ()) -> WriteResult:
        """Upsert ``rows`` and park ``dead_letters`` in one durable transaction.

        Rows for the same (id, source, redrives) within the batch collapse to the newest revision
        first. Raises ArchiveUnavailable (nothing written) when PostgreSQL fails.
        """
        newest: dict[tuple[str, int, int], ArchiveRow] = {}
        for row in rows:
            key = (row.id, row.source, row.redrives)
            kept = newest.get(key)
            if kept is None or kept.revision < row.revision:
                newest[key] = row
        kept_rows = list(newest.values())
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        written = await self._write_rows(conn, kept_rows, fast=True)
                        parked = await self._park(conn, dead_letters)
                    held = frozenset((row.id, row.source, row.revision) for row in kept_rows)
                except asyncpg.UniqueViolationError:
                    # One of these ids is archived already (a redelivery, a reopened operation
                    # finishing again, another instance): the guarded upsert decides row by row.
                    async with conn.transaction():
                        written = await self._write_rows(conn, kept_rows, fast=False)
                        parked = await self._park(conn, dead_letters)
                        held = await self._held(conn, kept_rows)
        except DATABASE_ERRORS as exc:
            raise database_error(exc, f"cannot write a batch of {len(rows)} rows") from exc
        return WriteResult(frozenset(op_id for op_id, _, _ in written), len(rows) - len(written), parked, held)

    @staticmethod
    async def _write_rows(
        conn: asyncpg.pool.PoolConnectionProxy, rows: list[ArchiveRow], *, fast: bool
    ) -> frozenset[tuple[str, int, int]]:
        """``fast``: everything by one COPY into the table (multi-row inserts, the least WAL), which
        fails with UniqueViolationError when one of the ids is archived already; otherwise
        COPY into a staging table and the upsert guarded by revision, which writes only rows
        that are new or newer than the archived ones. Returns (id, source, redrives) of the rows written."""
        if not rows:
            return frozenset()
        if fast:
            await conn.copy_records_to_table("archived_operations", records=rows, columns=COLUMNS)
            return frozenset((row.id, row.source, row.redrives) for row in rows)
        await conn.copy_records_to_table(_STAGING, records=rows, columns=COLUMNS)
        return frozenset((r["id"], r["source"], r["redrives"]) for r in await conn.fetch(_UPSERT))

    @staticmethod
    async def _held(conn: asyncpg.pool.PoolConnectionProxy, rows: list[ArchiveRow]) -> frozenset[tuple[str, int, int]]:
        """(id, source, revision) of ``rows`` that the archive holds at exactly their revision (in the transaction)."""
        records = await conn.fetch(
            _HELD, [row.id for row in rows], [row.source for row in rows], [row.redrives for row in rows]
        )
        archived = {(r["id"], r["source"], r["redrives"]): int(r["revision"]) for r in records}
        return frozenset(
            (row.id, row.source, row.revision)
            for row in rows
            if archived.get((row.id, row.source, row.redrives)) == row.revision
        )

    @staticmethod
    async def _park(conn: asyncpg.pool.PoolConnectionProxy, dead_letters: Sequence[DeadLetter]) -> int:
        parked = 0
        for letter in dead_letters:
            status = await conn.execute(_DEAD_LETTER, letter.key, letter.revision, letter.raw, letter.error)
            parked += status.endswith(" 1")
        return parked

    async def archived_revisions(self, ids: Sequence[str], source: int = 0) -> dict[str, int]:
        """The archived revision of each of ``ids`` that is archived from the incarnation ``source``."""
        return {op_id: revision for op_id, (revision, _) in (await self.archived_snapshots(ids, source)).items()}

    async def archived_snapshots(self, ids: Sequence[str], source: int = 0) -> dict[str, tuple[int, float]]:
        """(archived revision, finished_at as a timestamp) of the latest life of each of ``ids`` archived
        from ``source`` (a re-driven operation has a row per life: the earlier ones are not what the
        bucket holds)."""
        try:
            async with self._pool.acquire() as conn:
                records = await conn.fetch(
                    "SELECT DISTINCT ON (id) id, revision, finished_at FROM archived_operations "
                    "WHERE id = ANY($1::text[]) AND source = $2 ORDER BY id, redrives DESC",
                    list(ids),
                    source,
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
