"""Migrations and batch writes on a real PostgreSQL: idempotent, guarded by revision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from archiver_support import ROWS_PIPELINE

from archiver import migrations
from archiver.errors import MigrationError
from archiver.rows import row_for
from archiver.store import ArchiveStore, DeadLetter
from kvstate import OpStatus, new_operation
from kvstate.model import Operation

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def finished(op_id: str, revision: int, *, status: OpStatus = OpStatus.SUCCEEDED, minutes: int = 0) -> Operation:
    op = new_operation(op_id, ROWS_PIPELINE, T0, {"rev": revision})
    done = T0 + timedelta(minutes=minutes, seconds=revision)
    return msgspec.structs.replace(op, status=status, finished_at=done, updated_at=done, revision=revision)


async def test_migrations_apply_once_and_record_their_version(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrations.current_version(conn) == 0
        assert await migrations.apply(conn) == [1, 2, 3, 4]
        assert await migrations.apply(conn) == []
        assert await migrations.current_version(conn) == migrations.MIGRATIONS[-1].version
        rows = await conn.fetch("SELECT version, name FROM archive_schema_version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (1, "archive"),
            (2, "smaller_rows"),
            (3, "sources"),
            (4, "redrives"),
        ]
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'archived_operations'")
        }
        assert {"archived_operations_finished", "archived_operations_status", "archived_operations_metadata"} <= indexes
    finally:
        await conn.close()


async def test_a_schema_newer_than_the_archiver_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrations.apply(conn)
        await conn.execute("INSERT INTO archive_schema_version (version, name) VALUES (99, 'future')")
        with pytest.raises(MigrationError, match="version 99"):
            await migrations.apply(conn)
    finally:
        await conn.close()


async def test_an_older_or_equal_revision_never_overwrites_the_archived_one(database_url: str) -> None:
    now = datetime.now(UTC)
    async with ArchiveStore.open(database_url) as store:
        first = await store.write([row_for(finished("a", 7), now)])
        assert first.written == {"a"} and first.duplicates == 0
        older = await store.write([row_for(finished("a", 5), now + timedelta(seconds=1))])
        same = await store.write([row_for(finished("a", 7), now + timedelta(seconds=2))])
        assert older.written == frozenset() and older.duplicates == 1
        assert same.written == frozenset() and same.duplicates == 1
        newer = await store.write([row_for(finished("a", 9, status=OpStatus.FAILED), now + timedelta(seconds=3))])
        assert newer.written == {"a"}
        assert await store.archived_revisions(["a", "b"]) == {"a": 9}
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT revision, status, archived_at, metadata FROM archived_operations WHERE id = 'a'"
        )
        assert row["revision"] == 9 and row["status"] == "failed"
        assert row["archived_at"] == now + timedelta(seconds=3)
        assert await conn.fetchval("SELECT count(*) FROM archived_operations") == 1
    finally:
        await conn.close()


async def test_the_same_id_twice_in_one_batch_keeps_the_newest(database_url: str) -> None:
    now = datetime.now(UTC)
    async with ArchiveStore.open(database_url) as store:
        result = await store.write(
            [row_for(finished("x", 3), now), row_for(finished("x", 4), now), row_for(finished("y", 1), now)]
        )
        assert result.written == {"x", "y"} and result.duplicates == 1
        assert await store.archived_revisions(["x", "y"]) == {"x": 4, "y": 1}


async def test_dead_letters_keep_the_raw_bytes_once_per_revision(database_url: str) -> None:
    letter = DeadLetter("op.bad", 12, b"\x00\xffnot json", "JSON is malformed")
    async with ArchiveStore.open(database_url) as store:
        assert (await store.write([], [letter])).dead_letters == 1
        assert (await store.write([], [letter])).dead_letters == 0  # redelivered: parked once
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT key, revision, raw, error FROM archive_dead_letters")
        assert [(r["key"], r["revision"], r["raw"], r["error"]) for r in rows] == [
            ("op.bad", 12, b"\x00\xffnot json", "JSON is malformed")
        ]
    finally:
        await conn.close()


def test_history_round_trips_through_its_compact_form() -> None:
    from archiver.rows import decode_history, encode_history
    from kvstate.model import Transition

    history = [
        Transition(at=T0 - timedelta(seconds=1), to="pending", event="clock-skew"),
        Transition(at=T0, to="running", from_="waiting", stage="ingest", attempt=1, worker="w", event="e1"),
        Transition(at=T0 + timedelta(days=3, microseconds=1), to="succeeded", from_="running"),
    ]
    raw = encode_history(history, T0)
    assert raw.startswith(b'[[-1000000,"pending",null,null,null,null,"clock-skew"],[0,"running"')
    assert decode_history(raw, T0) == history
    assert decode_history(msgspec.json.encode(history), T0) == history  # rows archived before migration 2
