"""The read API of the archive: what the dashboard and ``kvstate archive`` use.

    async with ArchiveReader.connect(dsn) as archive:
        op = await archive.get("01J...")
        page = await archive.search(status=["failed"], failed_stage="geo", limit=20)
        more = await archive.search(status=["failed"], failed_stage="geo", page_token=page.next_token)

Results come newest finished first (``finished_at`` desc, then ``id``, ``source`` and
``redrives`` desc) with keyset pagination: the opaque ``next_token`` names the last row
shown, so pages never skip or repeat rows while new operations are archived.

An id reused by a re-created bucket (or by another bucket archived into the same
database) has one row per source, and an operation re-driven and finished again one per
life: ``get`` returns the newest finished of them, ``snapshots`` all of them, and
searches list each.

``redrive`` puts an archived operation back into the bucket (``kvstate archive redrive``,
the dashboard's re-drive button): it reads the archive and writes through the kvstate client.

Errors are the archiver's own: ``ArchiveUnavailable`` (with PostgreSQL's detail and hint)
when PostgreSQL cannot be reached or fails, ``InvalidQuery`` / ``InvalidPageToken`` for
arguments; asyncpg's and the socket's errors never leave this module.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import msgspec

import kvstate
from archiver._pg import database_errors, init_connection
from archiver.errors import ArchiveUnavailable, InvalidPageToken, InvalidQuery
from archiver.rows import operation_from_record
from kvstate.keys import validate_id

__all__ = [
    "MAX_LIMIT",
    "ArchivePage",
    "ArchiveReader",
    "ArchiveUnavailable",
    "ArchivedOperation",
    "InvalidPageToken",
    "InvalidQuery",
    "redrive",
]

MAX_LIMIT = 500
TERMINAL_STATUSES = tuple(sorted(status.value for status in kvstate.TERMINAL_STATUSES))
"""the statuses an archived operation can have (kvstate.derive's terminal statuses)"""

_SELECT = (
    "SELECT id, pipeline, status, failed_stage, created_at, updated_at, finished_at, duration, revision, "
    "archived_at, value_schema, origin, cancel, metadata, stages, history, source, redrives, actions "
    "FROM archived_operations"
)


class ArchivedOperation(msgspec.Struct, frozen=True, kw_only=True):
    """One archived operation: the indexed columns and the full snapshot."""

    id: str
    pipeline: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    duration: float | None
    failed_stage: str | None
    revision: int
    archived_at: datetime
    operation: kvstate.Operation
    source: int = 0
    """the bucket incarnation it came from (several rows of one id differ in it)"""
    redrives: int = 0
    """its life: 0, or how many times it had been re-driven from the archive (rows of one id and source differ in it)"""


class ArchivePage(msgspec.Struct, frozen=True):
    """One page of search results and the token of the next page (None on the last)."""

    items: list[ArchivedOperation]
    next_token: str | None


class _Token(msgspec.Struct, frozen=True, array_like=True):
    finished_at: datetime
    id: str
    source: int = 0  # tokens handed out before migration 0003 have two members
    redrives: int = 0  # and before migration 0004 three


_token_encoder = msgspec.json.Encoder()
_token_decoder = msgspec.json.Decoder(_Token)


def _encode_token(finished_at: datetime, op_id: str, source: int, redrives: int) -> str:
    raw = _token_encoder.encode(_Token(finished_at, op_id, source, redrives))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_token(token: str) -> _Token:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = _token_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidPageToken(token, "not a token from this archive") from exc
    if decoded.finished_at.tzinfo is None:
        raise InvalidPageToken(token, "the time in it has no timezone")
    return decoded


def _archived(record: asyncpg.Record) -> ArchivedOperation:
    return ArchivedOperation(
        id=record["id"],
        pipeline=record["pipeline"],
        status=record["status"],
        created_at=record["created_at"],
        finished_at=record["finished_at"],
        duration=record["duration"],
        failed_stage=record["failed_stage"],
        revision=record["revision"],
        archived_at=record["archived_at"],
        operation=operation_from_record(record),
        source=record["source"],
        redrives=record["redrives"],
    )


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise InvalidQuery(f"{name} must carry a timezone (for example 2025-01-31T12:00:00+00:00)")
    return value.astimezone(UTC)


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class ArchiveReader:
    """Read access to the archive through an asyncpg pool (whose connections need the jsonb codec).

    Use ``ArchiveReader.connect(dsn)`` for a pool of its own; a pool passed in must have
    been created with ``init=archiver._pg.init_connection``.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    def connect(cls, dsn: str, *, max_size: int = 4) -> AbstractAsyncContextManager[ArchiveReader]:
        """An async context manager that opens a pool on ``dsn`` and closes it on exit (else ArchiveUnavailable)."""

        @asynccontextmanager
        async def reader() -> AsyncIterator[ArchiveReader]:
            with database_errors("cannot connect to the archive"):
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection)
            try:
                yield cls(pool)
            finally:
                await pool.close()

        return reader()

    async def get(self, op_id: str) -> ArchivedOperation | None:
        """The archived operation ``op_id`` (the newest finished snapshot of it), or None when it is not archived."""
        snapshots = await self.snapshots(op_id, limit=1)
        return snapshots[0] if snapshots else None

    async def snapshots(self, op_id: str, *, limit: int = MAX_LIMIT) -> list[ArchivedOperation]:
        """Every archived snapshot of ``op_id``, newest finished first: one per bucket incarnation
        that used the id and per re-drive (usually one)."""
        validate_id(op_id)
        records = await self._fetch(
            "cannot read the archive",
            _SELECT + " WHERE id = $1 ORDER BY finished_at DESC, source DESC, redrives DESC LIMIT $2",
            op_id,
            limit,
        )
        return [_archived(r) for r in records]

    async def _fetch(self, what: str, query: str, *args: object) -> list[asyncpg.Record]:
        with database_errors(what):
            async with self._pool.acquire() as conn:
                return await conn.fetch(query, *args)

    async def search(
        self,
        *,
        status: Sequence[str] | None = None,
        failed_stage: str | None = None,
        pipeline: str | None = None,
        id_prefix: str | None = None,
        finished_after: datetime | None = None,
        finished_before: datetime | None = None,
        metadata: Mapping[str, object] | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> ArchivePage:
        """Archived operations matching every given filter, newest finished first.

        ``status``: any of succeeded/failed/cancelled; ``failed_stage``: the stage that
        failed; ``finished_after`` (inclusive) / ``finished_before`` (exclusive): aware
        datetimes; ``metadata``: JSON containment on the shared metadata
        (``{"customer": 42}`` matches operations whose metadata holds that pair).
        InvalidQuery or InvalidPageToken on bad arguments.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}, got {limit!r}")
        where, args = _filters(
            status, failed_stage, pipeline, id_prefix, finished_after, finished_before, metadata, page_token
        )

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        query = _SELECT
        if where:
            query += " WHERE " + " AND ".join(where)
        query += f" ORDER BY finished_at DESC, id DESC, source DESC, redrives DESC LIMIT {arg(limit + 1)}"
        records = await self._fetch("cannot search the archive", query, *args)
        items = [_archived(r) for r in records[:limit]]
        next_token = None
        if len(records) > limit:
            last = items[-1]
            assert last.finished_at is not None  # the column is NOT NULL
            next_token = _encode_token(last.finished_at, last.id, last.source, last.redrives)
        return ArchivePage(items, next_token)

    async def dead_letters(self, limit: int = 50) -> list[dict[str, object]]:
        """The newest dead letters: key, revision, error, received_at and the first 512 raw bytes."""
        records = await self._fetch(
            "cannot read the dead letters",
            "SELECT key, revision, error, received_at, substring(raw FROM 1 FOR 512) AS raw "
            "FROM archive_dead_letters ORDER BY received_at DESC, key LIMIT $1",
            limit,
        )
        return [dict(r) for r in records]


def _filters(
    status: Sequence[str] | None,
    failed_stage: str | None,
    pipeline: str | None,
    id_prefix: str | None,
    finished_after: datetime | None,
    finished_before: datetime | None,
    metadata: Mapping[str, object] | None,
    page_token: str | None,
) -> tuple[list[str], list[object]]:
    """The WHERE conditions of a search and their arguments ($1, $2, ... in order)."""
    where: list[str] = []
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if status:
        statuses = [str(s) for s in status]
        unknown = sorted(set(statuses) - set(TERMINAL_STATUSES))
        if unknown:
            raise InvalidQuery(f"unknown status {', '.join(unknown)}: the archive holds {', '.join(TERMINAL_STATUSES)}")
        where.append(f"status = ANY({arg(statuses)}::text[])")
        if "succeeded" not in statuses:  # lets the planner use the partial status index
            where.append("status <> 'succeeded'")
    if failed_stage is not None:
        where.append(f"failed_stage = {arg(failed_stage)}")
    if pipeline is not None:
        where.append(f"pipeline = {arg(pipeline)}")
    if id_prefix:
        validate_id(id_prefix, "id prefix")
        where.append(f"id LIKE {arg(_like_prefix(id_prefix))}")
    if finished_after is not None:
        where.append(f"finished_at >= {arg(_aware(finished_after, 'finished_after'))}")
    if finished_before is not None:
        where.append(f"finished_at < {arg(_aware(finished_before, 'finished_before'))}")
    if metadata:
        if not isinstance(metadata, Mapping):
            raise InvalidQuery("metadata must be a JSON object")
        try:
            encoded = msgspec.json.encode(dict(metadata))
        except (TypeError, ValueError) as exc:
            raise InvalidQuery(f"metadata is not JSON: {exc}") from exc
        where.append(f"metadata @> {arg(encoded)}::jsonb")
    if page_token is not None:
        after = _decode_token(page_token)
        where.append(
            f"(finished_at, id, source, redrives) < "
            f"({arg(after.finished_at)}, {arg(after.id)}, {arg(after.source)}, {arg(after.redrives)})"
        )
    return where, args


async def redrive(
    archive: ArchiveReader,
    client: kvstate.Client,
    op_id: str,
    stages: Sequence[str] | None = None,
    *,
    reason: str,
    by: str | None = None,
    event_id: str | None = None,
) -> kvstate.UpdateResult:
    """Put the archived operation ``op_id`` back into the bucket from its newest snapshot, ``stages``
    run again (default: its failed stage; a cancelled one resumes where it stopped).

    The new life is linked to the snapshot (an action of kind ``redrive`` naming its revision
    and source) and numbered one past every archived life of the id, so it gets a row of its
    own when it finishes again. OperationNotFound when the archive does not hold the id,
    OperationExists while the bucket does (retry it there instead: ``kvstate retry``),
    NotRetryable, UnknownStage or InvalidTransition as for a retry; nothing written then.
    """
    snapshots = await archive.snapshots(op_id)
    if not snapshots:
        raise kvstate.OperationNotFound(op_id, "it is not in the archive either")
    newest = snapshots[0]
    return await client.redrive(
        newest.operation,
        list(stages) if stages else None,
        archived_source=newest.source,
        redrives=1 + max(s.redrives for s in snapshots),
        reason=reason,
        by=by,
        event_id=event_id,
    )
