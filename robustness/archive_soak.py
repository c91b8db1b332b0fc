"""T20: a soak at a fixed rate on a three-replica bucket, everything running as it would in production.

A three-node cluster (robustness/cluster.py), PostgreSQL with ``synchronous_commit = off``
(as ``kvstate up``), the archiver (``python -m archiver``), the dashboard (``python -m
dashboard``) with one SSE client connected to ``/events`` the whole time, and a service
process (robustness/archive_service.py) running operations at a fixed rate. Every
``sample_every`` seconds the resident memory of the service, the archiver and the
dashboard and the bucket stream's consumer count are sampled.

Pass figures: memory flat (each process within 10 % of its first sample after the
warm-up), the consumer count constant (a sweep's short-lived consumer aside), archive lag
p99 < 2 s (from an operation's ``finished_at`` to the moment a poll of PostgreSQL every
0.1 s first sees its committed row), and lost 0 (every finished operation archived at its
last revision).

Full length 30 minutes with a 5 minute warm-up; ``options.seconds`` scales both
(warm-up a sixth of the run). Run by command only: ``python -m robustness T20``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from devstack.servers import PostgresServer, free_port, parent_death_signal
from kvstate import Client, KvstateError, Settings
from robustness.archive_harness import (
    ArchiverConfig,
    ArchiverProcess,
    archived_revisions,
    create_database,
    opened_client,
    percentile,
)
from robustness.base import RunOptions, ScenarioResult
from robustness.cluster import Cluster

__all__ = ["soak"]

BUCKET = "operations"
FULL_SECONDS = 1800.0
FULL_WARMUP = 300.0


def rss_kib(pid: int | None) -> int | None:
    """Resident memory of ``pid`` in KiB (None when it is gone)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _child(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=parent_death_signal(signal.SIGKILL),
        )


def _end(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL: by the child's pid; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


async def _http_ok(port: int, path: str) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.read(64), 5.0)
        return head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class _SseClient:
    """One browser's live-update stream: GET /events, read for ever, reconnect when it ends (bounded)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events = 0
        self.connects = 0
        self.bytes = 0

    async def run(self, until: float) -> None:
        while time.monotonic() < until and self.connects < 1000:
            self.connects += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(1.0)
                continue
            try:
                request = "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
                writer.write(request.encode())
                await writer.drain()
                while time.monotonic() < until:
                    try:
                        chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    self.bytes += len(chunk)
                    self.events += chunk.count(b"event:")
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.5)


async def _create_bucket(settings: Settings, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with opened_client(settings):
                return
        except KvstateError:  # the cluster is still electing its leaders
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _service_output(out: Path) -> tuple[dict[str, int], list[str]]:
    """The service's finished operations (id -> last revision) and its errors."""
    done: dict[str, int] = {}
    errors: list[str] = []
    with contextlib.suppress(OSError):
        for line in out.read_text().splitlines():
            if line.startswith("error "):
                errors.append(line[6:])
                continue
            op_id, revision = line.split()
            done[op_id] = int(revision)
    return done, errors


class _RowWatch:
    """Notes when each row first exists (committed), polling PostgreSQL every ``interval`` seconds.

    The lag of a row is that moment minus the operation's ``finished_at``: an upper bound,
    by at most one interval, of the time from finishing to a committed row.
    """

    def __init__(self, dsn: str, interval: float = 0.1) -> None:
        self.dsn = dsn
        self.interval = interval
        self.lags: list[float] = []
        self._seen: set[str] = set()

    async def run(self, until: float) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            while time.monotonic() < until:
                records = await conn.fetch(
                    "SELECT id, extract(epoch FROM finished_at)::float8 AS finished FROM archived_operations "
                    "WHERE archived_at > now() - interval '60 seconds'"
                )
                now = time.time()
                for r in records:
                    if r["id"] not in self._seen:
                        self._seen.add(r["id"])
                        self.lags.append(now - float(r["finished"]))
                await asyncio.sleep(self.interval)
        finally:
            await conn.close()


def _growth(samples: list[int]) -> float:
    """Largest rise over the first sample, as a fraction of it (0 with fewer than two samples)."""
    if len(samples) < 2 or samples[0] <= 0:
        return 0.0
    return (max(samples) - samples[0]) / samples[0]


async def soak(options: RunOptions) -> ScenarioResult:
    """T20: the soak; see the module docstring."""
    result = ScenarioResult("T20")
    seconds = options.seconds if options.seconds is not None else FULL_SECONDS
    warmup = FULL_WARMUP if options.seconds is None else seconds / 6
    sample_every = 10.0 if seconds >= 600 else 2.0
    rate = 20.0 * options.scale
    grace = min(120.0, warmup / 2)  # the bucket's size is steady before the warm-up ends
    stats_window = min(900.0, warmup)  # so is the dashboard's window of figures
    config = ArchiverConfig(grace_period=grace, sweep_interval=60.0)
    result.figures.update(
        seconds=seconds,
        warmup_s=round(warmup, 1),
        rate_ops_per_s=rate,
        sample_every_s=sample_every,
        replicas=3,
        dashboard_stats_window_s=stats_window,
        **config.figures(),
    )
    workdir = options.workdir
    rss: dict[str, list[tuple[float, int]]] = {"service": [], "archiver": [], "dashboard": []}
    consumers: list[tuple[float, int]] = []
    async with Cluster(workdir / "nats", size=3, sync_interval=options.sync_interval) as cluster:
        pg = PostgresServer(workdir / "pg", settings={"synchronous_commit": "off"}, die_with_parent=True)
        pg.start()
        dashboard: subprocess.Popen[bytes] | None = None
        service: subprocess.Popen[bytes] | None = None
        archiver: ArchiverProcess | None = None
        try:
            dsn = await create_database(pg)
            settings = cluster.settings(BUCKET, replicas=3)
            await _create_bucket(settings)
            archiver = ArchiverProcess(config, settings, dsn, workdir / "archiver")
            archiver.start()
            if not await archiver.wait_started():
                raise RuntimeError(f"the archiver did not start: see {archiver.log_path}")
            port = free_port()
            env = config.environment(settings.nats_url, BUCKET, dsn, 0)
            env["DASHBOARD_STATS_WINDOW"] = str(stats_window)
            dashboard = _child(
                [sys.executable, "-m", "dashboard", "--port", str(port), "--log-level", "warning"],
                env,
                workdir / "dashboard.log",
            )
            deadline = time.monotonic() + 60
            while not await _http_ok(port, "/healthz"):
                if time.monotonic() > deadline or dashboard.poll() is not None:
                    raise RuntimeError(f"the dashboard did not come up: see {workdir / 'dashboard.log'}")
                await asyncio.sleep(0.5)
            started = time.monotonic()
            sse = _SseClient(port)
            sse_task = asyncio.create_task(sse.run(started + seconds + 90))
            row_watch = _RowWatch(dsn)
            watch_task = asyncio.create_task(row_watch.run(started + seconds * 2 + 200))
            out = workdir / "service.out"
            rest = [str(seconds), str(out)]
            service = _child(
                [sys.executable, "-m", "robustness.archive_service", settings.nats_url, BUCKET, str(rate), *rest],
                env,
                workdir / "service.log",
            )
            async with Client(settings, name="robust-soak") as client:
                stream = client._open_store().config.stream
                end = started + seconds * 2 + 120
                while time.monotonic() < end and service.poll() is None:
                    at = time.monotonic() - started
                    for name, pid in (
                        ("service", service.pid),
                        ("archiver", archiver.pid),
                        ("dashboard", dashboard.pid),
                    ):
                        kib = rss_kib(pid)
                        if kib is not None:
                            rss[name].append((at, kib))
                    with contextlib.suppress(Exception):  # a busy cluster: the next sample counts
                        info = await client._open_store().js.stream_info(stream)
                        consumers.append((at, int(info.state.consumer_count)))
                    await asyncio.sleep(sample_every)
                service_exit = _end(service, timeout=60.0)
                done, errors = _service_output(out)
                drain_deadline = time.monotonic() + 60
                rows: dict[str, int] = {}
                while time.monotonic() < drain_deadline:
                    rows, _ = await archived_revisions(dsn)
                    if all(rows.get(i) == r for i, r in done.items()):
                        break
                    await asyncio.sleep(1.0)
                watch_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch_task
                lags = row_watch.lags
            sse_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sse_task
            dashboard_alive = dashboard.poll() is None
            archiver_alive = archiver.pid is not None
        finally:
            _end(service)
            _end(dashboard)
            if archiver is not None:
                archiver.terminate()
            pg.stop()
    lost = [i for i, r in done.items() if rows.get(i) != r]
    after = {name: [kib for at, kib in samples if at >= warmup] for name, samples in rss.items()}
    counts_after = [n for at, n in consumers if at >= warmup]
    baseline = max(set(counts_after), key=counts_after.count) if counts_after else 0
    for name, samples in after.items():
        result.figures[f"rss_{name}_mib_at_warmup"] = round(samples[0] / 1024, 1) if samples else "-"
        result.figures[f"rss_{name}_mib_max"] = round(max(samples) / 1024, 1) if samples else "-"
        result.figures[f"rss_{name}_growth_pct"] = round(100 * _growth(samples), 1)
    result.figures.update(
        operations=len(done),
        service_errors=len(errors),
        service_exit=service_exit if service_exit is not None else "-",
        rows=len(rows),
        lost=len(lost),
        archive_lag_s_p50=round(percentile(lags, 0.5), 3),
        archive_lag_s_p99=round(percentile(lags, 0.99), 3),
        archive_lag_s_max=round(max(lags, default=0.0), 3),
        consumers_baseline=baseline,
        consumers_min=min(counts_after, default=0),
        consumers_max=max(counts_after, default=0),
        consumer_samples=len(counts_after),
        sse_events=sse.events,
        sse_bytes=sse.bytes,
        sse_connects=sse.connects,
        archiver_tracebacks=archiver.tracebacks() if archiver is not None else 0,
    )
    result.require(service_exit == 0, f"the service exited with {service_exit}")
    result.require(not errors, f"service errors: {errors[:3]}")
    result.require(not lost, f"lost {len(lost)} finished operations (e.g. {lost[:3]})")
    for name, samples in after.items():
        result.require(len(samples) >= 2, f"too few memory samples of the {name} after the warm-up")
        result.require(_growth(samples) <= 0.10, f"{name} memory grew {100 * _growth(samples):.1f} % after warm-up")
    result.require(
        bool(counts_after) and min(counts_after) == baseline and max(counts_after) <= baseline + 1,
        f"consumer count not constant: {min(counts_after, default=0)}..{max(counts_after, default=0)}",
    )
    result.require(percentile(lags, 0.99) < 2.0, f"archive lag p99 {percentile(lags, 0.99):.3f} s (>= 2 s)")
    # the dashboard ends a stream after 300 s (EventSource reconnects): one connection per 300 s
    result.require(
        sse.events > 0 and sse.connects <= seconds / 300 + 2, f"SSE: {sse.connects} connections, {sse.events} events"
    )
    result.require(dashboard_alive and archiver_alive, "the dashboard or the archiver died during the soak")
    return result
