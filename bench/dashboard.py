"""Dashboard benchmark: server-side render time at 1,000 and 100,000 live operations, index memory.

    python -m bench.dashboard [--sizes 1000,100000] [--rounds 200]

Starts its own nats-server (sync_interval 1s) in a temp dir. For each size it fills a fresh
bucket with operations in a realistic spread of states (published as stored JSON, built by
kvstate's own state machine), lets the dashboard's real watcher replay them into the index,
then times the overview and the operations list (context building plus template rendering,
exactly what the handlers do) and measures the index's memory with tracemalloc.
Besides the first page and a broad filter, two selective filters are timed: a worker that
one operation in 1,000 names (``RARE_WORKER``) and a status no operation has (cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from dashboard.archive import ArchiveAccess
from dashboard.contexts import DashboardState, banner_context, operations_context, overview_context
from dashboard.feed import Broadcaster, IndexFeed
from dashboard.index import OperationIndex
from dashboard.query import parse_filter
from dashboard.settings import DashboardSettings
from dashboard.templating import Renderer, make_environment
from devstack.servers import NatsServer
from kvstate import Change, Client, Operation, Pipeline, Settings
from kvstate.codec import decode_operation, encode_operation
from kvstate.events import FailStage, Heartbeat, SkipStage, StartStage, SucceedStage
from kvstate.machine import apply_event, new_operation

PIPELINE = Pipeline.from_toml(Path(__file__).resolve().parents[1] / "demo" / "pipeline.toml")
RARE_WORKER = "gpu-7"
RARE_EVERY = 1000
"""Every RARE_EVERY-th operation has its stages run by RARE_WORKER (a selective filter)."""


def templates(now: datetime) -> list[Operation]:
    """Operations in many states, made by the real state machine (ids and times varied later)."""
    found = []
    stages = PIPELINE.stage_names
    for depth in range(len(stages) + 1):
        for outcome in ("running", "failed", "retrying"):
            at = now - timedelta(minutes=5)
            op = new_operation("template", PIPELINE, at, {"customer": "c17", "country": "NO", "amount": 125})

            def step(event: Any, op: Operation = op) -> Operation:
                nonlocal at
                at += timedelta(seconds=1)
                return apply_event(op, PIPELINE, event, at).operation

            for name in PIPELINE.stage_names[:depth]:
                if PIPELINE.stage(name).optional and name == "profile":
                    op = step(SkipStage(stage=name, reason="bench"), op)
                    continue
                op = step(StartStage(stage=name, worker=f"{name}-1"), op)
                op = step(Heartbeat(stage=name, worker=f"{name}-1"), op)
                op = step(SucceedStage(stage=name, metadata={"ms": 12}), op)
            ready = [s for s in stages if op.stage(s).status.value == "waiting"]
            if ready and not op.done:
                try:
                    op = step(StartStage(stage=ready[0], worker="w-9"), op)
                    if outcome == "failed":
                        op = step(FailStage(stage=ready[0], error="upstream timeout", retryable=False), op)
                    elif outcome == "retrying":
                        op = step(FailStage(stage=ready[0], error="try again", retryable=True), op)
                except Exception:  # noqa: BLE001 - a stage not ready yet: keep the op as it is
                    pass
            found.append(op)
    return found


def with_worker(op: Operation, worker: str) -> Operation:
    """``op`` with every stage that names a worker run by ``worker`` instead."""
    stages = {
        name: msgspec.structs.replace(state, worker=worker) if state.worker else state
        for name, state in op.stages.items()
    }
    return msgspec.structs.replace(op, stages=stages)


async def fill(client: Client, count: int) -> None:
    now = datetime.now(UTC)
    shapes = templates(now)
    rare = [with_worker(shape, RARE_WORKER) for shape in shapes]
    # seeded below the client (values built in memory), as a foreign writer would
    store = client._open_store()
    js = store.js
    batch: list[asyncio.Future[Any]] = []
    for i in range(count):
        shape = (rare if i % RARE_EVERY == 0 else shapes)[i % len(shapes)]
        shift = timedelta(seconds=i % 3600)
        op = msgspec.structs.replace(
            shape, id=f"bench{i:07d}", created_at=shape.created_at - shift, metadata={**shape.metadata, "n": i}
        )
        batch.append(asyncio.ensure_future(js.publish(store.subject("op." + op.id), encode_operation(op))))
        if len(batch) >= 2000:
            await asyncio.gather(*batch)
            batch.clear()
    await asyncio.gather(*batch)


def timings(fn: Any, rounds: int) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "p95_ms": round(samples[int(0.95 * (len(samples) - 1))] * 1000, 3),
    }


async def index_memory(client: Client) -> dict[str, float]:
    """Bytes the index retains per operation: decode every stored value anew under tracemalloc."""
    raw = []
    async for entry in client._open_store().scan("op.*"):
        raw.append((entry.key, entry.revision, entry.value or b""))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = OperationIndex()
    index.set_pipeline(PIPELINE)
    index.begin_bulk()
    now = time.time()
    for key, revision, data in raw:
        op = decode_operation(key, revision, data)
        index.apply(Change(op.id, revision, op, initial=True), now)
        del op
    index.end_bulk()
    index.tick(now)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"index_bytes": retained, "bytes_per_op": round(retained / max(1, len(index)), 1)}


async def run_size(server: NatsServer, count: int, rounds: int) -> dict[str, Any]:
    kv = Settings(nats_url=server.url, bucket=f"bench{count}", max_value_size=1 << 20)
    async with Client(kv, create_bucket=True) as client:
        await client.set_pipeline(PIPELINE)
        began = time.perf_counter()
        await fill(client, count)
        filled = time.perf_counter() - began
        index = OperationIndex()
        broadcaster = Broadcaster()
        feed = IndexFeed(client, index, broadcaster)
        broadcaster.start()
        began = time.perf_counter()
        await feed.start()
        await feed.ready.wait()
        replayed = time.perf_counter() - began
        assert len(index) == count, (len(index), count)
        settings = DashboardSettings(kv=kv)
        state = DashboardState(settings, client, index, feed, broadcaster, ArchiveAccess(None))
        renderer = Renderer(make_environment())

        def overview() -> None:
            now = time.time()
            renderer.html(
                "overview.html", overview_context(state, None, now) | banner_context(state, now) | {"path": "/"}
            )

        def listing() -> None:
            now = time.time()
            renderer.html(
                "operations.html",
                operations_context(state, {}, now) | banner_context(state, now) | {"path": "/operations"},
            )

        def filtered(params: dict[str, list[str]]) -> Callable[[], None]:
            def render() -> None:
                now = time.time()
                context = operations_context(state, params, now) | {"path": "/operations"}
                renderer.html("partials/operations.html", context)

            return render

        failed_at_score = {"status": ["failed"], "stage": ["score"], "stage_status": ["failed"]}
        rare_worker = {"worker": [RARE_WORKER]}
        no_match = {"status": ["cancelled"]}

        result = {
            "operations": count,
            "fill_seconds": round(filled, 2),
            "replay_seconds": round(replayed, 2),
            "overview": timings(overview, rounds),
            "list_first_page": timings(listing, rounds),
            "list_filtered_failed_at_score": timings(filtered(failed_at_score), max(10, rounds // 10)),
            "list_filtered_rare_worker": timings(filtered(rare_worker), max(10, rounds // 4)),
            "list_filtered_no_match": timings(filtered(no_match), max(10, rounds // 4)),
            "matches": {
                "failed_at_score": index.count(parse_filter(failed_at_score)),
                "rare_worker": index.count(parse_filter(rare_worker)),
                "no_match": index.count(parse_filter(no_match)),
            },
        }
        await feed.stop()
        await broadcaster.stop()
        result.update(await index_memory(client))
        return result


async def main_async(sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp,
        NatsServer(Path(tmp), sync_interval="1s") as server,
    ):
        return [await run_size(server, size, rounds) for size in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    results = asyncio.run(main_async([int(s) for s in args.sizes.split(",")], args.rounds))
    print(json.dumps(results, indent=2))
    if len(results) >= 2:
        small, large = results[0], results[-1]
        ratio = large["overview"]["p50_ms"] / small["overview"]["p50_ms"]
        print(f"overview p50 ratio {large['operations']} / {small['operations']} ops: {ratio:.2f} (target <= 1.5)")
        print(
            f"index memory at {large['operations']} ops: {large['bytes_per_op']} bytes per operation (target <= 1024)"
        )
    for result in results:
        print(
            f"selective filters at {result['operations']} ops, p50:"
            f" worker {RARE_WORKER} ({result['matches']['rare_worker']} matches)"
            f" {result['list_filtered_rare_worker']['p50_ms']} ms,"
            f" status cancelled ({result['matches']['no_match']} matches)"
            f" {result['list_filtered_no_match']['p50_ms']} ms"
        )


if __name__ == "__main__":
    main()
