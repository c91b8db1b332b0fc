"""The read API: get, filters, metadata containment and keyset pagination."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from archiver_support import ROWS_PIPELINE

from archiver.errors import ArchiveUnavailable, InvalidPageToken, InvalidQuery
from archiver.read import ArchiveReader
from archiver.rows import row_for
from archiver.store import ArchiveStore
from kvstate import InvalidKey, OpStatus, StageError, StageState, StageStatus, ValidationError, new_operation

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STATUSES = [OpStatus.SUCCEEDED, OpStatus.FAILED, OpStatus.CANCELLED]


@pytest.fixture
async def archive(database_url: str) -> AsyncIterator[ArchiveReader]:
    """25 archived operations: op00..op24, finished a minute apart, statuses in turn, op01/op04/.. failed at geo."""
    rows = []
    for i in range(25):
        op = new_operation(f"op{i:02d}", ROWS_PIPELINE, T0, {"n": i, "team": "red" if i % 2 else "blue"})
        status = STATUSES[i % 3]
        stages = dict(op.stages)
        if status is OpStatus.FAILED:
            stages["geo"] = StageState(status=StageStatus.FAILED, attempt=1, error=StageError(message="timeout"))
        done = T0 + timedelta(minutes=i)
        op = msgspec.structs.replace(
            op, status=status, stages=stages, finished_at=done, updated_at=done, revision=i + 1
        )
        rows.append(row_for(op, done))
    # two operations finished at the same instant: pagination must order them by id
    same = msgspec.structs.replace(
        new_operation("tie-a", ROWS_PIPELINE, T0, {}), status=OpStatus.SUCCEEDED, finished_at=T0, revision=1
    )
    rows.append(row_for(same, T0))
    rows.append(row_for(msgspec.structs.replace(same, id="tie-b"), T0))
    async with ArchiveStore.open(database_url) as store:
        await store.write(rows)
    async with ArchiveReader.connect(database_url) as reader:
        yield reader


async def test_pages_walk_every_operation_newest_first_without_repeats(archive: ArchiveReader) -> None:
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        page = await archive.search(limit=7, page_token=token)
        seen += [item.id for item in page.items]
        pages += 1
        token = page.next_token
        if token is None:
            break
    assert pages == 4
    assert seen[:3] == ["op24", "op23", "op22"]
    assert seen[-3:] == ["tie-b", "tie-a", "op00"]  # same finished_at: id desc
    assert len(seen) == len(set(seen)) == 27


async def test_filters_by_status_failed_stage_time_and_metadata(archive: ArchiveReader) -> None:
    failed = await archive.search(status=["failed"], limit=100)
    assert {i.id for i in failed.items} == {f"op{i:02d}" for i in range(1, 25, 3)}
    assert all(i.failed_stage == "geo" for i in failed.items)
    by_stage = await archive.search(failed_stage="geo", limit=100)
    assert [i.id for i in by_stage.items] == [i.id for i in failed.items]
    window = await archive.search(finished_after=T0 + timedelta(minutes=5), finished_before=T0 + timedelta(minutes=8))
    assert [i.id for i in window.items] == ["op07", "op06", "op05"]
    red_cancelled = await archive.search(status=["cancelled"], metadata={"team": "red"}, limit=100)
    assert {i.id for i in red_cancelled.items} == {f"op{i:02d}" for i in range(25) if i % 3 == 2 and i % 2}
    assert [i.id for i in (await archive.search(metadata={"n": 13})).items] == ["op13"]
    assert {i.id for i in (await archive.search(id_prefix="tie")).items} == {"tie-a", "tie-b"}
    assert (await archive.search(pipeline="other")).items == []


async def test_get_returns_the_snapshot_or_none(archive: ArchiveReader) -> None:
    item = await archive.get("op04")
    assert item is not None and item.status == "failed" and item.revision == 5
    assert item.operation.stages["geo"].error == StageError(message="timeout")
    assert item.operation.metadata == {"n": 4, "team": "blue"}
    assert await archive.get("op99") is None
    with pytest.raises(InvalidKey):
        await archive.get("bad id!")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"page_token": "not-a-token"}, InvalidPageToken),
        ({"page_token": "WyIyMDI1Il0"}, InvalidPageToken),  # valid base64 of the wrong shape
        ({"limit": 0}, InvalidQuery),
        ({"limit": 10_000}, InvalidQuery),
        ({"status": ["running"]}, InvalidQuery),
        ({"finished_after": datetime(2025, 1, 1)}, InvalidQuery),  # no timezone
        ({"id_prefix": "a%"}, InvalidKey),
    ],
)
async def test_bad_arguments_raise_typed_validation_errors(
    archive: ArchiveReader, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        await archive.search(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValidationError)


async def test_history_archived_as_objects_before_migration_2_reads_back_alike(
    archive: ArchiveReader, database_url: str
) -> None:
    item = await archive.get("op05")
    assert item is not None and item.operation.history
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT history::text FROM archived_operations WHERE id = 'op05'")
        assert stored.startswith("[[")  # one array per transition since migration 2
        objects = msgspec.json.encode(item.operation.history).decode()
        assert objects.startswith("[{")
        await conn.execute("UPDATE archived_operations SET history = $1::json WHERE id = 'op05'", objects)
    finally:
        await conn.close()
    again = await archive.get("op05")
    assert again is not None and again.operation == item.operation


async def test_minority_status_searches_use_the_partial_status_index(archive: ArchiveReader, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        lines = await conn.fetch(
            "EXPLAIN SELECT id FROM archived_operations WHERE status = ANY($1::text[]) AND status <> 'succeeded' "
            "ORDER BY finished_at DESC, id DESC LIMIT 5",
            ["failed", "cancelled"],
        )
        plan = "\n".join(line[0] for line in lines)
    finally:
        await conn.close()
    assert "archived_operations_status" in plan
    both = await archive.search(status=["failed", "cancelled"], limit=100)
    assert {i.id for i in both.items} == {f"op{i:02d}" for i in range(25) if i % 3}
    succeeded = await archive.search(status=["succeeded"], limit=100)
    assert {i.id for i in succeeded.items} == {f"op{i:02d}" for i in range(0, 25, 3)} | {"tie-a", "tie-b"}


async def test_an_unreachable_archive_raises_archive_unavailable_not_asyncpg_errors() -> None:
    from devstack.servers import free_port

    with pytest.raises(ArchiveUnavailable) as info:
        async with ArchiveReader.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/none"):
            pass
    assert isinstance(info.value.__cause__, OSError)  # the socket's error, chained
    assert "cannot connect to the archive" in str(info.value)


async def test_a_connection_lost_under_the_reader_raises_archive_unavailable(
    archive: ArchiveReader, database_url: str
) -> None:
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    name = database_url.rsplit("/", 1)[1]
    try:
        # the reader's connections die and no new one is let in (a restarting or lost server)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        with pytest.raises(ArchiveUnavailable) as info:
            await archive.search(limit=5)
        assert isinstance(info.value.__cause__, Exception)  # asyncpg's error, chained
        assert "cannot search the archive" in str(info.value)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
