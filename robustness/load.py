"""What every NATS scenario does around its faults: a bucket, worker processes, the final check.

    settings = await prepare_bucket(cluster, "t2", result)
    load = await Load.start(cluster, settings, workdir, processes=2, cas_tasks=16, seconds=130)
    ...  # faults
    calls = await load.finish()
    await verify(cluster, settings, calls, result)

``verify`` waits until every node holds the same stream, reads every stored revision back
and records the checker's figures and the pass figures every scenario shares: nothing
lost, invented, forked or applied twice; no BucketError reaching a caller; every config the
suite wrote states ``sync_interval``; no bucket with ``persist_mode: async``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvstate import KvstateError, Settings
from kvstate.model import EVENT_WINDOW
from robustness.base import ScenarioResult
from robustness.checker import CheckReport, check
from robustness.cluster import Cluster, ClusterError
from robustness.history import Call, load_calls
from robustness.truth import StoredState, persist_problems, read_stored, repeated_transitions
from robustness.workload import PIPELINE, WorkerSpec, open_client, spawn_worker

__all__ = ["Load", "acked_per_window", "call_figures", "longest_gap", "prepare_bucket", "verify"]


async def prepare_bucket(cluster: Cluster, bucket: str, result: ScenarioResult, *, history: int = 64) -> Settings:
    """Create ``bucket`` (replicated on every node, ``history`` revisions per key) holding the pipeline."""
    settings = cluster.settings(bucket, history=history)
    deadline = time.monotonic() + 60
    while True:
        client = await open_client(settings, name="setup", create=True)
        try:
            await client.set_pipeline(PIPELINE)
            info = await client._open_store().info()
            break
        except KvstateError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
        finally:
            await client.close()
    problems = persist_problems(info.config)
    modes = await cluster.persist_modes(info.config.name or "")
    problems += [f"{node} reports persist_mode async" for node, mode in modes.items() if mode == "async"]
    result.require(not problems, "; ".join(problems))
    result.require(cluster.configs_state_sync_interval(), "a nats-server config the suite wrote lacks sync_interval")
    result.figures["sync_interval"] = cluster.sync_interval
    result.figures["replicas"] = cluster.size
    return settings


@dataclass
class Load:
    """Worker processes running robustness.workload against one bucket."""

    specs: list[WorkerSpec]
    procs: list[asyncio.subprocess.Process]
    started: float = field(default_factory=time.monotonic)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        workdir: Path,
        *,
        processes: int,
        cas_tasks: int,
        ops_tasks: int = 0,
        seconds: float,
        max_acked: int = 1_000_000,
        timeout: float = 5.0,
        seed: int = 0,
        ops_pause: float = 0.0,
        prefix: str = "p",
    ) -> Load:
        """Start ``processes`` workers, each with ``cas_tasks`` + ``ops_tasks`` tasks for ``seconds``."""
        specs = [
            WorkerSpec(
                name=f"{prefix}{i}",
                nats_url=settings.nats_url,
                bucket=settings.bucket,
                out=str(workdir / f"{prefix}{i}.calls"),
                replicas=settings.replicas,
                timeout=timeout,
                history=settings.history,
                cas_tasks=cas_tasks,
                ops_tasks=ops_tasks,
                seconds=seconds,
                max_acked=max(1, max_acked // processes),
                seed=seed * 100 + i,
                ops_pause=ops_pause,
            )
            for i in range(processes)
        ]
        procs = [await spawn_worker(spec, workdir) for spec in specs]
        return cls(specs, procs)

    async def finish(self, within: float = 120.0) -> list[Call]:
        """Wait for every worker (SIGKILL by pid one that overstays ``within``); their recorded calls."""
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), within)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return self.calls()

    def calls(self) -> list[Call]:
        """The calls recorded so far."""
        return load_calls(Path(spec.out) for spec in self.specs)

    @property
    def exit_codes(self) -> list[int | None]:
        return [proc.returncode for proc in self.procs]


def call_figures(calls: Sequence[Call]) -> dict[str, int]:
    """Counts by outcome, conflicts by raw code and errors by type."""
    writes = [c for c in calls if c.token is not None]
    figures = {
        "calls": len(writes),
        "acked": sum(c.outcome == "ok" for c in writes),
        "conflicts": sum(c.outcome == "conflict" for c in writes),
        "unknown": sum(c.outcome == "unknown" for c in writes),
        "errors": sum(c.outcome == "error" for c in calls),
        "bucket_errors": sum(c.error in ("BucketError", "BucketNotFound") for c in calls),
    }
    for outcome, count in Counter(c.result for c in writes if c.op != "cas" and c.result).items():
        figures[f"updates_{outcome}"] = count  # kvstate's applied / duplicate / stale
    codes = Counter(c.code for c in writes if c.outcome == "conflict")
    figures["conflicts_10071"] = codes.get(10071, 0)
    figures["conflicts_10164"] = codes.get(10164, 0)
    figures["conflicts_without_code"] = codes.get(None, 0)
    for (outcome, name), count in Counter(
        (c.outcome, c.error) for c in calls if c.outcome in ("error", "unknown")
    ).items():
        figures[f"{outcome}_{name}"] = count
    return figures


def acked_per_window(calls: Sequence[Call], start: float, end: float, window: float) -> list[int]:
    """Acknowledged writes returning in each ``window``-second slice of ``[start, end)``."""
    counts = [0] * max(1, int((end - start) // window))
    for call in calls:
        if call.outcome == "ok" and call.token is not None and start <= call.ret < start + window * len(counts):
            counts[int((call.ret - start) // window)] += 1
    return counts


def longest_gap(calls: Sequence[Call], start: float, end: float) -> float:
    """The longest stretch of ``[start, end]`` without an acknowledged write returning."""
    times = sorted(c.ret for c in calls if c.outcome == "ok" and c.token is not None and start <= c.ret <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(edges))


async def verify(
    cluster: Cluster,
    settings: Settings,
    calls: Sequence[Call],
    result: ScenarioResult,
    *,
    equal_within: float = 30.0,
    since: float | None = None,
    bucket_errors_fail: bool = False,
) -> tuple[CheckReport, StoredState]:
    """The shared end of a scenario: nodes equal, stored chains checked, shared pass figures recorded.

    ``bucket_errors_fail``: a BucketError reaching a caller fails the scenario (a leader
    election must not look like a missing bucket). ``since`` (a monotonic time, e.g. the
    last restart) makes ``equal_within`` count from it.
    """
    stream = f"KV_{settings.bucket}"
    budget = equal_within if since is None else max(1.0, equal_within - (time.monotonic() - since))
    try:
        waited = await cluster.wait_streams_equal(stream, timeout=budget)
        result.figures["nodes_equal_after_s"] = round(waited if since is None else time.monotonic() - since, 1)
    except ClusterError as exc:
        result.require(False, f"node states not equal within {equal_within:g}s: {exc}")
        await cluster.wait_streams_equal(stream, timeout=120)  # check the data anyway once they are
    client = await open_client(settings, name="checker")
    try:
        stored = await read_stored(client)
        persist = persist_problems((await client._open_store().info()).config)
    finally:
        await client.close()
    report = check(calls, stored.chains, window=EVENT_WINDOW)
    result.figures.update(call_figures(calls))
    result.figures.update({f"check_{name}": value for name, value in report.figures().items()})
    repeated = sum(repeated_transitions(op) for op in stored.operations.values())
    result.figures["operations"] = len(stored.operations)
    result.figures["repeated_transitions"] = repeated
    result.figures["unreadable_values"] = stored.unreadable
    result.require(report.lost == 0, f"{report.lost} acknowledged writes lost: {report.problems[:3]}")
    result.require(report.forks == 0, f"{report.forks} forks: {report.problems[:3]}")
    result.require(report.phantom == 0, f"{report.phantom} stored writes never attempted: {report.problems[:3]}")
    result.require(report.duplicates == 0, f"{report.duplicates} writes applied twice: {report.problems[:3]}")
    result.require(report.refused_but_stored == 0, f"{report.refused_but_stored} refused writes stored anyway")
    result.require(repeated == 0, f"{repeated} transitions applied twice")
    result.require(stored.unreadable == 0, f"{stored.unreadable} stored values unreadable")
    result.require(not persist, "; ".join(persist))
    bucket_errors = result.figures["bucket_errors"]
    result.require(
        not bucket_errors_fail or bucket_errors == 0,
        f"{bucket_errors} BucketError reached a caller (a leader election)",
    )
    result.require(report.acked > 0, "no write was acknowledged")
    return report, stored
