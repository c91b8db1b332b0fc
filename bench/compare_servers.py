"""Servers and meters for the comparison: fresh server pairs, the baseline and archiver processes,
PostgreSQL counters.

PostgreSQL CPU time is read from /proc: utime + stime of the postmaster and of every
live child, plus cutime + cstime (the time of children that already exited and were
reaped, such as pool connections closed at the end), all in clock ticks. WAL is the
distance between two ``pg_current_wal_insert_lsn()`` readings: with
``synchronous_commit = off`` the write position (``pg_current_wal_lsn()``) lags behind
by what the WAL writer has not written out yet, up to about 1 MB.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from devstack.servers import NatsServer, PostgresServer, free_port

__all__ = [
    "PAIRS",
    "ArchiverProcess",
    "BaselineProcess",
    "DurabilityPair",
    "PgMeter",
    "PgUsage",
    "process_tree_cpu",
]

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class DurabilityPair:
    """Equal durability on both sides: what nats-server and PostgreSQL promise about a power loss."""

    name: str
    sync_interval: str
    synchronous_commit: str
    meaning: str


PAIRS = {
    "strict": DurabilityPair(
        "strict", "always", "on", "every acknowledged write is on disk (fsync per write / per commit)"
    ),
    "fast": DurabilityPair(
        "fast",
        "1s",
        "off",
        "a nats-server crash loses nothing acknowledged, a PostgreSQL crash up to ~0.6 s of commits; "
        "a power loss may lose the last ~1 s",
    ),
}


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17
    return int(fields[1]), sum(int(v) for v in fields[11:15])


def process_tree_cpu(root: int) -> float:
    """CPU seconds used by ``root`` and all its descendants so far (reaped ones included)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        found = _stat(int(entry.name))
        if found is None:
            continue
        ppid, used = found
        children.setdefault(ppid, []).append(int(entry.name))
        ticks[int(entry.name)] = used
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / _TICKS


@dataclass(frozen=True, slots=True)
class PgUsage:
    """What PostgreSQL spent between two readings."""

    wal_bytes: int
    cpu_seconds: float
    rows_inserted: int
    rows_updated: int
    rows_hot_updated: int
    rows_deleted: int
    dead_tuples_now: int
    autovacuums: int
    table_bytes: int

    @property
    def dead_tuples_made(self) -> int:
        """Row versions made dead: every UPDATE and DELETE leaves one behind."""
        return self.rows_updated + self.rows_deleted


class PgMeter:
    """Reads WAL position, CPU and table statistics of one cluster, before and after a phase."""

    def __init__(self, server: PostgresServer, database: str = "postgres") -> None:
        self._server = server
        self._database = database
        self._wal_start = "0/0"
        self._cpu_start = 0.0

    @property
    def _pid(self) -> int:
        assert self._server.proc is not None
        return self._server.proc.pid

    async def _fetchrow(self, sql: str) -> asyncpg.Record:
        conn = await asyncpg.connect(self._server.dsn(self._database))
        try:
            row = await conn.fetchrow(sql)
        finally:
            await conn.close()
        assert row is not None
        return row

    async def start(self) -> None:
        """Remember the WAL insert position and CPU time now."""
        self._wal_start = str((await self._fetchrow("SELECT pg_current_wal_insert_lsn()::text AS lsn"))["lsn"])
        self._cpu_start = process_tree_cpu(self._pid)

    async def stop(self) -> PgUsage:
        """What was spent since ``start`` (call after the clients closed, so their statistics are flushed).

        The pending lists of GIN indexes (the archive's metadata index) are flushed first: the
        WAL and CPU they defer belong to the rows written since ``start``.
        """
        await self._fetchrow(
            "SELECT count(gin_clean_pending_list(c.oid::regclass)) AS n FROM pg_class c "
            "JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE a.amname = 'gin' AND c.relkind = 'i' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        )
        cpu = process_tree_cpu(self._pid) - self._cpu_start
        wal = await self._fetchrow(
            f"SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '{self._wal_start}')::bigint AS bytes"
        )
        stats = await self._fetchrow(
            """
            SELECT coalesce(sum(n_tup_ins), 0)::bigint AS ins, coalesce(sum(n_tup_upd), 0)::bigint AS upd,
                   coalesce(sum(n_tup_hot_upd), 0)::bigint AS hot, coalesce(sum(n_tup_del), 0)::bigint AS del,
                   coalesce(sum(n_dead_tup), 0)::bigint AS dead, coalesce(sum(autovacuum_count), 0)::bigint AS av,
                   coalesce(sum(pg_total_relation_size(relid)), 0)::bigint AS size
            FROM pg_stat_user_tables
            """
        )
        return PgUsage(
            wal_bytes=int(wal["bytes"]),
            cpu_seconds=cpu,
            rows_inserted=stats["ins"],
            rows_updated=stats["upd"],
            rows_hot_updated=stats["hot"],
            rows_deleted=stats["del"],
            dead_tuples_now=stats["dead"],
            autovacuums=stats["av"],
            table_bytes=stats["size"],
        )


def start_postgres(directory: Path, pair: DurabilityPair) -> PostgresServer:
    """A fresh cluster with the pair's ``synchronous_commit`` (fsync stays on)."""
    return PostgresServer(
        directory, settings={"synchronous_commit": pair.synchronous_commit, "max_connections": "100"}
    ).start()


def start_nats(directory: Path, pair: DurabilityPair) -> NatsServer:
    """A fresh nats-server with the pair's ``sync_interval``."""
    return NatsServer(directory, sync_interval=pair.sync_interval).start()


class BaselineProcess:
    """The baseline service under uvicorn as a child process on a free loopback port."""

    def __init__(self, database_url: str, log_path: Path, *, pool_size: int = 20, workers: int = 1) -> None:
        self.port = free_port()
        self._env = {**os.environ, "DATABASE_URL": database_url, "BASELINE_POOL_SIZE": str(pool_size)}
        self._workers = workers
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        """Start the service and wait until /health answers."""
        argv = [sys.executable, "-m", "bench.baseline", "--port", str(self.port), "--workers", str(self._workers)]
        with open(self._log_path, "ab") as log:  # noqa: ASYNC230 - once, before the measured phase
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not a call to await
                argv, env=self._env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if (await http.get("/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the baseline service did not start; log:\n{self._log_path.read_text(errors='replace')}")

    def cpu_seconds(self) -> float:
        """CPU seconds of the service process and its workers so far."""
        return process_tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        """SIGTERM (uvicorn closes the pool in the lifespan), SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class ArchiverProcess:
    """``python -m archiver`` as a child process, as it runs in production (not in burst mode).

    It removes each operation from the bucket as soon as it is archived
    (``ARCHIVER_GRACE_PERIOD=0``) and serves no metrics (``ARCHIVER_METRICS_PORT=0``). Its log
    goes to a file. The caller stops it by pid in a ``finally``, whatever happened.
    """

    READY = "archiver started"
    """logged once connected, migrated and consuming"""
    STOPPED = "archiver stopped: "
    """logged on a clean stop, followed by the run's counts as key=value pairs"""

    def __init__(self, nats_url: str, bucket: str, database_url: str, log_path: Path) -> None:
        self._env = {
            **os.environ,
            "NATS_URL": nats_url,
            "KVSTATE_BUCKET": bucket,
            "DATABASE_URL": database_url,
            "ARCHIVER_GRACE_PERIOD": "0",
            "ARCHIVER_METRICS_PORT": "0",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the archiver's log."""
        return "\n".join(self._log().splitlines()[-lines:])

    async def start(self, timeout: float = 60.0) -> None:
        """Start the archiver and wait (at most ``timeout`` seconds) until it consumes the bucket."""
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - once, before the measured phase
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not a call to await
                [sys.executable, "-m", "archiver"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.READY in self._log():
                return
            await asyncio.sleep(0.1)
        code = self.proc.poll()
        self.stop()
        state = f"exited with {code}" if code is not None else f"not ready after {timeout:.0f} s"
        raise RuntimeError(f"the archiver {state}; log:\n{self.log_tail()}")

    def check(self) -> None:
        """Raise if the archiver process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the archiver exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """CPU seconds of the archiver process so far."""
        return process_tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the archiver finishes its batch and logs its counts), SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(grace)

    def counts(self) -> dict[str, int] | None:
        """The counts the archiver logged when it stopped (None if it did not stop cleanly)."""
        for line in reversed(self._log().splitlines()):
            if self.STOPPED in line:
                pairs = (item.partition("=") for item in line.split(self.STOPPED, 1)[1].split())
                return {key: int(value) for key, _, value in pairs if value.isdigit()}
        return None


def json_ready(value: Any) -> Any:
    """Dataclass-ish values to plain JSON types (for the results file)."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: json_ready(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
