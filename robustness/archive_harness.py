"""What the archive scenarios (robustness/scenarios/archive.py) share: servers, the archiver
as a process, a paced workload that records what it was acknowledged, and the checks.

Everything runs on loopback, as child processes this module starts and ends by pid:
one nats-server (R1) and one PostgreSQL under ``RunOptions.workdir``, and ``python -m
archiver`` processes with a log file each. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from devstack.servers import NatsServer, PostgresServer, free_port, parent_death_signal
from kvstate import Client, KvstateError, Pipeline, Settings, StageSpec
from kvstate.keys import OPERATION_PREFIX, operation_id_from_key

__all__ = [
    "PIPELINE",
    "STAGES",
    "ArchiverConfig",
    "ArchiverProcess",
    "BucketState",
    "LogTail",
    "OpRecord",
    "Workload",
    "archived_revisions",
    "bucket_states",
    "create_database",
    "percentile",
    "process_group_alive",
    "servers",
    "wait_for_group_exit",
]

STAGES = ("s1", "s2", "s3", "s4", "s5")
PIPELINE = Pipeline(
    name="robust",
    heartbeat_timeout=300.0,
    stages=tuple(StageSpec(name=name, after=(STAGES[i - 1],) if i else ()) for i, name in enumerate(STAGES)),
)
"""Five stages in a row: starting and finishing each is ten updates, the tenth finishes the operation."""

DATABASE = "kvstate"
_BATCH_LINE = re.compile(rb"batch messages=(\d+) archived=(\d+) duplicates=(\d+)")
_STOPPED_LINE = re.compile(rb"archiver stopped: (.*)")


# ---------------------------------------------------------------- servers


@contextlib.contextmanager
def servers(
    workdir: Path, sync_interval: str, *, pg_settings: Mapping[str, str] | None = None
) -> Iterator[tuple[NatsServer, PostgresServer]]:
    """One nats-server and one PostgreSQL under ``workdir``, stopped by pid on exit.

    Started from the calling thread (the event loop's); PostgreSQL is not tied to it
    (``die_with_parent`` off) because the scenarios restart it from a worker thread.
    """
    nats = NatsServer(workdir / "nats", sync_interval=sync_interval, die_with_parent=True)
    pg = PostgresServer(workdir / "pg", settings=dict(pg_settings or {}))
    try:
        nats.start()
        pg.start()
        yield nats, pg
    finally:
        if pg.proc is not None and pg.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pg.proc.pid, signal.SIGCONT)  # never leave it stopped
        pg.stop()
        nats.stop()


async def create_database(pg: PostgresServer) -> str:
    """Create the archive database; returns its URL."""
    conn = await asyncpg.connect(pg.dsn("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    return pg.dsn(DATABASE)


def process_group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` that is not a zombie exists (read from /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


async def wait_for_group_exit(pgid: int, timeout: float = 30.0) -> bool:
    """Wait until the processes of group ``pgid`` are gone (PostgreSQL's children after the postmaster died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_group_alive(pgid):
            return True
        await asyncio.sleep(0.05)
    return False


# ---------------------------------------------------------------- the archiver as a process


@dataclass(frozen=True)
class ArchiverConfig:
    """The ARCHIVER_* settings of the archiver processes a scenario starts."""

    batch_size: int = 500
    batch_timeout: float = 0.2
    grace_period: float = 0.0
    ack_wait: float = 30.0
    sweep_interval: float = 60.0
    marker_ttl: float = 300.0

    def environment(self, nats_url: str, bucket: str, database_url: str, metrics_port: int) -> dict[str, str]:
        """The child's environment: ours without any kvstate variable, then these settings."""
        prefixes = ("ARCHIVER_", "KVSTATE_", "NATS_", "DATABASE_", "DASHBOARD_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            NATS_URL=nats_url,
            KVSTATE_BUCKET=bucket,
            DATABASE_URL=database_url,
            ARCHIVER_BATCH_SIZE=str(self.batch_size),
            ARCHIVER_BATCH_TIMEOUT=str(self.batch_timeout),
            ARCHIVER_GRACE_PERIOD=str(self.grace_period),
            ARCHIVER_ACK_WAIT=str(self.ack_wait),
            ARCHIVER_SWEEP_INTERVAL=str(self.sweep_interval),
            ARCHIVER_MARKER_TTL=str(self.marker_ttl),
            ARCHIVER_METRICS_PORT=str(metrics_port),
            PYTHONUNBUFFERED="1",
        )
        return env

    def figures(self) -> dict[str, float | int | str]:
        """The settings, for a scenario's figures."""
        return {
            "archiver_batch_size": self.batch_size,
            "archiver_batch_timeout_s": self.batch_timeout,
            "archiver_grace_period_s": self.grace_period,
            "archiver_ack_wait_s": self.ack_wait,
            "archiver_sweep_interval_s": self.sweep_interval,
            "archiver_marker_ttl_s": self.marker_ttl,
        }


@dataclass(frozen=True)
class BatchTotals:
    """What the batch lines of the archiver logs add up to."""

    batches: int
    archived: int
    duplicates: int


class ArchiverProcess:
    """``python -m archiver -v`` as a child in a session of its own, started again after each kill.

    Each incarnation logs to ``archiver-N.log`` in ``log_dir``; ``-v`` logs one line per
    committed batch, which ``batch_totals`` adds up over every incarnation.
    """

    def __init__(
        self, config: ArchiverConfig, settings: Settings, database_url: str, log_dir: Path, *, metrics: bool = False
    ) -> None:
        self.config = config
        self.settings = settings
        self.database_url = database_url
        self.log_dir = log_dir
        self.metrics = metrics
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.kills = 0
        self.exits: list[int] = []
        """exit codes of incarnations that ended on their own"""

    @property
    def pid(self) -> int | None:
        """The running incarnation's pid."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        """The current incarnation's log."""
        return self.logs[-1]

    def start(self) -> None:
        """Start a new incarnation (the previous one must have ended)."""
        assert self.pid is None, "an archiver is still running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port() if self.metrics else 0
        path = self.log_dir / f"archiver-{len(self.logs) + 1}.log"
        self.logs.append(path)
        env = self.config.environment(
            self.settings.nats_url, self.settings.bucket, self.database_url, self.metrics_port
        )
        with open(path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "archiver", "-v"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGKILL),
            )

    async def wait_started(self, timeout: float = 60.0) -> bool:
        """Wait until the current incarnation says it started (connected, migrated, consuming)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if b"archiver started" in self.log_path.read_bytes():
                    return True
            if self.pid is None:
                return False
            await asyncio.sleep(0.05)
        return False

    async def wait_for_line(self, needle: bytes, timeout: float) -> bool:
        """Wait until a line with ``needle`` is logged from now on (by this incarnation or a later one)."""
        tail = LogTail(self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tail.path != self.log_path:
                tail = LogTail(self.log_path, start=0)
            remaining = min(0.5, deadline - time.monotonic())
            if await tail.wait_for(needle, max(remaining, 0.0)):
                return True
        return False

    def restart_if_exited(self) -> int | None:
        """Start again an incarnation that exited on its own (as a supervisor would); its exit code."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.exits.append(code)
        self.start()
        return code

    def kill(self) -> None:
        """SIGKILL the running incarnation by its pid and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the archiver finishes its batch and exits 0), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def batch_totals(self) -> BatchTotals:
        """Batches, rows archived and duplicates over every incarnation's batch lines."""
        batches = archived = duplicates = 0
        for path in self.logs:
            with contextlib.suppress(OSError):
                for match in _BATCH_LINE.finditer(path.read_bytes()):
                    batches += 1
                    archived += int(match.group(2))
                    duplicates += int(match.group(3))
        return BatchTotals(batches, archived, duplicates)

    def final_counts(self) -> dict[str, int]:
        """The counts of the last incarnation's ``archiver stopped`` line (after a SIGTERM)."""
        with contextlib.suppress(OSError):
            match = _STOPPED_LINE.search(self.log_path.read_bytes())
            if match:
                pairs = (item.split(b"=", 1) for item in match.group(1).split())
                return {k.decode(): int(v) for k, v in pairs}
        return {}

    def tracebacks(self) -> int:
        """How many tracebacks the incarnations logged."""
        total = 0
        for path in self.logs:
            with contextlib.suppress(OSError):
                total += path.read_bytes().count(b"Traceback")
        return total


class LogTail:
    """New bytes of a log file, for reacting to a line as soon as it is written."""

    def __init__(self, path: Path, start: int | None = None) -> None:
        self.path = path
        self.offset = start if start is not None else path.stat().st_size if path.exists() else 0

    def read(self) -> bytes:
        """What was appended since the last read."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return b""
        self.offset += len(data)
        return data

    async def wait_for(self, needle: bytes, timeout: float, interval: float = 0.002) -> bool:
        """Wait until ``needle`` is appended; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        carry = b""
        while time.monotonic() < deadline:
            data = carry + self.read()
            if needle in data:
                return True
            carry = data[-len(needle) :]
            await asyncio.sleep(interval)
        return False


# ---------------------------------------------------------------- the workload


@dataclass
class OpRecord:
    """One operation of the workload: the revision its last acknowledged update returned."""

    op_id: str
    revision: int
    finished_at: float
    """wall-clock time (time.time()) the finishing update was acknowledged"""


@dataclass
class Workload:
    """Operations run through every stage, paced over ``seconds``, at most ``concurrency`` at once.

    Every operation is created and then started and finished stage by stage: ten
    updates, the last one finishes it. Bounded: at most ``count`` operations, none
    started after ``seconds * 2 + 60`` seconds.
    """

    client: Client
    count: int
    seconds: float
    concurrency: int = 32
    burst: int = 1
    """operations started together (the same average rate, in bursts: a backlog for the archiver)"""
    on_done: Callable[[OpRecord], None] | None = None
    """called with each finished operation instead of keeping it in ``done`` (a long soak's service)"""
    done: dict[str, OpRecord] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0

    async def run(self) -> None:
        """Run the workload to its end."""
        sem = asyncio.Semaphore(self.concurrency)
        start = time.monotonic()
        deadline = start + self.seconds * 2 + 60
        interval = self.seconds / self.count if self.count else 0.0

        async def one(i: int) -> None:
            async with sem:
                if time.monotonic() > deadline:
                    self.skipped += 1
                    return
                await self.one_operation(i)

        running: set[asyncio.Task[None]] = set()
        for i in range(self.count):
            delay = start + (i - i % self.burst) * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i))
            running.add(task)
            task.add_done_callback(running.discard)  # finished tasks are not kept
        await asyncio.gather(*running)

    async def one_operation(self, i: int) -> OpRecord | None:
        """Create one operation and run it to success; its record, or None after an error (recorded)."""
        try:
            op = await self.client.create(PIPELINE.name, metadata={"n": i})
            result = None
            for stage in STAGES:
                await self.client.start(op.id, stage, worker="robust")
                result = await self.client.succeed(op.id, stage, worker="robust")
            assert result is not None
            if not result.operation.done:
                self.errors.append(f"{op.id}: not finished after its last stage ({result.operation.status})")
                return None
            record = OpRecord(op.id, result.revision, time.time())
            if self.on_done is not None:
                self.on_done(record)
            else:
                self.done[op.id] = record
            return record
        except KvstateError as exc:
            self.errors.append(f"operation {i}: {type(exc).__name__}: {exc}")
            return None


# ---------------------------------------------------------------- checks


async def archived_revisions(database_url: str) -> tuple[dict[str, int], int]:
    """The archived revision of every id, and the number of rows (equal unless an id has two rows)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        exists = await conn.fetchval("SELECT to_regclass('archived_operations') IS NOT NULL")
        if not exists:
            return {}, 0
        records = await conn.fetch("SELECT id, revision FROM archived_operations")
    finally:
        await conn.close()
    return {r["id"]: int(r["revision"]) for r in records}, len(records)


@dataclass(frozen=True)
class BucketState:
    """The last stored entry of every operation key: a value at a revision, or a removal marker."""

    live: dict[str, int]
    removed: dict[str, int]
    """id -> the marker's revision"""


async def bucket_states(client: Client, attempts: int = 5, timeout: float = 30.0) -> BucketState:
    """Read the last entry of every operation key, markers included (the bucket keeps one revision).

    Retried: a scan's consumer can stall while keys are purged under it (SUBSTRATE.md).
    """
    for attempt in range(attempts):
        live: dict[str, int] = {}
        removed: dict[str, int] = {}
        try:
            async with asyncio.timeout(timeout):
                async for entry in client._open_store().scan(OPERATION_PREFIX + "*", history=True, headers_only=True):
                    op_id = operation_id_from_key(entry.key)
                    if op_id is None:
                        continue
                    if entry.deleted:
                        live.pop(op_id, None)
                        removed[op_id] = entry.revision
                    else:
                        removed.pop(op_id, None)
                        live[op_id] = entry.revision
            return BucketState(live, removed)
        except (TimeoutError, KvstateError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


@contextlib.asynccontextmanager
async def opened_client(settings: Settings) -> AsyncIterator[Client]:
    """A client on the scenario's bucket, creating it with the scenario pipeline."""
    async with Client(settings, create_bucket=True, name="robust-workload") as client:
        await client.set_pipeline(PIPELINE)
        yield client
