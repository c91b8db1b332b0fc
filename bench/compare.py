"""Head-to-head: kvstate against one PostgreSQL row per operation behind an HTTP service.

    python -m bench.compare --ops 5000                 # both durability pairs, all three systems
    python -m bench.compare --ops 200 --pairs fast --out /tmp/compare.json

For each durability pair (``strict``: nats-server ``sync_interval: always`` against
PostgreSQL ``synchronous_commit = on``; ``fast``: ``1s`` against ``off``) and each system
(``naive`` GET/PUT baseline, ``careful`` SELECT ... FOR UPDATE baseline, ``kvstate``) it
starts fresh servers, replays the same planned workload (bench.workload), checks every
operation (bench.compare_check), reads PostgreSQL's WAL, CPU and table counters
(bench.compare_servers), prints one table and writes it all as JSON. kvstate's row
includes the archiver writing every finished operation to PostgreSQL once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.compare_check import CheckResult, check_run
from bench.compare_servers import (
    PAIRS,
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
from kvstate import Client, Pipeline, Settings
from kvstate.servers import find_nats_server, find_postgres_bin

__all__ = ["CompareOptions", "SystemResult", "archive_bucket", "main", "run_comparison"]

SYSTEMS = ("naive", "careful", "kvstate")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUCKET = "operations"


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
    updates_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    check: CheckResult = field(default_factory=CheckResult)
    pg: PgUsage | None = None
    client_cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0
    archive_seconds: float | None = None
    archived: Any = None
    nats_stream_bytes: int | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    note: str = ""
    load_average: tuple[float, float] = (0.0, 0.0)
    """1-minute load average before and after the workload (other work on the machine skews rates)."""

    @property
    def wal_per_op(self) -> float | None:
        return self.pg.wal_bytes / self.ops if self.pg and self.ops else None

    @property
    def dead_per_op(self) -> float | None:
        return self.pg.dead_tuples_made / self.ops if self.pg and self.ops else None


def _measure(result: SystemResult, record: RunRecord, load_before: float) -> None:
    result.load_average = (load_before, os.getloadavg()[0])
    result.updates = record.updates
    result.elapsed = record.elapsed
    result.updates_per_second = record.updates_per_second
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


async def archive_bucket(nats_url: str, bucket: str, database_url: str, meter: PgMeter | None = None) -> Any:
    """Run the archiver once over everything finished (``kvstate archiver --burst``); returns its counts.

    ``meter`` starts after the archiver applied its migrations, so it sees only the archiving.
    """
    from archiver.settings import ArchiverSettings
    from archiver.worker import Archiver

    settings = ArchiverSettings.from_env(
        {
            "NATS_URL": nats_url,
            "KVSTATE_BUCKET": bucket,
            "DATABASE_URL": database_url,
            "ARCHIVER_GRACE_PERIOD": "0",
            "ARCHIVER_METRICS_PORT": "0",
        }
    )
    async with Archiver(settings) as archiver:
        if meter is not None:
            await meter.start()
        return await archiver.run(burst=True)


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


async def run_kvstate(
    pair: DurabilityPair,
    pipeline: Pipeline,
    plans: Sequence[OperationPlan],
    options: CompareOptions,
    workdir: Path,
    deadline: float,
) -> SystemResult:
    """kvstate on a fresh nats-server, then the archiver (startup, migrations and one burst) into a fresh
    PostgreSQL cluster; the check reads the final states back from the archive."""
    result = SystemResult(pair.name, "kvstate", len(plans))
    nats = start_nats(workdir / "nats", pair)
    pg = start_postgres(workdir / "pg", pair)
    try:
        assert nats.proc is not None
        settings = Settings(nats_url=nats.url, bucket=BUCKET)
        async with Client(settings, create_bucket=True) as client:
            await client.set_pipeline(pipeline)
            system = KvstateSystem(client, pipeline)
            nats_cpu, client_cpu, load = process_tree_cpu(nats.proc.pid), time.process_time(), os.getloadavg()[0]
            record = await run_workload(system, pipeline, plans, options.workload, timeout=_remaining(deadline))
            result.client_cpu_seconds = time.process_time() - client_cpu
            result.server_cpu_seconds = process_tree_cpu(nats.proc.pid) - nats_cpu
            finals = await system.final_views()
            result.nats_stream_bytes = int((await client.store.info()).state.bytes)
            client_stats = client.stats
        _measure(result, record, load)
        result.check = check_run(plans, record, finals)
        result.outcomes = dict(system.counters) | {f"kv_{k}": v for k, v in client_stats.items()}
        meter = PgMeter(pg)
        started = time.perf_counter()
        async with asyncio.timeout(_remaining(deadline)):
            result.archived = json_ready(await archive_bucket(nats.url, BUCKET, pg.dsn(), meter))
        result.archive_seconds = time.perf_counter() - started
        result.pg = await meter.stop()
        # The end state is what the archive holds: check that, not only the bucket.
        archived = await archived_views(pg.dsn(), [plan.key for plan in plans])
        live = result.check
        result.check = check_run(plans, record, archived)
        result.note = f"checked against the archive ({len(archived)} operations archived)"
        if not live.clean:
            result.note += f"; the bucket before archiving was not clean: {live.examples[:3]}"
    finally:
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
                    result = SystemResult(pair.name, system, len(plans), note=f"run failed: {exc!r}"[:2000])
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
    "bad final",
    "errors",
    "WAL B/op",
    "dead tup/op",
    "PG CPU s",
    "table MB",
    "archive s",
)


def table_rows(results: Sequence[SystemResult]) -> list[tuple[str, ...]]:
    """The printed table, one row per system and pair."""
    rows: list[tuple[str, ...]] = []
    for r in results:
        rows.append(
            (
                f"{r.pair} ({PAIRS[r.pair].sync_interval}/{PAIRS[r.pair].synchronous_commit})",
                r.system,
                f"{r.updates:,}",
                _fmt(r.updates_per_second),
                _fmt(r.p50_ms, 2),
                _fmt(r.p99_ms, 2),
                f"{r.check.lost_updates:,}",
                f"{r.check.stale_writes:,}",
                f"{r.check.wrong_final + r.check.missing:,}",
                f"{r.errors:,}",
                _fmt(r.wal_per_op),
                _fmt(r.dead_per_op, 1),
                _fmt(r.pg.cpu_seconds if r.pg else None, 2),
                _fmt(r.pg.table_bytes / 1e6 if r.pg else None, 2),
                _fmt(r.archive_seconds, 1),
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


def evaluate_targets(results: Sequence[SystemResult]) -> list[tuple[str, bool, str]]:
    """The issue's targets, per pair: (target, met, figures)."""
    found = []
    by_pair: dict[str, dict[str, SystemResult]] = {}
    for r in results:
        by_pair.setdefault(r.pair, {})[r.system] = r
    for pair, systems in by_pair.items():
        kv = systems.get("kvstate")
        if kv is None:
            continue
        found.append(
            (
                f"{pair}: kvstate 0 lost updates, 0 stale writes, 0 wrong final states",
                kv.check.clean and kv.errors == 0,
                f"lost {kv.check.lost_updates}, stale {kv.check.stale_writes}, "
                f"wrong {kv.check.wrong_final + kv.check.missing}, errors {kv.errors}",
            )
        )
        careful, naive = systems.get("careful"), systems.get("naive")
        if careful is not None:
            ratio = kv.updates_per_second / careful.updates_per_second if careful.updates_per_second else 0.0
            found.append((f"{pair}: kvstate updates/s >= careful baseline", ratio >= 1.0, f"{ratio:.2f}x"))
        if naive is not None:
            ratio = kv.updates_per_second / naive.updates_per_second if naive.updates_per_second else 0.0
            found.append((f"{pair}: kvstate updates/s >= 1.2x naive baseline", ratio >= 1.2, f"{ratio:.2f}x"))
            if kv.wal_per_op and naive.wal_per_op:
                ratio = naive.wal_per_op / kv.wal_per_op
                found.append((f"{pair}: PostgreSQL WAL/op >= 15x below naive", ratio >= 15, f"{ratio:.1f}x lower"))
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
        "targets": [{"target": t, "met": met, "figures": fig} for t, met, fig in evaluate_targets(results)],
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
        print(
            f"  {r.pair:6} {r.system:8} {r.updates_per_second:8.0f} upd/s  lost {r.check.lost_updates}  "
            f"stale {r.check.stale_writes}  bad final {r.check.wrong_final + r.check.missing}  errors {r.errors}"
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
    for target, met, figures in evaluate_targets(results):
        print(f"  [{'met' if met else 'MISSED'}] {target}: {figures}")
    failed = [r for r in results if r.note.startswith("run failed")]
    for r in failed:
        print(f"  {r.pair} {r.system}: {r.note}", file=sys.stderr)
    out = args.out or RESULTS_DIR / f"compare-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
