"""Archiver throughput and WAL next to a raw COPY and to updating PostgreSQL on every change, in one run.

    python -m bench.archiver [--ops 20000] [--batch-size 500] [--history 1] [--instances 1]
                             [--json out.json] [--timeout 900]

Starts its own nats-server (sync_interval 1s) and PostgreSQL (server default
synchronous_commit off: the "short" durability pair of docs/operations.md; the archiver's
writer and the raw COPY baseline both commit with synchronous_commit on) in a temp dir, then for ``--ops``
operation lifecycles of 20 status changes each on a seven-stage pipeline:

1. **archiver, end to end**: the operations are brought to their 19th change, the
   archiver acknowledges those (untimed), then every operation takes its 20th,
   terminal change through the kvstate client; then one archiver burst, timed to the
   last key removed (every row is committed before its key is removed: the issue's
   "from terminal update to row committed and key removed") and to its end (its own
   removal markers acknowledged, the final sweep done). ``--instances N`` runs N
   instances on the shared consumer, N-1 of them in processes of their own. WAL bytes per archived
   operation come from ``pg_current_wal_insert_lsn()`` around the burst;
2. **raw COPY**: the very rows the archiver wrote, copied into a fresh table of the same
   schema and indexes, ``--batch-size`` rows per COPY and transaction, each committed with
   ``SET LOCAL synchronous_commit = on`` as the archiver's writer commits (durable whatever
   the server default): a like-for-like pairing; rows/s and WAL per row;
3. **one row updated on every change**: the same 20 states of each operation written
   as one INSERT and 19 UPDATEs of the same row (same table and indexes, transactions
   of 1000 statements); WAL per operation.

Checkpoints are pushed out of the run (max_wal_size 8GB, checkpoint_timeout 1h) and
autovacuum is off, so the WAL figures of all three leave out full-page images alike and
hold nothing but the phase's own writes; the GIN index's pending list is flushed inside
each measured window so its deferred WAL is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.process
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from archiver import migrations, runtime
from archiver.rows import COLUMNS, row_for
from archiver.runtime import freeze_heap
from archiver.settings import ArchiverSettings
from archiver.store import init_connection
from archiver.worker import ArchiveCounts, Archiver
from bench.compare_servers import process_tree_cpu
from devstack.servers import NatsServer, PostgresServer
from kvstate import Client, Operation, Pipeline, Settings, StageSpec, apply_event, new_operation
from kvstate.codec import encode_operation
from kvstate.events import Event, FailStage, Heartbeat, MergeMetadata, SkipStage, StartStage, SucceedStage
from kvstate.keys import operation_key

PIPELINE = Pipeline(
    name="orders",
    heartbeat_timeout=30.0,
    stages=(
        StageSpec(name="ingest"),
        StageSpec(name="validate", after=("ingest",), max_attempts=3),
        StageSpec(name="geo", after=("validate",)),
        StageSpec(name="fraud", after=("validate",)),
        StageSpec(name="profile", after=("validate",), optional=True),
        StageSpec(name="merge", after=("geo", "fraud", "profile")),
        StageSpec(name="notify", after=("merge",), optional=True),
    ),
)
CHANGES = 20
CONCURRENCY = 64


def lifecycle(i: int) -> list[Event]:
    """The 19 changes after creation: a retried stage, heartbeats, metadata, a skip; the last one finishes."""
    return [
        StartStage(stage="ingest", worker="ingest-1"),
        SucceedStage(stage="ingest", worker="ingest-1", metadata={"bytes": 1000 + i}),
        StartStage(stage="validate", worker="validate-1"),
        FailStage(stage="validate", error="upstream timeout", retryable=True, code="E_TIMEOUT", worker="validate-1"),
        StartStage(stage="validate", worker="validate-2"),
        SucceedStage(stage="validate", worker="validate-2"),
        StartStage(stage="geo", worker="geo-1"),
        StartStage(stage="fraud", worker="fraud-1"),
        Heartbeat(stage="geo", worker="geo-1"),
        SucceedStage(stage="geo", worker="geo-1", metadata={"country": "FR", "lat": 48.85, "lon": 2.35}),
        SucceedStage(stage="fraud", worker="fraud-1", metadata={"score": i % 100 / 100}),
        SkipStage(stage="profile", reason="guest checkout"),
        MergeMetadata(patch={"priority": "normal", "region": "eu-west"}),
        StartStage(stage="merge", worker="merge-1"),
        Heartbeat(stage="merge", worker="merge-1"),
        SucceedStage(stage="merge", worker="merge-1"),
        StartStage(stage="notify", worker="notify-1"),
        MergeMetadata(patch={"channel": "email"}, stage="notify"),
        SucceedStage(stage="notify", worker="notify-1"),
    ]


def op_id(i: int) -> str:
    return f"bench-{i:06d}"


def initial(i: int) -> Operation:
    return new_operation(op_id(i), PIPELINE, datetime.now(UTC), {"customer": i % 1000, "order": i}, f"create-{i}")


def advance(op: Operation, event: Event) -> Operation:
    decision = apply_event(op, PIPELINE, event, datetime.now(UTC))
    if not decision.outcome == "applied":
        raise RuntimeError(f"{op.id}: {event!r} was {decision.outcome}: {decision.reason}")
    return msgspec.structs.replace(decision.operation, revision=op.revision + 1)


async def gather_limited(count: int, body: Callable[[int], Awaitable[None]]) -> None:
    """``body(i)`` for i in range(count), CONCURRENCY at a time."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await body(i)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def wal_lsn(conn: asyncpg.Connection) -> str:
    """The WAL insert position: with synchronous_commit off, pg_current_wal_lsn() (the write
    position) lags behind by what the WAL writer has not written out yet, up to about 1 MB."""
    return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))


async def wal_since(conn: asyncpg.Connection, lsn: str) -> int:
    """WAL written since ``lsn``, after flushing the GIN pending list (its deferred WAL counts too)."""
    await conn.execute("SELECT gin_clean_pending_list('archived_operations_metadata')")
    return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", lsn))


async def prepare_database(admin: asyncpg.Connection, dsn_for: Callable[[str], str], name: str) -> str:
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(dsn_for(name))
    try:
        await migrations.apply(conn)
    finally:
        await conn.close()
    return dsn_for(name)


def _helper_instance(settings: ArchiverSettings, pipe: Connection) -> None:
    """A further archiver instance in a process of its own: connects, says "ready", archives
    one burst on "go" and sends back its counts (what ``kvstate archiver --burst`` does)."""
    runtime.run(_helper_burst(settings, pipe))


async def _helper_burst(settings: ArchiverSettings, pipe: Connection) -> None:
    async with Archiver(settings) as archiver:
        freeze_heap()
        pipe.send("ready")
        await asyncio.to_thread(pipe.recv)
        counts, last_removal = await burst_with_last_removal(archiver)
    pipe.send((counts.as_dict(), last_removal))


async def burst_with_last_removal(archiver: Archiver) -> tuple[ArchiveCounts, float]:
    """One burst, and the wall-clock time of its last removal (polled every 2 ms)."""
    last = (archiver.totals.removed, time.time())

    async def watch() -> None:
        nonlocal last
        while True:
            await asyncio.sleep(0.002)
            if archiver.totals.removed != last[0]:
                last = (archiver.totals.removed, time.time())

    watcher = asyncio.create_task(watch())
    try:
        counts = await archiver.run(burst=True)
    finally:
        watcher.cancel()
    return counts, last[1]


class HelperInstances:
    """``count`` archiver instances in processes of their own, connected before the timed part."""

    def __init__(self, settings: ArchiverSettings, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_helper_instance, args=(settings, theirs), daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    async def ready(self) -> None:
        for pipe in self._pipes:
            if await asyncio.to_thread(pipe.recv) != "ready":
                raise RuntimeError("a helper archiver did not start")

    def go(self) -> None:
        for pipe in self._pipes:
            pipe.send("go")

    async def counts(self) -> list[tuple[dict[str, int], float]]:
        """Each instance's counts and the wall-clock time of its last removal."""
        return [await asyncio.to_thread(pipe.recv) for pipe in self._pipes]

    def stop(self) -> None:
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


async def measure_archiver(
    nats_url: str,
    dsn: str,
    ops: int,
    batch_size: int,
    history: int,
    instances: int,
    server_pids: dict[str, int],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Phase 1: the archiver end to end, from terminal updates to rows committed and keys removed."""
    kv = Settings(nats_url=nats_url, bucket="bench", history=history)
    settings = ArchiverSettings(
        kv=kv, database_url=dsn, batch_size=batch_size, grace_period=0, metrics_port=0, marker_ttl=60
    )
    helpers: HelperInstances | None = None
    async with Client(kv, create_bucket=True) as client, Archiver(settings) as archiver:
        await client.set_pipeline(PIPELINE)
        events = {i: lifecycle(i) for i in range(ops)}
        started = time.perf_counter()

        async def up_to_19(i: int) -> None:
            op = initial(i)
            for event in events[i][:-1]:
                op = advance(op, event)
            # seeded below the client (values built in memory), as a foreign writer would
            await client._open_store().create(operation_key(op.id), encode_operation(op))

        await gather_limited(ops, up_to_19)
        warm = await archiver.run(burst=True)  # acknowledges the 19th states (nothing to archive)
        say(f"  {ops} operations at their 19th change in {time.perf_counter() - started:.1f}s; skipped {warm.skipped}")

        started = time.perf_counter()

        async def finish(i: int) -> None:
            result = await client.apply(op_id(i), events[i][-1])
            if not result.operation.done:
                raise RuntimeError(f"{op_id(i)} did not finish: {result.operation.status}")

        await gather_limited(ops, finish)
        terminal_seconds = time.perf_counter() - started
        say(f"  {ops} terminal updates in {terminal_seconds:.1f}s")
        events.clear()  # the load's own objects: the archiver runs in a process of its own (archiver/cli.py)
        freeze_heap()
        if instances > 1:
            helpers = HelperInstances(settings, instances - 1)
            await helpers.ready()

        conn = await asyncpg.connect(dsn)
        try:
            lsn = await wal_lsn(conn)
            helper_pids = helpers.pids if helpers else []
            cpu_before = {name: process_tree_cpu(pid) for name, pid in server_pids.items()}
            cpu_before["archiver"] = time.process_time() + sum(process_tree_cpu(pid) for pid in helper_pids)
            started, started_at = time.perf_counter(), time.time()
            if helpers:
                helpers.go()
            counts, last_removal = await burst_with_last_removal(archiver)
            if helpers:
                for other, other_last in await helpers.counts():
                    counts = ArchiveCounts(**{k: v + other[k] for k, v in counts.as_dict().items()})
                    last_removal = max(last_removal, other_last)
            seconds = time.perf_counter() - started
            removed_seconds = last_removal - started_at
            cpu = {name: process_tree_cpu(pid) - cpu_before[name] for name, pid in server_pids.items()}
            cpu["archiver"] = (
                time.process_time() + sum(process_tree_cpu(pid) for pid in helper_pids) - cpu_before["archiver"]
            )
            wal = await wal_since(conn, lsn)
            rows = int(await conn.fetchval("SELECT count(*) FROM archived_operations"))
            distinct = int(await conn.fetchval("SELECT count(DISTINCT id) FROM archived_operations"))
        finally:
            await conn.close()
            if helpers:
                helpers.stop()
        left = sum([1 async for _ in client.scan()])
        stream_messages = (await client.bucket_info()).values
    if rows != ops or distinct != ops or left != 0 or counts.removed != ops:
        raise RuntimeError(f"archiver check failed: rows={rows} distinct={distinct} left={left} counts={counts}")
    return {
        "seconds": seconds,
        "rows_per_s": ops / seconds,
        "removed_seconds": removed_seconds,
        "removed_rows_per_s": ops / removed_seconds,
        "wal_bytes": wal,
        "wal_bytes_per_op": wal / ops,
        "counts": counts.as_dict(),
        "cpu_seconds": cpu,
        "terminal_updates_per_s": ops / terminal_seconds,
        "stream_messages_after": stream_messages,
    }


async def measure_copy(source_dsn: str, target_dsn: str, batch_size: int | None) -> dict[str, Any]:
    """Phase 2: the archiver's rows, copied into a fresh table of the same schema, committed as the archiver commits.

    One COPY per ``batch_size`` rows, each in a transaction of its own with ``SET LOCAL
    synchronous_commit = on``: the archiver's writer commits every batch durably whatever
    the server default (archiver/store.py), so the baseline waits for the same WAL flushes.
    ``batch_size`` None: the former, unpaired baseline, one COPY under the server default.
    """
    source = await asyncpg.connect(source_dsn)
    try:
        await init_connection(source)
        records = [tuple(r) for r in await source.fetch(f"SELECT {', '.join(COLUMNS)} FROM archived_operations")]
    finally:
        await source.close()
    conn = await asyncpg.connect(target_dsn)
    try:
        await init_connection(conn)
        lsn = await wal_lsn(conn)
        freeze_heap()  # as before the archiver's run
        started = time.perf_counter()
        if batch_size is None:
            await conn.copy_records_to_table("archived_operations", records=records, columns=COLUMNS)
        else:
            for start in range(0, len(records), batch_size):
                async with conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    await conn.copy_records_to_table(
                        "archived_operations", records=records[start : start + batch_size], columns=COLUMNS
                    )
        seconds = time.perf_counter() - started
        wal = await wal_since(conn, lsn)
    finally:
        await conn.close()
    return {
        "seconds": seconds,
        "rows_per_s": len(records) / seconds,
        "batches": -(-len(records) // batch_size) if batch_size else 1,
        "wal_bytes": wal,
        "wal_bytes_per_op": wal / len(records),
        "row_bytes_avg": sum(len(r[-1]) + len(r[-2]) + len(r[-3]) for r in records) / len(records),
    }


async def measure_updates(dsn: str, ops: int) -> dict[str, Any]:
    """Phase 3: one row per operation, INSERTed at creation and UPDATEd on each of the next 19 changes."""
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        # A live row holds pending and running states too.
        await conn.execute("ALTER TABLE archived_operations DROP CONSTRAINT archived_operations_status_check")
        placeholders = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
        insert = f"INSERT INTO archived_operations ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        update = (
            "UPDATE archived_operations SET "
            + ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(COLUMNS[1:]))
            + " WHERE id = $1"
        )
        states = [initial(i) for i in range(ops)]
        events = [lifecycle(i) for i in range(ops)]
        lsn = await wal_lsn(conn)
        started = time.perf_counter()
        for step in range(CHANGES):
            if step:
                states = [advance(op, events[i][step - 1]) for i, op in enumerate(states)]
            rows = [tuple(row_for(op, datetime.now(UTC))) for op in states]
            for start in range(0, ops, 1000):
                async with conn.transaction():
                    await conn.executemany(insert if step == 0 else update, rows[start : start + 1000])
        seconds = time.perf_counter() - started
        wal = await wal_since(conn, lsn)
        if not all(op.done for op in states):
            raise RuntimeError("the update design's lifecycles did not finish")
    finally:
        await conn.close()
    return {"seconds": seconds, "statements": ops * CHANGES, "wal_bytes": wal, "wal_bytes_per_op": wal / ops}


async def run(
    ops: int, batch_size: int, history: int, instances: int, workdir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    nats = NatsServer(workdir / "nats", sync_interval="1s")
    pg = PostgresServer(
        workdir / "pg",
        settings={"synchronous_commit": "off", "max_wal_size": "8GB", "checkpoint_timeout": "1h", "autovacuum": "off"},
    )
    nats.start()
    pg.start()
    try:
        admin = await asyncpg.connect(pg.dsn("postgres"))
        try:
            archive_dsn = await prepare_database(admin, pg.dsn, "archive")
            copy_dsn = await prepare_database(admin, pg.dsn, "copy")
            unpaired_dsn = await prepare_database(admin, pg.dsn, "copy_unpaired")
            updates_dsn = await prepare_database(admin, pg.dsn, "updates")
        finally:
            await admin.close()
        say("1. archiver end to end")
        assert nats.proc is not None
        assert pg.proc is not None
        pids = {"nats-server": nats.proc.pid, "postgres": pg.proc.pid}
        archiver = await measure_archiver(nats.url, archive_dsn, ops, batch_size, history, instances, pids, say)
        say(f"2. raw COPY of the same rows, {batch_size} per transaction, synchronous_commit on")
        copy = await measure_copy(archive_dsn, copy_dsn, batch_size)
        say("2b. raw COPY as before: one COPY, server default synchronous_commit off (for reference)")
        unpaired = await measure_copy(archive_dsn, unpaired_dsn, None)
        say("3. one row updated on every change")
        updates = await measure_updates(updates_dsn, ops)
    finally:
        pg.stop()
        nats.stop()
    return {
        "ops": ops,
        "changes_per_op": CHANGES,
        "batch_size": batch_size,
        "history": history,
        "archiver_instances": instances,
        "durability": "short: nats sync_interval 1s, PostgreSQL server default synchronous_commit off",
        "pairing": (
            f"archiver and raw COPY both commit with synchronous_commit on, {batch_size} rows per transaction "
            "(the archiver's writer sets it on its connections; the COPY baseline with SET LOCAL)"
        ),
        "archiver": archiver,
        "copy": copy,
        "copy_unpaired": unpaired,
        "updates": updates,
        "throughput_ratio": archiver["removed_rows_per_s"] / copy["rows_per_s"],
        "burst_ratio": archiver["rows_per_s"] / copy["rows_per_s"],
        "throughput_ratio_unpaired": archiver["removed_rows_per_s"] / unpaired["rows_per_s"],
        "wal_ratio_updates_to_archiver": updates["wal_bytes_per_op"] / archiver["wal_bytes_per_op"],
    }


def report(result: dict[str, Any]) -> str:
    a, c, u = result["archiver"], result["copy"], result["updates"]
    lines = [
        f"{result['ops']} operations, {result['changes_per_op']} changes each, bucket history {result['history']}; "
        f"durability {result['durability']}",
        f"archiver end to end   {a['removed_rows_per_s']:>9,.0f} ops/s  "
        f"({a['removed_seconds']:.2f}s: every row committed, every key removed)",
        f"pairing               {result['pairing']}",
        f"raw COPY, same rows   {c['rows_per_s']:>9,.0f} rows/s ({c['seconds']:.2f}s, {c['batches']} durable commits)",
        f"ratio                 {result['throughput_ratio']:>9.0%}    (target >= 40%)",
        f"unpaired, for reference: one COPY under synchronous_commit off {result['copy_unpaired']['rows_per_s']:,.0f} "
        f"rows/s, ratio {result['throughput_ratio_unpaired']:.0%}",
        f"whole burst           {a['rows_per_s']:>9,.0f} ops/s  ({a['seconds']:.2f}s: also its own removal markers "
        f"acknowledged and the final sweep; {result['burst_ratio']:.0%} of raw COPY)",
        f"WAL per archived op   {a['wal_bytes_per_op']:>9,.0f} B     "
        f"(target <= 2048; raw COPY {c['wal_bytes_per_op']:,.0f} B)",
        f"WAL per op, UPDATE on every change {u['wal_bytes_per_op']:>9,.0f} B "
        f"= {result['wal_ratio_updates_to_archiver']:.1f}x the archiver (target >= 15x)",
        "CPU seconds in the archiver run: " + ", ".join(f"{k} {v:.2f}" for k, v in a["cpu_seconds"].items()),
        f"terminal updates through the client: {a['terminal_updates_per_s']:,.0f}/s; "
        f"stream messages left: {a['stream_messages_after']}; counts {json.dumps(a['counts'])}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--history", type=int, default=Settings.history, help="revisions the bucket keeps per key (KVSTATE_HISTORY)"
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="archiver instances sharing the consumer (the others in processes)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--workdir", type=Path, help="where the servers keep their data (default: a temp dir)")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="kvs-bench-archiver-", dir=args.workdir) as tmp:
        try:
            result = runtime.run(
                asyncio.wait_for(
                    run(args.ops, args.batch_size, args.history, args.instances, Path(tmp), say), args.timeout
                )
            )
        except TimeoutError:
            say(f"bench.archiver: gave up after {args.timeout:g}s")
            return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
