"""Head-to-head: kvstate against one PostgreSQL row per operation behind an HTTP service.

    python -m bench.compare --ops 5000                 # both durability pairs, all three systems
    python -m bench.compare --ops 200 --pairs fast --out /tmp/compare.json

For each durability pair (``strict``: nats-server ``sync_interval: always`` against
PostgreSQL ``synchronous_commit = on``; ``fast``: ``1s`` against ``off``) and each system
(``naive`` GET/PUT baseline, ``careful`` SELECT ... FOR UPDATE baseline, ``kvstate``) it
starts fresh servers, replays the same planned workload (bench.workload), checks every
operation (bench.compare_check), reads PostgreSQL's WAL, CPU and table counters
(bench.compare_servers), prints one table and writes it all as JSON.

kvstate runs as it would in production: every stage service has its own ``kvstate.Client``
(own NATS connection, group committer and revision cache), and the archiver runs
alongside as its own process (``python -m archiver``), writing every finished operation
to PostgreSQL once and removing it from the bucket. kvstate's clock stops when the
workload is done and the archive holds every operation that finished (none left in the
bucket), so its updates/s include the archiving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg

from bench.compare_check import TERMINAL_STATUSES, CheckResult, check_run
from bench.compare_servers import (
    PAIRS,
    ArchiverProcess,
    BaselineProcess,
    DurabilityPair,
    PgMeter,
    PgUsage,
    json_ready,
    process_tree_cpu,
    start_nats,
    start_postgres,
)
from bench.compare_systems import CarefulBaseline, KvstateSystem, NaiveBaseline, operation_view
from bench.workload import OperationPlan, RunRecord, View, WorkloadOptions, load_pipeline, plan_workload, run_workload
from devstack.servers import find_nats_server, find_postgres_bin
from kvstate import Client, Pipeline, Settings

__all__ = ["CompareOptions", "SystemResult", "evaluate_targets", "main", "run_comparison", "wait_until_archived"]

SYSTEMS = ("naive", "careful", "kvstate")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUCKET = "operations"
ARCHIVE_WAIT_LIMIT = 300.0
"""longest wait, after the workload, for the archive to hold every finished operation"""
STREAM_SAMPLE_INTERVAL = 1.0
"""seconds between two readings of the bucket stream's size during a kvstate run"""


@dataclass(frozen=True, slots=True)
class CompareOptions:
    """One comparison run."""

    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    pairs: tuple[str, ...] = ("strict", "fast")
    systems: tuple[str, ...] = SYSTEMS
    timeout: float = 1800.0
    workdir: Path | None = None
    http_workers: int = 1
    pool_size: int = 20


@dataclass(slots=True)
class SystemResult:
    """The measurements of one system in one durability pair."""

    pair: str
    system: str
    ops: int
    updates: int = 0
    elapsed: float = 0.0
    """wall time of the measured run: the workload, and for kvstate the archive tail after it"""
    workload_seconds: float = 0.0
    """wall time of the workload alone (creations, status updates and metadata patches)"""
    updates_per_second: float = 0.0
    """updates (status messages and metadata patches) / ``elapsed``"""
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    check: CheckResult = field(default_factory=CheckResult)
    pg: PgUsage | None = None
    client_cpu_seconds: float = 0.0
    """the benchmark process: workload driver and the system's clients"""
    server_cpu_seconds: float = 0.0
    """the baseline's HTTP service, or nats-server"""
    archiver_cpu_seconds: float | None = None
    """kvstate: the archiver process, from the start of the workload to the last operation archived"""
    archive_tail_seconds: float | None = None
    """kvstate: from the end of the workload until the archive held every finished operation"""
    archived: Any = None
    """kvstate: the counts the archiver logged when it stopped"""
    conflicts: int | None = None
    """kvstate: compare-and-set conflicts, summed over every client"""
    nats_stream_bytes: int | None = None
    """kvstate: the bucket's stream at the end (archived operations removed)"""
    nats_stream_peak_bytes: int | None = None
    """kvstate: the largest stream size read during the run (read every second)"""
    outcomes: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    failed: bool = False
    """the run raised: nothing here was measured"""
    note: str = ""
    load_average: tuple[float, float] = (0.0, 0.0)
    """1-minute load average before and after the workload (other work on the machine skews rates)."""

    @property
    def wal_per_op(self) -> float | None:
        return self.pg.wal_bytes / self.ops if self.pg and self.ops else None

    @property
    def dead_per_op(self) -> float | None:
        return self.pg.dead_tuples_made / self.ops if self.pg and self.ops else None


def _measure(result: SystemResult, record: RunRecord, load_before: float, elapsed: float | None = None) -> None:
    """Copy the run's figures; ``elapsed`` replaces the workload's wall time when the system's
    work goes on after it (kvstate's archiving)."""
    result.load_average = (load_before, os.getloadavg()[0])
    result.updates = record.updates
    result.workload_seconds = record.elapsed
    result.elapsed = record.elapsed if elapsed is None else elapsed
    result.updates_per_second = result.updates / result.elapsed if result.elapsed > 0 else 0.0
    result.p50_ms = record.latency_ms(0.50)
    result.p99_ms = record.latency_ms(0.99)
    result.errors = len(record.errors)
    result.error_examples = record.errors[:5]


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the comparison ran out of time (--timeout)")
    return left


async def run_baseline(
    variant: str,
    pair: DurabilityPair,
    pipeline: Pipeline,
    plans: Sequence[OperationPlan],
    options: CompareOptions,
    workdir: Path,
    deadline: float,
) -> SystemResult:
    """One baseline variant on a fresh PostgreSQL cluster with the pair's durability."""
    result = SystemResult(pair.name, variant, len(plans))
    pg = start_postgres(workdir / "pg", pair)
    service = BaselineProcess(
        pg.dsn(), workdir / "service.log", pool_size=options.pool_size, workers=options.http_workers
    )
    try:
        await service.start()
        meter = PgMeter(pg)
        await meter.start()
        system_type = NaiveBaseline if variant == "naive" else CarefulBaseline
        system = system_type(service.url, pg.dsn(), pipeline, options.workload.concurrency)
        service_cpu, client_cpu, load = service.cpu_seconds(), time.process_time(), os.getloadavg()[0]
        try:
            record = await run_workload(system, pipeline, plans, options.workload, timeout=_remaining(deadline))
        finally:
            await system.aclose()
        result.client_cpu_seconds = time.process_time() - client_cpu
        result.server_cpu_seconds = service.cpu_seconds() - service_cpu
        service.stop()  # closes the pool: the backends exit and flush their statistics
        result.pg = await meter.stop()
        finals = await system.final_views()
        _measure(result, record, load)
        result.check = check_run(plans, record, finals)
        result.outcomes = dict(system.counters)
    finally:
        service.stop()
        pg.stop()
    return result


async def archived_views(database_url: str, keys: Sequence[str]) -> dict[str, View]:
    """The final state of each operation as the archive holds it (through ``archiver.read``)."""
    from archiver.read import ArchiveReader

    views = {}
    async with ArchiveReader.connect(database_url) as reader:
        for key in keys:
            archived = await reader.get(key)
            if archived is not None:
                views[key] = operation_view(archived.operation)
    return views


def finished_operations(record: RunRecord) -> set[str]:
    """Operations that some acknowledged write left finished (succeeded, failed or cancelled)."""
    return {d.key for d in record.deliveries if d.view is not None and d.view.status in TERMINAL_STATUSES}


async def _finished_left_in_bucket(client: Client) -> int:
    return sum([op.status.value in TERMINAL_STATUSES async for op in client.scan()])


async def wait_until_archived(
    client: Client, database_url: str, finished: int, archiver: ArchiverProcess, timeout: float
) -> int:
    """Wait until ``archived_operations`` holds ``finished`` rows and the bucket no finished operation.

    Returns the rows; raises RuntimeError when that takes longer than ``timeout`` seconds
    or the archiver exits.
    """
    conn = await asyncpg.connect(database_url)
    rows, left = 0, -1
    try:
        async with asyncio.timeout(timeout):
            while True:
                archiver.check()
                rows = int(await conn.fetchval("SELECT count(*) FROM archived_operations"))
                if rows >= finished:
                    left = await _finished_left_in_bucket(client)
                    if left == 0:
                        return rows
                await asyncio.sleep(0.05 if rows < finished else 0.2)
    except TimeoutError:
        raise RuntimeError(
            f"the archive held {rows} of {finished} finished operations after {timeout:.0f} s "
            f"(finished operations still in the bucket: {left if left >= 0 else 'not read'})"
        ) from None
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def stage_clients(settings: Settings, pipeline: Pipeline) -> AsyncIterator[dict[str, Client]]:
    """One open client per stage service, each with its own NATS connection."""
    async with contextlib.AsyncExitStack() as stack:
        yield {
            spec.name: await stack.enter_async_context(Client(settings, name=f"bench-{spec.name}"))
            for spec in pipeline.stages
        }


async def _sample_stream(client: Client, peak: list[int]) -> None:
    """Keep the largest size of the bucket's stream in ``peak[0]`` until cancelled."""
    while True:
        with contextlib.suppress(Exception):  # a reading lost under load is only a missing sample
            peak[0] = max(peak[0], (await client.bucket_info()).bytes)
        await asyncio.sleep(STREAM_SAMPLE_INTERVAL)


async def run_kvstate(
    pair: DurabilityPair,
    pipeline: Pipeline,
    plans: Sequence[OperationPlan],
    options: CompareOptions,
    workdir: Path,
    deadline: float,
) -> SystemResult:
    """kvstate on a fresh nats-server, one client per stage service, with the archiver process
    archiving into a fresh PostgreSQL cluster while the workload runs.

    The clock runs from the first creation until the archive holds every operation that
    finished and the bucket none; the check reads the final states back from the archive.
    PostgreSQL is metered from the moment the archiver is ready (its migrations excluded,
    like the baseline's ``CREATE TABLE``) until it stopped.
    """
    result = SystemResult(pair.name, "kvstate", len(plans))
    nats = start_nats(workdir / "nats", pair)
    archiver: ArchiverProcess | None = None
    try:
        pg = start_postgres(workdir / "pg", pair)
    except BaseException:
        nats.stop()
        raise
    try:
        assert nats.proc is not None
        settings = Settings(nats_url=nats.url, bucket=BUCKET)
        archiver = ArchiverProcess(nats.url, BUCKET, pg.dsn(), workdir / "archiver.log")
        async with Client(settings, create_bucket=True, name="bench-producer") as producer:
            await producer.set_pipeline(pipeline)
            await archiver.start(timeout=min(60.0, _remaining(deadline)))
            meter = PgMeter(pg)
            await meter.start()
            async with stage_clients(settings, pipeline) as clients:
                system = KvstateSystem(producer, pipeline, clients)
                peak = [0]
                sampler = asyncio.create_task(_sample_stream(producer, peak))
                try:
                    nats_cpu, archiver_cpu = process_tree_cpu(nats.proc.pid), archiver.cpu_seconds()
                    client_cpu, load = time.process_time(), os.getloadavg()[0]
                    started = time.perf_counter()
                    record = await run_workload(system, pipeline, plans, options.workload, timeout=_remaining(deadline))
                    workload_done = time.perf_counter()
                    finished = finished_operations(record)
                    rows = await wait_until_archived(
                        producer, pg.dsn(), len(finished), archiver, min(ARCHIVE_WAIT_LIMIT, _remaining(deadline))
                    )
                    archived_at = time.perf_counter()
                    result.client_cpu_seconds = time.process_time() - client_cpu
                    result.server_cpu_seconds = process_tree_cpu(nats.proc.pid) - nats_cpu
                    result.archiver_cpu_seconds = archiver.cpu_seconds() - archiver_cpu
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                kv_stats = system.kv_stats()
            result.nats_stream_bytes = (await producer.bucket_info()).bytes
            result.nats_stream_peak_bytes = max(peak[0], result.nats_stream_bytes)
        archiver.stop()  # its pool closes: the backends exit and flush their statistics
        result.archived = archiver.counts()
        result.pg = await meter.stop()
        _measure(result, record, load, elapsed=archived_at - started)
        result.archive_tail_seconds = archived_at - workload_done
        result.conflicts = kv_stats["conflicts"]
        result.outcomes = dict(system.counters) | {f"kv_{k}": v for k, v in kv_stats.items()}
        # The end state is what the archive holds: check that.
        result.check = check_run(plans, record, await archived_views(pg.dsn(), [plan.key for plan in plans]))
        result.note = (
            f"checked against the archive ({rows} of {len(finished)} finished operations archived, "
            "none left in the bucket)"
        )
    finally:
        if archiver is not None:
            archiver.stop()
        pg.stop()
        nats.stop()
    return result


async def run_comparison(
    options: CompareOptions, *, progress: Callable[[SystemResult], None] | None = None
) -> list[SystemResult]:
    """Every selected system in every selected pair; raises TimeoutError past ``options.timeout``."""
    deadline = time.monotonic() + options.timeout
    pipeline = load_pipeline()
    plans = plan_workload(pipeline, options.workload)
    results: list[SystemResult] = []
    with tempfile.TemporaryDirectory(prefix="kvc-", dir=options.workdir) as tmp:
        for pair_name in options.pairs:
            pair = PAIRS[pair_name]
            for system in options.systems:
                workdir = Path(tmp) / f"{pair.name}-{system}"
                workdir.mkdir()
                try:
                    if system == "kvstate":
                        result = await run_kvstate(pair, pipeline, plans, options, workdir, deadline)
                    else:
                        result = await run_baseline(system, pair, pipeline, plans, options, workdir, deadline)
                except TimeoutError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one broken system must not hide the others' figures
                    note = f"run failed: {exc!r}"[:2000]
                    result = SystemResult(pair.name, system, len(plans), failed=True, note=note)
                results.append(result)
                if progress is not None:
                    progress(result)
    return results


# ---------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


HEADER = (
    "pair",
    "system",
    "updates",
    "upd/s",
    "p50 ms",
    "p99 ms",
    "lost",
    "stale",
    "stale meta",
    "bad final",
    "errors",
    "CAS conflicts",
    "WAL B/op",
    "dead tup/op",
    "PG CPU s",
    "table MB",
    "archive tail s",
)


def table_rows(results: Sequence[SystemResult]) -> list[tuple[str, ...]]:
    """The printed table, one row per system and pair (a failed run shows only that it failed)."""
    rows: list[tuple[str, ...]] = []
    for r in results:
        pair = f"{r.pair} ({PAIRS[r.pair].sync_interval}/{PAIRS[r.pair].synchronous_commit})"
        if r.failed:
            rows.append((pair, r.system, "run failed", *("-" for _ in HEADER[3:])))
            continue
        rows.append(
            (
                pair,
                r.system,
                f"{r.updates:,}",
                _fmt(r.updates_per_second),
                _fmt(r.p50_ms, 2),
                _fmt(r.p99_ms, 2),
                f"{r.check.lost_updates:,}",
                f"{r.check.stale_writes:,}",
                f"{r.check.stale_metadata:,}",
                f"{r.check.wrong_final + r.check.missing:,}",
                f"{r.errors:,}",
                _fmt(r.conflicts),
                _fmt(r.wal_per_op),
                _fmt(r.dead_per_op, 1),
                _fmt(r.pg.cpu_seconds if r.pg else None, 2),
                _fmt(r.pg.table_bytes / 1e6 if r.pg else None, 2),
                _fmt(r.archive_tail_seconds, 1),
            )
        )
    return rows


def format_table(results: Sequence[SystemResult]) -> str:
    """A Markdown table of the results."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


TargetStatus = Literal["met", "missed", "not measured"]


def _measured(r: SystemResult | None) -> bool:
    """The run finished, every operation was checked and updates were timed."""
    return r is not None and not r.failed and r.check.operations == r.ops and r.updates_per_second > 0


def _rate_target(
    pair: str, kv: SystemResult, other: SystemResult | None, name: str, factor: float
) -> tuple[str, TargetStatus, str] | None:
    if other is None:
        return None
    target = f"{pair}: kvstate updates/s >= {f'{factor:g}x ' if factor != 1 else ''}{name} baseline"
    if not (_measured(kv) and _measured(other)):
        failed = " and ".join(r.system for r in (kv, other) if not _measured(r))
        return (target, "not measured", f"{failed} not measured")
    ratio = kv.updates_per_second / other.updates_per_second
    return (target, "met" if ratio >= factor else "missed", f"{ratio:.2f}x")


def evaluate_targets(results: Sequence[SystemResult]) -> list[tuple[str, TargetStatus, str]]:
    """The issue's targets, per pair: (target, "met" | "missed" | "not measured", figures).

    A target is met only by figures that were measured: a failed run, an unchecked run or a
    missing WAL figure makes it "not measured", never met.
    """
    found: list[tuple[str, TargetStatus, str]] = []
    by_pair: dict[str, dict[str, SystemResult]] = {}
    for r in results:
        by_pair.setdefault(r.pair, {})[r.system] = r
    for pair, systems in by_pair.items():
        kv = systems.get("kvstate")
        if kv is None:
            continue
        target = f"{pair}: kvstate 0 lost updates, 0 stale writes, 0 stale metadata, 0 wrong final states"
        if not _measured(kv):
            found.append((target, "not measured", "the run failed" if kv.failed else "not checked"))
        else:
            found.append(
                (
                    target,
                    "met" if kv.check.clean and kv.errors == 0 else "missed",
                    f"lost {kv.check.lost_updates}, stale {kv.check.stale_writes}, "
                    f"stale metadata {kv.check.stale_metadata}, "
                    f"wrong {kv.check.wrong_final + kv.check.missing}, errors {kv.errors}",
                )
            )
        careful, naive = systems.get("careful"), systems.get("naive")
        for rate in (_rate_target(pair, kv, careful, "careful", 1.0), _rate_target(pair, kv, naive, "naive", 1.2)):
            if rate is not None:
                found.append(rate)
        if naive is not None:
            target = f"{pair}: PostgreSQL WAL/op >= 15x below naive"
            kv_wal, naive_wal = kv.wal_per_op, naive.wal_per_op
            if not (_measured(kv) and _measured(naive)) or kv_wal is None or naive_wal is None:
                missing = [r.system for r in (kv, naive) if not _measured(r) or r.wal_per_op is None]
                found.append((target, "not measured", f"no WAL figure for {' and '.join(missing)}"))
            elif kv_wal == 0:
                found.append((target, "met" if naive_wal > 0 else "missed", "kvstate wrote no WAL"))
            else:
                ratio = naive_wal / kv_wal
                found.append((target, "met" if ratio >= 15 else "missed", f"{ratio:.1f}x lower"))
    return found


def _command_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the comparison ran on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": _command_version([find_nats_server(), "--version"]),
        "postgres": _command_version([str(find_postgres_bin() / "postgres"), "--version"]),
    }


def report(options: CompareOptions, results: Sequence[SystemResult]) -> dict[str, Any]:
    """The JSON document written next to the printed table."""
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.compare " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "options": json_ready(options.workload) | {"pairs": list(options.pairs), "http_workers": options.http_workers},
        "pairs": {name: json_ready(PAIRS[name]) for name in options.pairs},
        "results": [json_ready(r) | {"wal_per_op": r.wal_per_op, "dead_tuples_per_op": r.dead_per_op} for r in results],
        "targets": [
            {"target": t, "status": status, "met": status == "met", "figures": fig}
            for t, status, fig in evaluate_targets(results)
        ],
        "table": format_table(results),
    }


# ---------------------------------------------------------------------- command line


def _csv(allowed: Sequence[str]) -> Any:
    def parse(raw: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in raw.split(",") if part.strip())
        unknown = [item for item in items if item not in allowed]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {raw!r})")
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=1000, help="operations per system (default 1000)")
    p.add_argument("--concurrency", type=int, default=32, help="operations in flight at once (default 32)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pairs", type=_csv(tuple(PAIRS)), default=("strict", "fast"), help="strict,fast")
    p.add_argument("--systems", type=_csv(SYSTEMS), default=SYSTEMS, help="naive,careful,kvstate")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    p.add_argument("--http-workers", type=int, default=1, help="uvicorn workers of the baseline service")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/compare-<time>.json)")
    return p


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the comparison, print the table and the targets, write the JSON; 0 when every run finished, else 1."""
    args = parser().parse_args(argv)
    if args.ops < 1 or args.concurrency < 1 or args.timeout <= 0 or args.http_workers < 1:
        print("error: --ops, --concurrency, --http-workers and --timeout must be positive", file=sys.stderr)
        return 2
    workdir = Path(environ["BENCH_WORKDIR"]) if environ and environ.get("BENCH_WORKDIR") else None
    options = CompareOptions(
        workload=WorkloadOptions(ops=args.ops, concurrency=args.concurrency, seed=args.seed),
        pairs=args.pairs,
        systems=args.systems,
        timeout=args.timeout,
        workdir=workdir,
        http_workers=args.http_workers,
    )

    def progress(r: SystemResult) -> None:
        if r.failed:
            print(f"  {r.pair:6} {r.system:8} {r.note}", flush=True)
            return
        print(
            f"  {r.pair:6} {r.system:8} {r.updates_per_second:8.0f} upd/s  lost {r.check.lost_updates}  "
            f"stale {r.check.stale_writes}  stale metadata {r.check.stale_metadata}  "
            f"bad final {r.check.wrong_final + r.check.missing}  errors {r.errors}"
            + (f"  conflicts {r.conflicts}" if r.conflicts is not None else "")
            + (f"  ({r.note})" if r.note else ""),
            flush=True,
        )

    print(f"comparing {', '.join(options.systems)} on {args.ops} operations, pairs {', '.join(options.pairs)}")
    try:
        results = asyncio.run(run_comparison(options, progress=progress))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    document = report(options, results)
    print()
    print(document["table"])
    print()
    for target, status, figures in evaluate_targets(results):
        print(f"  [{status if status == 'met' else status.upper()}] {target}: {figures}")
    failed = [r for r in results if r.failed]
    for r in failed:
        print(f"  {r.pair} {r.system}: {r.note}", file=sys.stderr)
    out = args.out or RESULTS_DIR / f"compare-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
