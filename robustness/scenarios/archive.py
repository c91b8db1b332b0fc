"""Archive-side scenarios: the archiver and PostgreSQL under faults, and the snapshot/removal race.

- T12: the archiver process SIGKILLed every 5 s while 5,000 operations go through ten updates
  each: one row per operation at its last acknowledged revision, a redelivery absorbed, and
  the bucket drained within 60 s of the last kill.
- T13: PostgreSQL's postmaster SIGKILLed 3 times (each right after the archiver logged a
  committed batch) and the whole server SIGSTOPped 60 s, with ``synchronous_commit = off`` as
  ``kvstate up`` runs it and no grace period: nothing lost, one row per id, and no key removed
  from the bucket whose row the crashes lost.
- T14: 200 operations updated between their snapshot and their removal: 200 rows at the newer
  revision, no key removed while a newer revision exists.
- T20: a soak on a three-replica bucket with the archiver, the dashboard and an SSE client
  (``python -m robustness T20`` only; see ``robustness/archive_soak.py``).

T12-T14 run on one nats-server (R1) and one PostgreSQL, started under ``options.workdir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from devstack.servers import PostgresServer
from kvstate import Client, KvstateError, OperationNotFound, Settings
from robustness.archive_harness import (
    STAGES,
    ArchiverConfig,
    ArchiverProcess,
    Workload,
    archived_revisions,
    bucket_states,
    create_database,
    opened_client,
    percentile,
    servers,
    wait_for_group_exit,
)
from robustness.archive_soak import soak
from robustness.base import RunOptions, Scenario, ScenarioResult

__all__ = ["SCENARIOS"]

BUCKET = "operations"
POSTGRES_AS_KVSTATE_UP = {"synchronous_commit": "off"}
"""PostgreSQL as ``kvstate up`` runs it (devstack/up.py)"""


@dataclass
class _Stack:
    """What an archive scenario runs on: one nats-server, one PostgreSQL, a client and the archiver process."""

    pg: PostgresServer
    dsn: str
    settings: Settings
    client: Client
    archiver: ArchiverProcess


@contextlib.asynccontextmanager
async def _archiving(
    options: RunOptions, config: ArchiverConfig, *, wait_started: bool = True
) -> AsyncIterator[_Stack]:
    """The servers (PostgreSQL as ``kvstate up`` runs it), the archive database, a client and a
    started archiver; the archiver is killed and the servers stopped, by pid, on the way out."""
    with servers(options.workdir, options.sync_interval, pg_settings=POSTGRES_AS_KVSTATE_UP) as (nats, pg):
        dsn = await create_database(pg)
        settings = Settings(nats_url=nats.url, bucket=BUCKET)
        async with opened_client(settings) as client:
            archiver = ArchiverProcess(config, settings, dsn, options.workdir / "archiver")
            archiver.start()
            try:
                if wait_started and not await archiver.wait_started():
                    raise RuntimeError(f"the archiver did not start: see {archiver.log_path}")
                yield _Stack(pg, dsn, settings, client, archiver)
            finally:
                archiver.kill()


_BATCH = b"batch messages="
_T13_BATCH = 10
_FULL_BATCH = b"batch messages=%d " % _T13_BATCH


async def _consumer_redelivered(client: Client, consumer: str = "archiver") -> int:
    """The archiver consumer's num_redelivered now (0 while it does not exist)."""
    with contextlib.suppress(Exception):  # not created yet, or NATS busy: the next sample counts
        info = await client._open_store().js.consumer_info(client._open_store().config.stream, consumer)
        return int(info.num_redelivered or 0)
    return 0


# ---------------------------------------------------------------- T12


async def archiver_killed_every_5s(options: RunOptions) -> ScenarioResult:
    """T12: SIGKILL the archiver every 5 s under 5,000 operations x 10 updates; rows exact, bucket drained."""
    result = ScenarioResult("T12")
    seconds = options.seconds if options.seconds is not None else 60.0
    count = max(10, round(5000 * options.scale))
    kill_every = 5.0
    config = ArchiverConfig(grace_period=0.0, ack_wait=5.0, sweep_interval=10.0)
    result.figures.update(
        operations=count, updates=count * 2 * len(STAGES), workload_seconds_planned=seconds, **config.figures()
    )
    async with _archiving(options, config, wait_started=False) as stack:
        client, dsn, archiver = stack.client, stack.dsn, stack.archiver
        workload = Workload(client, count, seconds)
        started = time.monotonic()
        work = asyncio.create_task(workload.run())
        redelivered = 0
        max_kills = int((seconds * 2 + 120) / kill_every)
        # every 5 s while the workload runs, and once more the moment its last operation
        # finished, so that the last kill hits batches in flight
        while archiver.kills < max_kills and not work.done():
            next_kill = time.monotonic() + kill_every
            while time.monotonic() < next_kill and not work.done():
                redelivered = max(redelivered, await _consumer_redelivered(client))
                await asyncio.wait({work}, timeout=min(0.5, max(0.0, next_kill - time.monotonic())))
            archiver.kill()
            archiver.start()
        last_kill = time.monotonic()
        await work
        result.figures.update(workload_seconds=round(last_kill - started, 1))
        drained_after = await _wait_drained(client, dsn, workload, timeout=90.0)
        redelivered = max(redelivered, await _consumer_redelivered(client))
        rows, row_count = await archived_revisions(dsn)
        bucket = await bucket_states(client)
    totals = archiver.batch_totals()
    done = workload.done
    lost = [i for i in done if i not in rows]
    stale = [i for i in done if i in rows and rows[i] != done[i].revision]
    left = [i for i in done if i in bucket.live]
    result.figures.update(
        kills=archiver.kills,
        finished_operations=len(done),
        rows=row_count,
        distinct_ids=len(rows),
        lost=len(lost),
        not_at_last_revision=len(stale),
        extra_rows=len(set(rows) - set(done)),
        duplicates_absorbed=totals.duplicates,
        max_num_redelivered=redelivered,
        left_in_bucket=len(left),
        drained_s_after_last_kill=round(drained_after, 1) if drained_after is not None else "not drained",
        workload_errors=len(workload.errors),
        batches=totals.batches,
    )
    result.require(len(done) == count, f"the workload finished {len(done)} of {count} operations")
    result.require(not workload.errors, f"workload errors: {workload.errors[:3]}")
    result.require(archiver.kills >= 3, f"only {archiver.kills} kills")
    result.require(row_count == len(rows) == len(done), f"{row_count} rows, {len(rows)} ids for {len(done)} operations")
    result.require(not lost, f"{len(lost)} finished operations have no row (e.g. {lost[:3]})")
    result.require(not stale, f"{len(stale)} rows are not at the last acknowledged revision (e.g. {stale[:3]})")
    result.require(
        totals.duplicates + redelivered > 0, "no redelivery was seen: no duplicate absorbed, num_redelivered 0"
    )
    result.require(not left, f"{len(left)} archived operations are still in the bucket")
    result.require(
        drained_after is not None and drained_after <= 60.0,
        f"not drained within 60 s of the last kill ({result.figures['drained_s_after_last_kill']})",
    )
    return result


async def _wait_drained(client: Client, dsn: str, workload: Workload, timeout: float) -> float | None:
    """Seconds until every finished operation has its row at its last revision and left the bucket (None: timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        rows, _ = await archived_revisions(dsn)
        if all(rows.get(i) == r.revision for i, r in workload.done.items()):
            bucket = await bucket_states(client)
            if not set(workload.done) & set(bucket.live):
                return time.monotonic() - started
        await asyncio.sleep(0.5)
    return None


# ---------------------------------------------------------------- T13


async def postgres_killed_and_stopped(options: RunOptions) -> ScenarioResult:
    """T13: SIGKILL PostgreSQL 3 times right after commits, SIGSTOP it; lost 0, one row per id, no early removal."""
    result = ScenarioResult("T13")
    full = options.seconds is None
    stop_seconds = 60.0 if full else min(10.0, max(2.0, (options.seconds or 30.0) / 4))
    gap = 8.0 if full else 2.0
    seconds = options.seconds if options.seconds is not None else 40.0 + 3 * gap + stop_seconds
    count = max(10, round(50 * seconds * options.scale))
    # grace 0: a removal follows its batch within milliseconds, inside the window in which an
    # asynchronous commit is acknowledged but not yet flushed (wal_writer_delay, 200 ms).
    # Small batches and a workload in bursts: while a burst is archived, batches commit back to
    # back, and a kill right after one of them (a full batch: more are waiting) finds commits
    # PostgreSQL acknowledged but did not write yet.
    config = ArchiverConfig(grace_period=0.0, batch_size=_T13_BATCH, batch_timeout=0.02, marker_ttl=3600.0)
    result.figures.update(
        operations=count,
        workload_seconds_planned=round(seconds, 1),
        postgres="synchronous_commit=off",
        kills_planned=3,
        sigstop_s=stop_seconds,
        **config.figures(),
    )
    async with _archiving(options, config) as stack:
        client, dsn, archiver, pg = stack.client, stack.dsn, stack.archiver, stack.pg
        workload = Workload(client, count, seconds, concurrency=64, burst=max(20, round(100 * options.scale)))
        work = asyncio.create_task(workload.run())
        supervisor = asyncio.create_task(_supervise(archiver))
        faults = await _postgres_faults(pg, archiver, stop_seconds, gap, result)
        await work
        # every finished operation archived and removed, or for ever lost: wait until
        # none is left in the bucket (grace 0), bounded
        quiet = await _wait_bucket_empty(client, workload, timeout=120.0 if full else 45.0)
        supervisor.cancel()
        rows, row_count = await archived_revisions(dsn)
        bucket = await bucket_states(client)
    done = workload.done
    lost = [i for i in done if rows.get(i) != done[i].revision]
    removed_without_row = [i for i in bucket.removed if i in done and rows.get(i) != done[i].revision]
    totals = archiver.batch_totals()
    result.figures.update(
        faults,
        finished_operations=len(done),
        rows=row_count,
        distinct_ids=len(rows),
        lost=len(lost),
        duplicates=row_count - len(rows) + len(set(rows) - set(done)),
        removed_from_bucket=len(bucket.removed),
        removed_without_durable_row=len(removed_without_row),
        left_in_bucket=len(set(done) & set(bucket.live)),
        bucket_emptied_s=round(quiet, 1) if quiet is not None else "not emptied",
        duplicates_absorbed=totals.duplicates,
        workload_errors=len(workload.errors),
        archiver_exits=len(archiver.exits),
    )
    result.require(
        not archiver.exits,
        f"the archiver process exited {len(archiver.exits)} times on its own (codes {archiver.exits}; restarted "
        f"as a supervisor would): see the tracebacks in {archiver.log_dir}",
    )
    result.require(len(done) == count, f"the workload finished {len(done)} of {count} operations")
    result.require(not workload.errors, f"workload errors: {workload.errors[:3]}")
    result.require(faults["postgres_kills"] == 3, f"{faults['postgres_kills']} PostgreSQL kills of 3")
    result.require(not lost, f"lost {len(lost)} finished operations (no row at their last revision, e.g. {lost[:3]})")
    result.require(
        row_count == len(rows) and not set(rows) - set(done), f"duplicates: {result.figures['duplicates']} rows"
    )
    result.require(
        not removed_without_row,
        f"{len(removed_without_row)} keys were removed from the bucket though a PostgreSQL crash lost their row "
        f"(e.g. {removed_without_row[:3]}): acknowledged asynchronous commits, not flushed",
    )
    result.require(quiet is not None, "finished operations are still in the bucket at the end")
    return result


async def _postgres_faults(
    pg: PostgresServer, archiver: ArchiverProcess, stop_seconds: float, gap: float, result: ScenarioResult
) -> dict[str, float | int | str]:
    """Kill the postmaster 3 times right after a committed batch, then SIGSTOP its whole process group."""
    kills = 0
    latencies: list[float] = []
    restarts: list[float] = []
    await asyncio.sleep(3.0)  # warm-up: batches flowing
    for _ in range(3):
        if not await archiver.wait_for_line(_FULL_BATCH, timeout=30.0):
            result.failures.append("no committed batch to kill PostgreSQL after")
            break
        seen = time.monotonic()
        assert pg.proc is not None
        pgid = pg.proc.pid
        pg.kill()  # SIGKILL the postmaster by pid; its children exit on their own
        latencies.append((time.monotonic() - seen) * 1000)
        kills += 1
        if not await wait_for_group_exit(pgid):
            result.failures.append("PostgreSQL's children did not exit after the postmaster was killed")
        down = time.monotonic()
        await asyncio.to_thread(pg.start)
        restarts.append(time.monotonic() - down)
        if not await archiver.wait_for_line(_BATCH, timeout=60.0):
            result.failures.append("the archiver committed nothing within 60 s of PostgreSQL's restart")
        await asyncio.sleep(gap)
    assert pg.proc is not None
    pgid = pg.proc.pid
    os.killpg(pgid, signal.SIGSTOP)  # the postmaster and every backend: a frozen server
    try:
        await asyncio.sleep(stop_seconds)
    finally:
        os.killpg(pgid, signal.SIGCONT)
    recovered = time.monotonic()
    # a batch comes only if operations finished meanwhile; the end checks say whether all did
    resumed = await archiver.wait_for_line(_BATCH, timeout=30.0)
    return {
        "postgres_kills": kills,
        "kill_after_commit_ms_max": round(max(latencies), 1) if latencies else "-",
        "postgres_restart_s_max": round(max(restarts), 2) if restarts else "-",
        "first_commit_after_sigcont_s": round(time.monotonic() - recovered, 1) if resumed else "none",
    }


async def _supervise(archiver: ArchiverProcess) -> None:
    """Start the archiver again whenever it exits on its own (counted in ``archiver.exits``)."""
    while True:
        archiver.restart_if_exited()
        await asyncio.sleep(0.2)


async def _wait_bucket_empty(client: Client, workload: Workload, timeout: float) -> float | None:
    """Seconds until none of the finished operations is in the bucket any more (None: timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        bucket = await bucket_states(client)
        if not set(workload.done) & set(bucket.live):
            return time.monotonic() - started
        await asyncio.sleep(1.0)
    return None


# ---------------------------------------------------------------- T14


async def update_between_snapshot_and_removal(options: RunOptions) -> ScenarioResult:
    """T14: 200 times, reopen and finish again an operation the archiver snapshotted, before its removal."""
    result = ScenarioResult("T14")
    count = max(5, round(200 * options.scale))
    grace = 2.0
    config = ArchiverConfig(grace_period=grace)
    result.figures.update(operations=count, **config.figures())
    async with _archiving(options, config) as stack:
        client, dsn, archiver = stack.client, stack.dsn, stack.archiver
        changes: dict[str, list[tuple[int, bool]]] = {}
        async with client.watch(include_existing=False) as watch:

            async def record() -> None:
                async for change in watch:
                    changes.setdefault(change.op_id, []).append((change.revision, change.deleted))

            recorder = asyncio.create_task(record())
            race = _Race(client, dsn, grace)
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> None:
                async with sem:
                    await race.run_one(i)

            async with asyncio.timeout(max(120.0, count * 2.0)):
                await asyncio.gather(*(one(i) for i in range(count)))
            drained = await _wait_rows_and_removals(client, dsn, race.final, timeout=60.0)
            await asyncio.sleep(0.5)  # the last markers reach the watch
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
        rows, row_count = await archived_revisions(dsn)
        exit_code = archiver.terminate()
        counts = archiver.final_counts()
    at_newer = [i for i, r in race.final.items() if rows.get(i) == r]
    early = _removed_while_newer(changes, race.final)
    markers_seen = sum(1 for i in race.final if any(deleted for _, deleted in changes.get(i, [])))
    result.figures.update(
        raced=len(race.final),
        rows=row_count,
        rows_at_newer_revision=len(at_newer),
        removed_while_newer_revision=len(early),
        removals_watched=markers_seen,
        reopen_found_key_gone=race.gone,
        snapshot_s_p50=round(percentile(race.snapshot_waits, 0.5), 3),
        snapshot_s_max=round(max(race.snapshot_waits, default=0.0), 3),
        reopen_margin_s_min=round(min(race.margins, default=0.0), 3),
        remove_conflicts=counts.get("remove_conflicts", -1),
        removed=counts.get("removed", -1),
        drained_s=round(drained, 1) if drained is not None else "not drained",
        archiver_exit=exit_code if exit_code is not None else "-",
        errors=len(race.errors),
    )
    result.require(not race.errors, f"errors: {race.errors[:3]}")
    result.require(len(race.final) == count, f"{len(race.final)} of {count} races ran")
    result.require(len(at_newer) == count == row_count, f"{len(at_newer)} of {count} rows at the newer revision")
    result.require(not early, f"{len(early)} keys removed while a newer revision existed (e.g. {early[:3]})")
    result.require(markers_seen == count, f"the watch saw {markers_seen} removals of {count}")
    result.require(race.gone == 0, f"{race.gone} keys were gone before the update (removed inside the grace period?)")
    result.require(
        counts.get("remove_conflicts", 0) >= count,
        f"only {counts.get('remove_conflicts')} removals refused: the race did not happen {count} times",
    )
    result.require(drained is not None, "not every raced operation was archived at its newer revision and removed")
    return result


class _Race:
    """One operation finished, snapshotted, reopened and finished again inside the grace period."""

    def __init__(self, client: Client, dsn: str, grace: float) -> None:
        self.client = client
        self.dsn = dsn
        self.grace = grace
        self.final: dict[str, int] = {}
        self.snapshot_waits: list[float] = []
        self.margins: list[float] = []
        """seconds left of the grace period when the reopen was acknowledged"""
        self.gone = 0
        self.errors: list[str] = []

    async def run_one(self, i: int) -> None:
        workload = Workload(self.client, 1, 0.0)
        first = await workload.one_operation(i)
        if first is None:
            self.errors.extend(workload.errors)
            return
        op_id = first.op_id
        try:
            if not await self._snapshotted(op_id, first.revision, timeout=10.0):
                self.errors.append(f"{op_id}: no row at revision {first.revision} within 10 s")
                return
            self.snapshot_waits.append(time.time() - first.finished_at)
            try:
                await self.client.reopen(op_id, [STAGES[-1]])
            except OperationNotFound:
                self.gone += 1
                return
            self.margins.append(first.finished_at + self.grace - time.time())
            await self.client.start(op_id, STAGES[-1], worker="robust-again")
            again = await self.client.succeed(op_id, STAGES[-1], worker="robust-again")
        except KvstateError as exc:
            self.errors.append(f"{op_id}: {type(exc).__name__}: {exc}")
            return
        if not again.operation.done:
            self.errors.append(f"{op_id}: not finished again ({again.operation.status})")
            return
        self.final[op_id] = again.revision

    async def _snapshotted(self, op_id: str, revision: int, timeout: float) -> bool:
        conn = await asyncpg.connect(self.dsn)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                archived = await conn.fetchval("SELECT revision FROM archived_operations WHERE id = $1", op_id)
                if archived == revision:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            await conn.close()


def _removed_while_newer(changes: dict[str, list[tuple[int, bool]]], final: dict[str, int]) -> list[str]:
    """Ids with a removal marker before their newest revision, or after any revision but the newest."""
    early = []
    for op_id, newest in final.items():
        last_value = 0
        for revision, deleted in changes.get(op_id, []):
            if deleted and (revision < newest or last_value != newest):
                early.append(op_id)
                break
            if not deleted:
                last_value = revision
    return early


async def _wait_rows_and_removals(client: Client, dsn: str, final: dict[str, int], timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        rows, _ = await archived_revisions(dsn)
        if all(rows.get(i) == r for i, r in final.items()):
            bucket = await bucket_states(client)
            if all(i in bucket.removed for i in final):
                return time.monotonic() - started
        await asyncio.sleep(0.5)
    return None


# ---------------------------------------------------------------- T20


async def soak_r3(options: RunOptions) -> ScenarioResult:
    """T20: 30 minutes at a fixed rate on an R3 bucket with the archiver, the dashboard and an SSE client."""
    return await soak(options)


SCENARIOS: dict[str, Scenario] = {
    "T12": archiver_killed_every_5s,
    "T13": postgres_killed_and_stopped,
    "T14": update_between_snapshot_and_removal,
    "T20": soak_r3,
}
