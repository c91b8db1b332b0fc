"""Update throughput of kvstate next to raw KV writes and PostgreSQL row locks, in one run.

    python -m bench.updates [--seconds 5] [--durability short|strict] [--json out.json]

Starts its own nats-server and PostgreSQL in a temp dir with equal durability (see
docs/operations.md#durability): ``short`` pairs sync_interval 1s with synchronous_commit
off, ``strict`` pairs sync_interval always with synchronous_commit on. Then measures:

1. raw ``kv.put`` at 64 concurrent tasks (1 KB values, one key per task);
2. a bare cached-revision ``kv.update`` loop at 64 tasks (the floor for a CAS write);
3. kvstate stage updates (start / succeed through a ten-stage pipeline) on distinct
   operations at 64 tasks, with the client CPU time per update next to (2)'s;
4. one hot operation, 32 concurrent writers each merging its own metadata keys, in one
   process and spread over 4 processes, next to PostgreSQL ``SELECT ... FOR UPDATE`` on
   one row with 32 writers; every writer's keys are checked at the end (lost updates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats

from devstack.servers import NatsServer, PostgresServer
from kvstate import Client, Pipeline, Settings

PIPELINE = Pipeline.from_toml(Path(__file__).resolve().parent.parent / "demo" / "pipeline.toml")
STAGE_ORDER = [s for layer in PIPELINE.layers() for s in layer]
VALUE = b"x" * 1024
HISTORY = Settings().history
"""Revisions kept per key in the baseline buckets: kvstate's default, so every case is like for like."""


async def timed_tasks(
    tasks: int, seconds: float, body: Callable[[int, Callable[[], bool]], Awaitable[int]]
) -> dict[str, float]:
    """Run ``tasks`` copies of ``body(i, keep_going)`` for ``seconds``; rate and client CPU per op."""
    deadline = time.monotonic() + seconds
    cpu0, t0 = time.process_time(), time.monotonic()
    counts = await asyncio.gather(*(body(i, lambda: time.monotonic() < deadline) for i in range(tasks)))
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    ops = sum(counts)
    return {"ops": ops, "seconds": elapsed, "rate": ops / elapsed, "cpu_us_per_op": cpu / ops * 1e6}


async def raw_put(url: str, seconds: float) -> dict[str, float]:
    nc = await nats.connect(url)
    kv = await nc.jetstream().create_key_value(bucket="rawput", history=HISTORY)

    async def body(i: int, keep_going: Callable[[], bool]) -> int:
        n = 0
        while keep_going():
            await kv.put(f"k{i}", VALUE)
            n += 1
        return n

    try:
        return await timed_tasks(64, seconds, body)
    finally:
        await nc.close()


async def bare_update(url: str, seconds: float) -> dict[str, float]:
    nc = await nats.connect(url)
    kv = await nc.jetstream().create_key_value(bucket="bareupdate", history=HISTORY)
    revisions = [await kv.put(f"k{i}", VALUE) for i in range(64)]

    async def body(i: int, keep_going: Callable[[], bool]) -> int:
        n, rev = 0, revisions[i]
        while keep_going():
            rev = await kv.update(f"k{i}", VALUE, last=rev)
            n += 1
        return n

    try:
        return await timed_tasks(64, seconds, body)
    finally:
        await nc.close()


async def stage_updates(url: str, seconds: float) -> dict[str, float]:
    async with Client(Settings(nats_url=url, bucket="stageupdates"), create_bucket=True, cache_size=100_000) as kv:
        await kv.set_pipeline(PIPELINE)
        per_task = 60
        ops = [[(await kv.create(PIPELINE.name, metadata={"task": i})).id for _ in range(per_task)] for i in range(64)]

        async def body(i: int, keep_going: Callable[[], bool]) -> int:
            n = 0
            for op_id in ops[i]:
                for stage in STAGE_ORDER:
                    if not keep_going():
                        return n
                    await kv.start(op_id, stage, worker=f"w{i}")
                    await kv.succeed(op_id, stage, worker=f"w{i}", metadata={"n": n})
                    n += 2
            return n

        result = await timed_tasks(64, seconds, body)
        result["writes"] = kv.stats["writes"]
        return result


HOT_WRITER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from kvstate import Client, Settings

    async def main(url, bucket, op_id, tag, writers, seconds, start_at):
        async with Client(Settings(nats_url=url, bucket=bucket, max_retries=1000)) as kv:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            deadline = time.monotonic() + seconds
            async def writer(w):
                n = 0
                while time.monotonic() < deadline:
                    await kv.merge_metadata(op_id, {f"{tag}-{w}": n + 1})
                    n += 1
                return n
            t0 = time.monotonic()
            counts = await asyncio.gather(*(writer(w) for w in range(writers)))
            print(json.dumps({"counts": counts, "elapsed": time.monotonic() - t0, "conflicts": kv.stats["conflicts"],
                              "writes": kv.stats["writes"]}))

    a = sys.argv
    asyncio.run(main(a[1], a[2], a[3], a[4], int(a[5]), float(a[6]), float(a[7])))
    """
)


async def hot_operation(url: str, processes: int, writers: int, seconds: float) -> dict[str, float]:
    bucket = f"hot{processes}"
    async with Client(Settings(nats_url=url, bucket=bucket), create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create(PIPELINE.name)
        start_at = time.time() + 1.5
        procs = [
            subprocess.Popen(  # noqa: ASYNC220 - started once, before the timed window
                [
                    sys.executable,
                    "-c",
                    HOT_WRITER,
                    url,
                    bucket,
                    op.id,
                    f"p{p}",
                    str(writers // processes),
                    str(seconds),
                    str(start_at),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for p in range(processes)
        ]
        results = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
        final = await kv.get(op.id)
    applied = sum(sum(r["counts"]) for r in results)
    elapsed = max(r["elapsed"] for r in results)
    # Each writer merges its own key with its running count: the final value must be its last count.
    lost = sum(
        1
        for p, r in enumerate(results)
        for w, count in enumerate(r["counts"])
        if final.metadata.get(f"p{p}-{w}") != count
    )
    return {
        "ops": applied,
        "seconds": elapsed,
        "rate": applied / elapsed,
        "lost_writers": lost,
        "writes": sum(r["writes"] for r in results),
        "conflicts": sum(r["conflicts"] for r in results),
    }


async def postgres_for_update(dsn: str, writers: int, seconds: float) -> dict[str, float]:
    async with asyncpg.create_pool(dsn, min_size=writers, max_size=writers) as pool:
        await pool.execute("CREATE TABLE IF NOT EXISTS hot (id int PRIMARY KEY, data jsonb NOT NULL)")
        await pool.execute("INSERT INTO hot VALUES (1, '{}') ON CONFLICT (id) DO UPDATE SET data = '{}'")

        async def body(w: int, keep_going: Callable[[], bool]) -> int:
            n = 0
            async with pool.acquire() as conn:
                select = await conn.prepare("SELECT data FROM hot WHERE id = 1 FOR UPDATE")
                update = await conn.prepare("UPDATE hot SET data = $1::jsonb WHERE id = 1")
                while keep_going():
                    async with conn.transaction():
                        data = json.loads(await select.fetchval())
                        data[f"w{w}"] = n + 1
                        await update.fetch(json.dumps(data))
                    n += 1
            return n

        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        counts = await asyncio.gather(*(body(w, lambda: time.monotonic() < deadline) for w in range(writers)))
        elapsed = time.monotonic() - t0
        final = json.loads(await pool.fetchval("SELECT data FROM hot WHERE id = 1"))
    lost = sum(1 for w, c in enumerate(counts) if final.get(f"w{w}") != c)
    return {"ops": sum(counts), "seconds": elapsed, "rate": sum(counts) / elapsed, "lost_writers": lost}


DURABILITY = {"short": ("1s", "off"), "strict": ("always", "on")}


async def run(seconds: float, durability: str) -> dict[str, dict[str, float]]:
    sync_interval, synchronous_commit = DURABILITY[durability]
    with tempfile.TemporaryDirectory(prefix="kvstate-bench-") as tmp:
        nats_server = NatsServer(Path(tmp) / "nats", sync_interval=sync_interval).start()
        pg_settings = {"synchronous_commit": synchronous_commit, "max_connections": "100"}
        pg = PostgresServer(Path(tmp) / "pg", settings=pg_settings).start()
        try:
            results = {
                "raw_put_64": await raw_put(nats_server.url, seconds),
                "bare_cas_update_64": await bare_update(nats_server.url, seconds),
                "kvstate_stage_updates_64": await stage_updates(nats_server.url, seconds),
                "hot_kvstate_1proc_32": await hot_operation(nats_server.url, 1, 32, seconds),
                "hot_kvstate_4proc_32": await hot_operation(nats_server.url, 4, 32, seconds),
                "hot_postgres_for_update_32": await postgres_for_update(pg.dsn(), 32, seconds),
            }
        finally:
            pg.stop()
            nats_server.stop()
    return results


def report(results: dict[str, dict[str, float]], durability: str) -> str:
    sync_interval, synchronous_commit = DURABILITY[durability]
    lines = [
        f"machine: {os.cpu_count()} cores; durability pair '{durability}': nats-server 2.15.1 "
        f"sync_interval={sync_interval}, PostgreSQL synchronous_commit={synchronous_commit}",
        f"{'case':34} {'ops':>8} {'ops/s':>10} {'client us/op':>13} {'lost':>5}",
    ]
    for name, r in results.items():
        cpu = f"{r['cpu_us_per_op']:.1f}" if "cpu_us_per_op" in r else "-"
        lost = str(int(r["lost_writers"])) if "lost_writers" in r else "-"
        lines.append(f"{name:34} {int(r['ops']):>8} {r['rate']:>10.0f} {cpu:>13} {lost:>5}")
    raw, bare, stage = results["raw_put_64"], results["bare_cas_update_64"], results["kvstate_stage_updates_64"]
    pg = results["hot_postgres_for_update_32"]["rate"]
    hot1, hot4 = results["hot_kvstate_1proc_32"]["rate"], results["hot_kvstate_4proc_32"]["rate"]
    cpu_ratio = stage["cpu_us_per_op"] / bare["cpu_us_per_op"]
    lines += [
        "",
        f"stage updates / raw put throughput:          {stage['rate'] / raw['rate']:.2f}  (target >= 0.40)",
        f"client CPU per stage update / bare CAS:      {cpu_ratio:.2f}  (target <= 3)",
        f"hot op, 1 process   / PostgreSQL FOR UPDATE: {hot1 / pg:.1f}x  (target >= 2)",
        f"hot op, 4 processes / PostgreSQL FOR UPDATE: {hot4 / pg:.1f}x  (target >= 2)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each case")
    parser.add_argument("--durability", choices=sorted(DURABILITY), default="short")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    results = asyncio.run(run(args.seconds, args.durability))
    print(report(results, args.durability))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
