"""The NATS scenarios: contended compare-and-set, node and leader crashes, pauses, watchers, timeouts.

Each one starts its own nodes (robustness.cluster), runs worker processes
(robustness.workload), injects its faults on a schedule seeded by ``options.seed``, then
heals and checks every recorded call against the stored chains (robustness.load.verify).
``options.seconds`` shortens the fault phase (the tests run them short); ``options.scale``
scales the writers and the write target.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

from kvstate import Client, Settings
from robustness.base import RunOptions, Scenario, ScenarioResult
from robustness.checker import check_watch
from robustness.cluster import Cluster, ClusterError
from robustness.history import History, Seen
from robustness.load import Load, acked_per_window, longest_gap, prepare_bucket, verify
from robustness.workload import open_client

__all__ = ["SCENARIOS"]

log = logging.getLogger("robustness")


def _writers(options: RunOptions, full: int = 32) -> int:
    return max(4, round(full * options.scale))


async def _mixed_load(options: RunOptions, settings: Settings, *, seconds: float) -> Load:
    """The load of the crash scenarios (T2-T5): two writer processes, each with CAS writers on
    shared keys and two writers running operations through their stages, for ``seconds``."""
    return await Load.start(
        settings,
        options.workdir / "load",
        processes=2,
        cas_tasks=_writers(options) // 2 - 2,
        ops_tasks=2,
        seconds=seconds,
        seed=options.seed,
    )


def _cluster(options: RunOptions, size: int = 3) -> Cluster:
    return Cluster(options.workdir / "nats", size=size, sync_interval=options.sync_interval)


def _finished(result: ScenarioResult, load: Load) -> None:
    codes = load.exit_codes
    result.require(all(code == 0 for code in codes), f"a worker process failed (exit codes {codes}; see its log)")


# --------------------------------------------------------------------------- T1


async def _contended(options: RunOptions, name: str, size: int) -> ScenarioResult:
    """32 writers in 2 processes on a hot window of 20 keys until 20,000 acknowledged updates."""
    result = ScenarioResult(name)
    writers = _writers(options)
    target = round(20_000 * options.scale)
    seconds = options.seconds if options.seconds is not None else 600.0
    async with _cluster(options, size) as cluster:
        settings = await prepare_bucket(cluster, "t1", result)
        started = time.monotonic()
        load = await Load.start(
            settings,
            options.workdir / "load",
            processes=2,
            cas_tasks=writers // 2,
            seconds=seconds,
            max_acked=target,
            seed=options.seed,
        )
        calls = await load.finish(within=seconds + 120)
        elapsed = time.monotonic() - started
        _finished(result, load)
        report, _ = await verify(cluster, settings, calls, result)
    figures = result.figures
    figures["writers"] = writers
    figures["seconds"] = round(elapsed, 1)
    figures["acked_per_s"] = round(report.acked / elapsed, 1)
    result.require(int(figures["conflicts"]) > 0, "no conflict: the hot window was not contended")
    result.require(
        int(figures["conflicts_without_code"]) == 0, "a ConflictError without 10071/10164 on its cause chain"
    )
    if size > 1:
        result.require(int(figures["conflicts_10071"]) > 0, "no conflict with code 10071 on R3")
        result.require(int(figures["conflicts_10164"]) > 0, "no conflict with code 10164 on R3")
    if options.seconds is None:
        result.require(report.acked >= target, f"{report.acked} acknowledged updates, fewer than {target}")
    return result


async def t1_r1(options: RunOptions) -> ScenarioResult:
    """T1 on a single node (R1)."""
    return await _contended(options, "T1-R1", 1)


async def t1_r3(options: RunOptions) -> ScenarioResult:
    """T1 on three nodes (R3): both conflict codes must appear."""
    return await _contended(options, "T1-R3", 3)


# --------------------------------------------------------------------------- T2, T3


async def _crashes(options: RunOptions, name: str, *, leader: bool) -> ScenarioResult:
    """T1's load while a node (T2: a random one; T3: the stream leader) is SIGKILLed and restarted."""
    result = ScenarioResult(name)
    rng = random.Random(options.seed)
    period, down = (20.0, 2.0) if leader else (10.0, 2.0)
    phase = options.seconds if options.seconds is not None else 120.0  # T2: 12 kills, T3: 6
    kills = max(1, int(phase // period))
    kill_times: list[float] = []
    last_restart = 0.0
    async with _cluster(options) as cluster:
        settings = await prepare_bucket(cluster, name.lower(), result)
        stream = f"KV_{settings.bucket}"
        load = await _mixed_load(options, settings, seconds=kills * period + 5)
        start = time.monotonic()
        for i in range(kills):
            await _sleep_until(start + i * period + period / 2)
            victim = await cluster.stream_leader(stream) if leader else cluster.nodes[rng.randrange(3)].name
            kill_times.append(time.monotonic())
            cluster.kill(victim)
            await asyncio.sleep(down)
            await cluster.restart(victim)
            last_restart = time.monotonic()
        end = start + kills * period
        await _sleep_until(end)
        calls = await load.finish(within=120)
        _finished(result, load)
        await verify(cluster, settings, calls, result, since=last_restart, equal_within=30.0, bucket_errors_fail=True)
    windows = acked_per_window(calls, start, end, 15.0)
    result.figures["kills"] = kills
    result.figures["min_acked_per_15s"] = min(windows)
    result.require(min(windows) > 0, f"a 15 s window without an acknowledged write: {windows}")
    if leader:
        gaps = [longest_gap(calls, k, min(k + period, end)) for k in kill_times]
        result.figures["max_write_gap_s"] = round(max(gaps), 1)
        result.figures["write_gaps_s"] = " ".join(f"{gap:.1f}" for gap in gaps)
        result.require(max(gaps) <= 12.0, f"a write gap after a leader kill over 12 s: {gaps}")
    return result


async def t2(options: RunOptions) -> ScenarioResult:
    """A random node SIGKILLed every 10 s, back after 2 s."""
    return await _crashes(options, "T2", leader=False)


async def t3(options: RunOptions) -> ScenarioResult:
    """The stream leader SIGKILLed every 20 s, back after 2 s."""
    return await _crashes(options, "T3", leader=True)


# --------------------------------------------------------------------------- T4


async def t4(options: RunOptions) -> ScenarioResult:
    """The stream leader SIGSTOPped for 15 s, 5 times: nothing lost, the old leader steps down."""
    result = ScenarioResult("T4")
    pause, settle = 15.0, 6.0
    cycles = 5 if options.seconds is None else max(1, int(options.seconds // (pause + settle)))
    stepdowns: list[float] = []
    async with _cluster(options) as cluster:
        settings = await prepare_bucket(cluster, "t4", result)
        stream = f"KV_{settings.bucket}"
        load = await _mixed_load(options, settings, seconds=cycles * (pause + settle + 3) + 5)
        for _ in range(cycles):
            await asyncio.sleep(2.0)
            old = await cluster.stream_leader(stream)
            cluster.pause(old)
            await asyncio.sleep(pause)
            cluster.resume(old)
            resumed = time.monotonic()
            stepped = await _stepped_down(cluster, stream, old, within=20.0)
            stepdowns.append(time.monotonic() - resumed if stepped else float("inf"))
            await asyncio.sleep(settle)
        calls = await load.finish(within=120)
        _finished(result, load)
        await verify(cluster, settings, calls, result)
    result.figures["pauses"] = cycles
    result.figures["stepdown_after_resume_s"] = " ".join(f"{s:.1f}" for s in stepdowns)
    result.require(all(s != float("inf") for s in stepdowns), f"the old leader did not step down: {stepdowns}")
    return result


async def _stepped_down(cluster: Cluster, stream: str, old: str, *, within: float) -> bool:
    """True once the resumed ``old`` leader names another node as leader, as does every node."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        states = await cluster.stream_states(stream)
        view = states.get(old)
        leaders = {s.leader for s in states.values() if s is not None}
        if view is not None and view.leader not in (None, old) and len(leaders) == 1:
            return True
        await asyncio.sleep(0.2)
    return False


# --------------------------------------------------------------------------- T5


async def t5(options: RunOptions) -> ScenarioResult:
    """The whole cluster SIGKILLed 4 times under load: nothing acknowledged is lost."""
    result = ScenarioResult("T5")
    period = 20.0
    crashes = 4 if options.seconds is None else max(1, int(options.seconds // period))
    recoveries: list[float] = []
    async with _cluster(options) as cluster:
        settings = await prepare_bucket(cluster, "t5", result)
        stream = f"KV_{settings.bucket}"
        load = await _mixed_load(options, settings, seconds=crashes * period + 5)
        start = time.monotonic()
        for i in range(crashes):
            await _sleep_until(start + i * period + 8.0)
            cluster.kill_all()
            killed = time.monotonic()
            await asyncio.sleep(2.0)
            await cluster.restart_all()
            try:
                await cluster.stream_leader(stream, timeout=60)
                recoveries.append(time.monotonic() - killed)
            except ClusterError as exc:
                result.require(False, f"no stream leader after a whole-cluster crash: {exc}")
        calls = await load.finish(within=180)
        _finished(result, load)
        await verify(cluster, settings, calls, result, equal_within=60.0)
    result.figures["crashes"] = crashes
    result.figures["leader_back_after_s"] = " ".join(f"{r:.1f}" for r in recoveries)
    return result


# --------------------------------------------------------------------------- T10


async def t10(options: RunOptions) -> ScenarioResult:
    """Two watchers on different nodes at about 20 updates/s while each node is killed in turn."""
    result = ScenarioResult("T10")
    period, down = 15.0, 2.0
    kills = 3 if options.seconds is None else max(1, min(3, int(options.seconds // period)))
    period = period if options.seconds is None else min(period, options.seconds)
    history = History(options.workdir / "watch.calls")
    async with _cluster(options) as cluster:
        settings = await prepare_bucket(cluster, "t10", result)
        observer = await open_client(settings, name="observer")
        watchers = [
            await open_client(cluster.settings(settings.bucket, history=64, on=i), name=f"watch{i}") for i in (0, 1)
        ]
        try:
            after = (await observer._open_store().info()).state.last_seq
            tasks = [asyncio.create_task(_watch(client, f"w{i}", history)) for i, client in enumerate(watchers)]
            await asyncio.sleep(1.0)
            load = await Load.start(
                settings,
                options.workdir / "load",
                processes=1,
                cas_tasks=0,
                ops_tasks=2,
                ops_pause=0.085,  # two writers at about 10 calls/s each
                seconds=kills * period + 5,
                seed=options.seed,
            )
            start = time.monotonic()
            kill_times = []
            for i in range(kills):
                await _sleep_until(start + i * period + 3.0)
                kill_times.append(time.monotonic())
                log.warning("T10: killing %s", cluster.nodes[i].name)
                cluster.kill(i)
                await asyncio.sleep(down)
                await cluster.restart(i)
            end = start + kills * period
            await _sleep_until(end)
            calls = await load.finish(within=120)
            _finished(result, load)
            await cluster.wait_streams_equal(f"KV_{settings.bucket}", timeout=60)
            last = (await observer._open_store().info()).state.last_seq
            caught_up = await _caught_up(history, last, within=30.0)
            result.require(caught_up, f"a watcher did not reach the last revision {last} within 30 s")
            # A consumer a watcher left behind when it resubscribed lingers until the server's
            # inactivity threshold (60 s) removes it: at full length wait for that, then count
            # exactly; a short run waits 20 s and only requires a consumer for each watcher.
            waited = time.monotonic()
            full = options.seconds is None
            live = await _consumers(observer, want=2, within=90.0 if full else 20.0)
            result.figures["consumers_with_2_watchers"] = live
            result.figures["consumers_back_to_2_after_s"] = round(time.monotonic() - waited, 1)
            result.require(live == 2 if full else live >= 2, f"{live} consumers on the stream with 2 live watchers")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(client.close() for client in watchers))
            watchers = []
            await asyncio.sleep(2.0)
            result.figures["consumers_2s_after_watchers_closed"] = await _consumers(observer, want=0, within=0)
            _, stored = await verify(cluster, settings, calls, result, equal_within=60.0)
            truth = stored.revisions("op.")
            last_ack = max((c.ret for c in calls if c.outcome == "ok"), default=end)
            acked_at = {(c.key, c.revision): c.ret for c in calls if c.result == "applied" and c.revision is not None}
            for name in ("w0", "w1"):
                seen = [s for s in history.seen if s.watcher == name]
                watch = check_watch(seen, truth, after=after, until=last)
                result.figures.update(watch.figures(name))
                result.require(watch.ok, f"watcher {name}: {watch.problems[:3]}")
                stalls = [_longest_silence(seen, k, min(k + 30.0, last_ack)) for k in kill_times]
                result.figures[f"{name}_longest_silence_s"] = round(max(stalls), 1)
                # Flowing again: each change delivered within 15 s of its acknowledgement (a
                # silence while no write is acknowledged is the writers', not the watcher's).
                lags = [s.at - acked_at[(s.key, s.revision)] for s in seen if (s.key, s.revision) in acked_at]
                result.figures[f"{name}_max_delivery_lag_s"] = round(max(lags, default=0.0), 2)
                result.require(bool(lags), f"watcher {name} delivered no acknowledged write")
                result.require(max(lags, default=0.0) <= 15.0, f"watcher {name} delivered a change over 15 s late")
            result.figures["longest_write_gap_s"] = round(
                max(longest_gap(calls, k, min(k + 30.0, last_ack)) for k in kill_times), 1
            )
            result.figures["kills"] = kills
            during = sum(1 for c in calls if c.outcome == "ok" and start <= c.ret <= end)
            result.figures["updates_per_s"] = round(during / max(1.0, end - start), 1)
        finally:
            for client in watchers:
                await client.close()
            await observer.close()
    history.close()
    return result


async def _watch(client: Client, name: str, history: History) -> None:
    async with client.watch(include_existing=False) as changes:
        async for change in changes:
            history.add(Seen(watcher=name, key=f"op.{change.op_id}", revision=change.revision, at=time.monotonic()))


async def _caught_up(history: History, last: int, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        tops = {s.watcher: s.revision for s in history.seen}
        if len(tops) == 2 and all(top >= last for top in tops.values()):
            return True
        await asyncio.sleep(0.2)
    return False


def _longest_silence(seen: list[Seen], start: float, end: float) -> float:
    times = sorted(s.at for s in seen if start <= s.at <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(edges))


async def _consumers(client: Client, *, want: int, within: float) -> int:
    """The number of consumers on the client's bucket (CONSUMER.LIST) once it is ``want``,
    or whatever it is after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            count = len(await client._open_store().js.consumers_info(client._open_store().config.stream))
        except Exception:  # noqa: BLE001 - an answer that does not come is a count we do not know
            count = -1
        if count == want or time.monotonic() >= deadline:
            return count
        await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- T11


async def t11(options: RunOptions) -> ScenarioResult:
    """Client timeout 0.25 s while the leader is SIGSTOPped for 3 s, 20 times: every timed-out
    write is resolved and no transition is applied twice."""
    result = ScenarioResult("T11")
    pause, gap = 3.0, 2.0
    pauses = 20 if options.seconds is None else max(1, int(options.seconds // (pause + gap)))
    async with _cluster(options) as cluster:
        settings = await prepare_bucket(cluster, "t11", result)
        stream = f"KV_{settings.bucket}"
        writers = _writers(options, 16)
        load = await Load.start(
            settings,
            options.workdir / "load",
            processes=2,
            cas_tasks=writers // 4,
            ops_tasks=writers // 4,
            timeout=0.25,
            seconds=pauses * (pause + gap) + 5,
            seed=options.seed,
        )
        for _ in range(pauses):
            await asyncio.sleep(gap)
            try:
                leader = await cluster.stream_leader(stream, timeout=15)
            except ClusterError:
                continue
            cluster.pause(leader)
            await asyncio.sleep(pause)
            cluster.resume(leader)
        calls = await load.finish(within=120)
        _finished(result, load)
        report, _ = await verify(cluster, settings, calls, result, equal_within=60.0)
    result.figures["pauses"] = pauses
    result.require(report.ambiguous > 0, "no write timed out: the scenario did not test resolution")
    result.require(
        report.ambiguous == report.ambiguous_applied + report.ambiguous_absent, "an ambiguous write left unresolved"
    )
    return result


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


SCENARIOS: dict[str, Scenario] = {
    "T1-R1": t1_r1,
    "T1-R3": t1_r3,
    "T2": t2,
    "T3": t3,
    "T4": t4,
    "T5": t5,
    "T10": t10,
    "T11": t11,
}
