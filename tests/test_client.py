"""The client against a real nats-server: creation, updates, conflicts, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgspec
import nats
import pytest

from devstack.servers import NatsServer
from kvstate import (
    BucketError,
    Client,
    ClientClosedError,
    ConflictError,
    CorruptValue,
    InvalidKey,
    InvalidMetadata,
    InvalidTransition,
    MergeMetadata,
    Operation,
    OperationExists,
    OperationNotFound,
    OpStatus,
    Outcome,
    RevisionMismatch,
    Settings,
    StageSpec,
    StageStatus,
    UnknownPipeline,
    UnknownStage,
    UpdateResult,
    ValidationError,
    ValueTooLarge,
    WaitTimeout,
)
from tests.conftest import PIPELINE


async def test_create_and_get_round_trip(client: Client) -> None:
    op = await client.create("orders", metadata={"customer": 42})
    got = await client.get(op.id)
    assert got == op
    assert got.revision > 0
    assert got.metadata == {"customer": 42}
    assert got.status is OpStatus.PENDING


async def test_create_with_same_event_id_is_idempotent(client: Client) -> None:
    first = await client.create("orders", op_id="order-1", event_id="req-1")
    again = await client.create("orders", op_id="order-1", event_id="req-1")
    assert again.revision == first.revision
    with pytest.raises(OperationExists):
        await client.create("orders", op_id="order-1", event_id="req-2")
    with pytest.raises(OperationExists):
        await client.create("orders", op_id="order-1")


async def test_each_update_reports_what_happened(client: Client) -> None:
    op = await client.create("orders")
    started = await client.start(op.id, "ingest", worker="w1", event_id="m1")
    assert started.outcome is Outcome.APPLIED
    assert started.revision > op.revision
    dup = await client.start(op.id, "ingest", worker="w1", event_id="m1")
    assert dup.outcome is Outcome.DUPLICATE
    assert dup.revision == started.revision
    done = await client.succeed(op.id, "ingest", metadata={"bytes": 10})
    stale = await client.start(op.id, "ingest", event_id="m-late")
    assert stale.outcome is Outcome.STALE
    assert stale.revision == done.revision
    assert (await client.get(op.id)).stage("ingest").metadata == {"bytes": 10}


async def test_fifty_tasks_each_add_a_key_to_one_operation(client: Client) -> None:
    op = await client.create("orders")
    results = await asyncio.gather(*(client.merge_metadata(op.id, {f"k{i}": i}) for i in range(50)))
    assert all(r.outcome is Outcome.APPLIED for r in results)
    final = await client.get(op.id)
    assert final.metadata == {f"k{i}": i for i in range(50)}
    assert client.stats["writes"] < 50  # grouped into far fewer compare-and-set writes


async def test_two_clients_on_one_operation_lose_nothing(settings: Settings, client: Client) -> None:
    op = await client.create("orders")
    async with Client(settings) as other:
        # Both start from the same revision (each remembers what it read), so whichever
        # writes second must be refused by compare-and-set however the tasks interleave.
        await other.get(op.id)
        await asyncio.gather(
            *(client.merge_metadata(op.id, {f"a{i}": i}) for i in range(40)),
            *(other.merge_metadata(op.id, {f"b{i}": i}) for i in range(40)),
        )
        conflicts = client.stats["conflicts"] + other.stats["conflicts"]
    final = await client.get(op.id)
    assert final.metadata == {**{f"a{i}": i for i in range(40)}, **{f"b{i}": i for i in range(40)}}
    assert conflicts > 0  # the two processes really raced, and compare-and-set caught it


async def test_stale_cached_revision_costs_a_retry_not_an_update(settings: Settings, client: Client) -> None:
    op = await client.create("orders")
    await client.merge_metadata(op.id, {"from": "a"})  # client now caches this revision
    async with Client(settings) as other:
        await other.merge_metadata(op.id, {"other": True})  # moves the key past client's cache
    result = await client.merge_metadata(op.id, {"again": 1})
    assert result.outcome is Outcome.APPLIED
    assert result.operation.metadata == {"from": "a", "other": True, "again": 1}
    assert client.stats["conflicts"] >= 1


async def test_a_dependency_finished_by_another_process_is_seen_not_refused(settings: Settings, client: Client) -> None:
    op = await client.create("orders")  # client caches the operation with ingest waiting
    async with Client(settings) as other:
        await other.start(op.id, "ingest")
        await other.succeed(op.id, "ingest")
    # From its cache, validate's dependency is not finished; the leader's copy says it is.
    result = await client.start(op.id, "validate")
    assert result.outcome is Outcome.APPLIED
    assert result.operation.stage("validate").status is StageStatus.RUNNING


async def test_a_stage_reopened_by_another_process_is_not_stale(settings: Settings, client: Client) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    await client.succeed(op.id, "ingest")  # cached: ingest succeeded, a new start would be stale
    async with Client(settings) as other:
        await other.reopen(op.id, ["ingest"])
    result = await client.start(op.id, "ingest")
    assert result.outcome is Outcome.APPLIED
    assert result.operation.stage("ingest").attempt == 1
    # a stale answer that the leader's copy confirms stays stale
    again = await client.start(op.id, "ingest", attempt=1)
    assert again.outcome is Outcome.STALE
    assert again.operation.revision == result.operation.revision


async def test_a_stage_added_to_the_pipeline_by_another_process_is_known(settings: Settings, client: Client) -> None:
    op = await client.create("orders")  # client caches the pipeline as it is now
    grown = msgspec.structs.replace(PIPELINE, stages=(*PIPELINE.stages, StageSpec(name="extra", optional=True)))
    async with Client(settings) as other:
        await other.set_pipeline(grown)
    result = await client.start(op.id, "extra")
    assert result.outcome is Outcome.APPLIED
    assert (await client.merge_metadata(op.id, {"seen": True}, stage="extra")).outcome is Outcome.APPLIED
    with pytest.raises(UnknownStage):
        await client.start(op.id, "never-defined")


async def test_a_raising_update_function_fails_only_its_own_caller(client: Client) -> None:
    op = await client.create("orders")

    def broken(current: Operation) -> Operation:
        raise KeyError("missing")

    callers = [client.merge_metadata(op.id, {f"k{i}": i}) for i in range(8)]
    callers.insert(3, client.update(op.id, broken))
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
    assert isinstance(results[3], KeyError)
    others = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, UpdateResult) and r.outcome is Outcome.APPLIED for r in others), others
    assert (await client.get(op.id)).metadata == {f"k{i}": i for i in range(8)}


async def test_parallel_stages_end_to_end(client: Client) -> None:
    op = await client.create("orders")
    for stage in ("ingest", "validate"):
        await client.start(op.id, stage)
        await client.succeed(op.id, stage)
    await asyncio.gather(*(client.start(op.id, s, worker=f"w-{s}") for s in ("geo", "fraud", "profile")))
    assert set((await client.get(op.id)).active_stages) == {"geo", "fraud", "profile"}
    await asyncio.gather(*(client.succeed(op.id, s, metadata={s: True}) for s in ("geo", "fraud", "profile")))
    for stage in ("merge", "notify"):
        await client.start(op.id, stage)
        await client.succeed(op.id, stage)
    final = await client.get(op.id)
    assert final.status is OpStatus.SUCCEEDED
    assert {s: final.stage(s).metadata for s in ("geo", "fraud", "profile")} == {
        "geo": {"geo": True},
        "fraud": {"fraud": True},
        "profile": {"profile": True},
    }


async def test_redelivered_and_reordered_events_are_rejected(client: Client) -> None:
    op = await client.create("orders")
    log = [
        ("start", "ingest", "m1"),
        ("succeed", "ingest", "m2"),
        ("start", "validate", "m3"),
        ("fail", "validate", "m4"),  # attempt 1 fails, retryable
        ("start", "validate", "m5"),
        ("succeed", "validate", "m6"),  # attempt 2 succeeds
    ]

    async def deliver(kind: str, stage: str, eid: str) -> Outcome:
        if kind == "start":
            return (await client.start(op.id, stage, event_id=eid)).outcome
        if kind == "fail":
            return (await client.fail(op.id, stage, "flaky", event_id=eid)).outcome
        return (await client.succeed(op.id, stage, event_id=eid)).outcome

    assert [await deliver(*m) for m in log] == [Outcome.APPLIED] * 6
    # the queue redelivers everything, and a late copy of attempt 1 turns up
    assert {await deliver(*m) for m in log} == {Outcome.DUPLICATE}
    late = await client.fail(op.id, "validate", "late copy", attempt=1, event_id="m4-copy")
    assert late.outcome is Outcome.STALE
    final = await client.get(op.id)
    assert final.stage("validate").status is StageStatus.SUCCEEDED
    assert final.stage("validate").attempt == 2


async def test_cancel_is_final(client: Client) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    cancelled = await client.cancel(op.id, reason="customer asked", by="ops")
    assert cancelled.outcome is Outcome.APPLIED
    assert cancelled.operation.status is OpStatus.CANCELLED
    assert cancelled.operation.cancel is not None
    assert cancelled.operation.cancel.reason == "customer asked"
    assert (await client.cancel(op.id)).outcome is Outcome.STALE
    assert (await client.succeed(op.id, "ingest")).outcome is Outcome.STALE


async def test_wait_returns_when_done_and_times_out_otherwise(client: Client) -> None:
    op = await client.create("orders")
    with pytest.raises(WaitTimeout) as info:
        await client.wait(op.id, timeout=0.3)
    assert info.value.last_status == "pending"
    waiter = asyncio.create_task(client.wait(op.id, timeout=10))
    await asyncio.sleep(0.05)
    await client.start(op.id, "ingest")
    await client.fail(op.id, "ingest", "poison", retryable=False)
    done = await waiter
    assert done.status is OpStatus.FAILED


async def test_wait_for_an_unknown_operation_says_so_at_once(client: Client) -> None:
    with pytest.raises(OperationNotFound):
        await asyncio.wait_for(client.wait("no-such-operation"), 5)
    op = await client.create("orders")
    await client.cancel(op.id)
    assert (await asyncio.wait_for(client.wait(op.id), 5)).status is OpStatus.CANCELLED  # finished already


async def test_list_with_an_unknown_status_is_a_validation_error(client: Client) -> None:
    with pytest.raises(ValidationError, match="unknown status"):
        await client.list(status="bogus")


async def test_a_value_from_a_newer_schema_is_refused_not_overwritten(client: Client, settings: Settings) -> None:
    op = await client.create("orders")
    newer = msgspec.json.decode(msgspec.json.encode(await client.get(op.id)))
    newer["schema"] = 2
    newer["added_later"] = {"kept": True}
    revision = await client._open_store().update(f"op.{op.id}", msgspec.json.encode(newer), op.revision)
    async with Client(settings) as fresh:
        with pytest.raises(CorruptValue, match="newer kvstate"):
            await fresh.get(op.id)
        with pytest.raises(CorruptValue):
            await fresh.merge_metadata(op.id, {"a": 1})
    entry = await client._open_store().get(f"op.{op.id}", leader=True)
    assert entry is not None and entry.revision == revision  # nothing written over it


async def test_update_with_custom_function(client: Client) -> None:
    op = await client.create("orders", metadata={"n": 1})

    def bump(current):  # type: ignore[no-untyped-def]
        return msgspec.structs.replace(current, metadata={"n": current.metadata["n"] + 1})

    results = await asyncio.gather(*(client.update(op.id, bump) for _ in range(10)))
    assert all(r.applied for r in results)
    assert (await client.get(op.id)).metadata == {"n": 11}
    assert (await client.update(op.id, lambda o: o)).outcome is Outcome.STALE


async def test_list_filters_by_status_and_stage(client: Client) -> None:
    a = await client.create("orders")
    b = await client.create("orders")
    await client.start(b.id, "ingest")
    assert {o.id for o in await client.list()} == {a.id, b.id}
    assert [o.id for o in await client.list(status="pending")] == [a.id]
    assert [o.id for o in await client.list(stage="ingest")] == [b.id]
    assert [o.id for o in await client.list(status=["running", "failed"])] == [b.id]


async def test_history_lists_kv_revisions(nats_server: NatsServer, bucket_name: str) -> None:
    async with Client(Settings(nats_url=nats_server.url, bucket=bucket_name, history=10), create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create("orders")
        await kv.start(op.id, "ingest")
        await kv.succeed(op.id, "ingest")
        revisions = await kv.history(op.id)
    assert [r.operation.stage("ingest").status for r in revisions if r.operation] == [
        StageStatus.WAITING,
        StageStatus.RUNNING,
        StageStatus.SUCCEEDED,
    ]


async def test_default_history_keeps_the_current_revision_only(client: Client) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest")
    done = await client.succeed(op.id, "ingest")
    revisions = await client.history(op.id)
    assert [r.revision for r in revisions] == [done.revision]
    assert [t.to for t in done.operation.history if t.stage == "ingest"] == ["running", "succeeded"]


async def test_remove_is_revision_checked(client: Client) -> None:
    op = await client.create("orders")
    moved = await client.start(op.id, "ingest")
    with pytest.raises(ConflictError) as info:
        await client.remove(op.id, op.revision)
    assert info.value.expected_revision == op.revision
    assert (await client.get(op.id)).revision == moved.revision
    await client.remove(op.id, moved.revision)
    with pytest.raises(OperationNotFound, match="archive"):
        await client.get(op.id)


async def test_remove_many_checks_each_revision_and_reports_each_result(client: Client) -> None:
    ops = [await client.create("orders") for _ in range(5)]
    moved = await client.start(ops[1].id, "ingest")  # changed after the "snapshot"
    await client.remove(ops[3].id, ops[3].revision)  # already gone
    results = await client.remove_many([(op.id, op.revision) for op in ops], marker_ttl=60)
    assert [type(r).__name__ for r in results] == ["int", "ConflictError", "int", "ConflictError", "int"]
    assert all(isinstance(r, int) and r > moved.revision for r in (results[0], results[2], results[4]))
    assert [op.id for op in await client.list()] == [ops[1].id]
    with pytest.raises(OperationNotFound, match="archive"):
        await client.get(ops[0].id)
    assert await client.remove_many([]) == []
    with pytest.raises(InvalidKey):
        await client.remove_many([(ops[1].id, moved.revision), ("bad id", 1)])
    assert (await client.get(ops[1].id)).revision == moved.revision  # nothing was sent


async def test_remove_many_pipelines_more_than_one_window(client: Client) -> None:
    created = await asyncio.gather(*(client.create("orders") for _ in range(1500)))
    results = await client.remove_many([(op.id, op.revision) for op in created])
    assert sum(isinstance(r, int) for r in results) == 1500
    assert await client.list() == []


# ---------------------------------------------------------------- bad input


async def test_invalid_ids_are_rejected_before_any_write(client: Client) -> None:
    for bad in ("", "a.b", "a b", "a*", "x" * 129, "ü"):
        with pytest.raises(InvalidKey):
            await client.get(bad)
    with pytest.raises(InvalidKey):
        await client.create("orders", op_id="has space")


async def test_unknown_stage_and_pipeline(client: Client) -> None:
    op = await client.create("orders")
    with pytest.raises(UnknownStage, match="teleport"):
        await client.start(op.id, "teleport")
    with pytest.raises(UnknownStage):
        await client.merge_metadata(op.id, {"a": 1}, stage="teleport")
    with pytest.raises(UnknownPipeline):
        await client.create("no-such-pipeline")


async def test_illegal_transition_is_a_typed_error_and_writes_nothing(client: Client) -> None:
    op = await client.create("orders")
    with pytest.raises(InvalidTransition, match="dependencies"):
        await client.start(op.id, "merge")
    assert (await client.get(op.id)).revision == op.revision


async def test_metadata_that_is_not_json(client: Client) -> None:
    op = await client.create("orders")
    with pytest.raises(InvalidMetadata):
        await client.merge_metadata(op.id, {"x": object()})
    with pytest.raises(InvalidMetadata):
        await client.create("orders", metadata={"x": complex(1, 2)})
    with pytest.raises(InvalidMetadata):
        await client.merge_metadata(op.id, ["a"])  # type: ignore[arg-type]


async def test_oversize_value_is_refused_and_state_kept(client: Client) -> None:
    op = await client.create("orders", metadata={"small": 1})
    with pytest.raises(ValueTooLarge) as info:
        await client.merge_metadata(op.id, {"blob": "x" * 300_000})
    assert info.value.limit == client.settings.max_value_size
    ok = await client.merge_metadata(op.id, {"after": 2})  # the operation still takes updates
    assert ok.operation.metadata == {"small": 1, "after": 2}


async def test_a_limit_above_the_servers_max_payload_still_gives_value_too_large(settings: Settings) -> None:
    roomy = dataclasses.replace(settings, bucket=settings.bucket + "big", max_value_size=4 * 1024 * 1024)
    async with Client(roomy, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create("orders")
        with pytest.raises(ValueTooLarge, match="max_payload"):  # 1.5 MB: under our limit, over the server's
            await kv.merge_metadata(op.id, {"blob": "x" * 1_500_000})
        assert (await kv.merge_metadata(op.id, {"after": 1})).outcome is Outcome.APPLIED


async def test_garbage_in_the_bucket_never_crashes_readers(
    client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    good = await client.create("orders")
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    kv = await js.key_value(settings.bucket)
    await kv.put("op.garbage1", b"{not json")
    await kv.put("op.garbage2", b'{"schema": 1, "id": "garbage2"}')  # JSON, not our schema
    await kv.put(
        "op.garbage3",
        msgspec.json.encode(
            {
                "schema": 1,
                "id": "other",
                "pipeline": "orders",
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
            }
        ),
    )
    await nc.close()
    for key in ("garbage1", "garbage2", "garbage3"):
        with pytest.raises(CorruptValue) as info:
            await client.get(key)
        assert info.value.revision > 0
        assert info.value.raw
    with pytest.raises(CorruptValue):
        await client.start("garbage1", "ingest")
    with caplog.at_level(logging.WARNING):
        listed = await client.list()
    assert [o.id for o in listed] == [good.id]
    assert "corrupt" in caplog.text
    seen = []
    async with client.watch(include_corrupt=True) as changes:
        async for change in changes:
            seen.append((change.op_id, change.error is not None))
            if len(seen) == 4:
                break
    assert sorted(seen) == sorted([(good.id, False), ("garbage1", True), ("garbage2", True), ("garbage3", True)])


async def test_client_refuses_use_outside_its_context(settings: Settings) -> None:
    kv = Client(settings, create_bucket=True)
    with pytest.raises(ClientClosedError):
        await kv.get("x")
    async with kv:
        pass
    with pytest.raises(ClientClosedError):
        await kv.get("x")
    with pytest.raises(ClientClosedError):
        await kv.__aenter__()


async def test_missing_bucket_is_a_clear_error(nats_server: NatsServer) -> None:
    with pytest.raises(BucketError, match="kvstate bucket init"):
        async with Client(Settings(nats_url=nats_server.url, bucket="never_created")):
            pass


async def test_bucket_with_wrong_config_is_refused(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().create_key_value(bucket="plain_kv", history=1)
    await nc.close()
    with pytest.raises(BucketError, match="direct get must be enabled"):
        async with Client(Settings(nats_url=nats_server.url, bucket="plain_kv")):
            pass


async def test_bucket_init_is_idempotent_and_configured(settings: Settings) -> None:
    async with Client(settings, create_bucket=True) as kv:
        first = await kv._open_store().info()
    async with Client(settings, create_bucket=True) as kv:
        info = await kv._open_store().info()
    assert info.created == first.created
    assert info.config.allow_direct
    assert info.config.allow_msg_ttl
    assert info.config.max_msgs_per_subject == settings.history
    assert info.config.max_msg_size == settings.max_value_size
    assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"


async def test_unreachable_server_is_a_clear_error() -> None:
    from devstack.servers import free_port
    from kvstate import ConnectionLostError

    with pytest.raises(ConnectionLostError, match="cannot connect"):
        async with Client(Settings(nats_url=f"nats://127.0.0.1:{free_port()}", timeout=1.0)):
            pass


async def test_server_without_jetstream_is_refused_at_connect(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from devstack.servers import find_nats_server, free_port
    from kvstate import ConnectionLostError, ServerVersionError

    port = free_port()
    proc = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    refused: ServerVersionError | None = None
    try:
        for _ in range(100):
            try:
                async with Client(Settings(nats_url=f"nats://127.0.0.1:{port}", timeout=1.0)):
                    pass
            except ConnectionLostError:  # the server may not listen yet
                await asyncio.sleep(0.05)
            except ServerVersionError as exc:
                refused = exc
                break
    finally:
        proc.terminate()
        proc.wait(10)
    assert refused is not None
    assert "JetStream" in str(refused)


async def test_stopped_watchers_are_released(client: Client) -> None:
    op = await client.create("orders")
    for _ in range(3):
        async with client.watch(op.id) as changes:
            async for _change in changes:
                break
    with pytest.raises(WaitTimeout):
        await client.wait(op.id, timeout=0.1)
    assert client._watchers == set()  # the registry is what would leak


async def test_scans_leave_no_consumer_behind(client: Client) -> None:
    for _ in range(3):
        await client.create("orders")
    assert len(await client.list()) == 3
    await client.history((await client.list())[0].id)
    assert (await client.bucket_info()).consumers == 0


async def test_bucket_info_reports_the_configuration_and_size(client: Client, settings: Settings) -> None:
    empty = await client.bucket_info()
    op = await client.create("orders")
    info = await client.bucket_info()
    assert (info.bucket, info.stream) == (settings.bucket, f"KV_{settings.bucket}")
    assert (info.history, info.replicas) == (settings.history, settings.replicas)
    assert info.direct_get and info.msg_ttl and info.storage == "file"
    assert info.values == empty.values + 1 and info.bytes > empty.bytes
    assert info.last_revision == op.revision


async def test_scan_finishes_while_keys_are_purged_under_it(client: Client) -> None:
    ops = [await client.create("orders") for _ in range(200)]
    listing = asyncio.create_task(client.list())
    await asyncio.gather(*(client.remove(op.id, op.revision) for op in ops))
    found = await asyncio.wait_for(listing, 10)
    assert {o.id for o in found} <= {o.id for o in ops}


async def test_a_watcher_used_without_async_with_says_how_instead_of_hanging(client: Client) -> None:
    watcher = client.watch()
    with pytest.raises(ClientClosedError, match="async with"):
        await asyncio.wait_for(anext(watcher), 5)
    await watcher.stop()


async def test_watch_started_while_keys_are_purged_still_delivers(client: Client) -> None:
    ops = [await client.create("orders") for _ in range(200)]
    kept = await client.create("orders")
    removing = asyncio.gather(*(client.remove(op.id, op.revision) for op in ops))
    async with client.watch(include_existing=True) as changes:  # created while the purges land
        await removing
        await client.start(kept.id, "ingest")

        async def until_started() -> None:
            async for change in changes:
                if change.op_id == kept.id and change.operation and change.operation.active_stages:
                    return

        await asyncio.wait_for(until_started(), 15)


async def test_a_conditional_update_applies_only_at_the_expected_revision(client: Client) -> None:
    """expected_revision (HTTP If-Match): of ten concurrent writes from one revision exactly one
    lands, even though group commit would otherwise merge them into one write."""
    op = await client.create("orders")
    results = await asyncio.gather(
        *(client.apply(op.id, MergeMetadata(patch={f"k{i}": i}), expected_revision=op.revision) for i in range(10)),
        return_exceptions=True,
    )
    applied = [r for r in results if isinstance(r, UpdateResult)]
    refused = [r for r in results if isinstance(r, RevisionMismatch)]
    assert len(applied) == 1 and len(refused) == 9
    assert all(r.expected == op.revision and r.actual == applied[0].revision for r in refused)
    assert len((await client.get(op.id)).metadata) == 1
    with pytest.raises(RevisionMismatch):
        await client.apply(op.id, MergeMetadata(patch={"late": 1}), expected_revision=op.revision)


async def test_conditional_updates_queued_together_do_not_share_one_write(client: Client) -> None:
    """Three writes expecting the revision the first write in flight will store: group commit
    puts them in one batch, but only the first may apply; the others see the revision it stored."""
    op = await client.create("orders")
    first = asyncio.ensure_future(client.merge_metadata(op.id, {"first": 1}))
    await asyncio.sleep(0)  # the first write is in flight; the next ones queue behind it
    expecting = op.revision + 1  # the bucket's next sequence: nothing else writes to this bucket
    queued = [client.apply(op.id, MergeMetadata(patch={f"c{i}": i}), expected_revision=expecting) for i in range(3)]
    results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert isinstance(results[0], UpdateResult) and results[0].revision == expecting
    outcomes = [type(r).__name__ for r in results[1:]]
    assert sorted(outcomes) == ["RevisionMismatch", "RevisionMismatch", "UpdateResult"]
    assert set((await client.get(op.id)).metadata) == {
        "first",
        *(f"c{i}" for i, r in enumerate(results[1:]) if isinstance(r, UpdateResult)),
    }


async def test_a_retried_conditional_write_that_landed_is_a_duplicate_not_a_mismatch(client: Client) -> None:
    op = await client.create("orders")
    event = MergeMetadata(patch={"k": 1}, event_id="once")
    first = await client.apply(op.id, event, expected_revision=op.revision)
    again = await client.apply(op.id, event, expected_revision=op.revision)  # its answer was lost: retried as sent
    assert first.outcome is Outcome.APPLIED and again.outcome is Outcome.DUPLICATE
    with pytest.raises(RevisionMismatch):
        await client.apply(op.id, MergeMetadata(patch={"k": 2}, event_id="other"), expected_revision=op.revision)


async def test_the_revision_cache_keeps_only_operations_in_flight(client: Client) -> None:
    """A service's memory stays flat: a finished operation leaves the cache when it finishes."""
    running = await client.create("orders")
    done = await client.create("orders")
    await client.start(running.id, "ingest")
    assert client.stats["cached"] == 2
    await client.cancel(done.id)
    assert client.stats["cached"] == 1
    late = await client.start(done.id, "ingest")  # read again, from the leader: still the right answer
    assert late.outcome is Outcome.STALE
    assert client.stats["cached"] == 1
