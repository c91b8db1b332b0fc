"""The load the scenarios put on the bucket, run in worker processes (``python -m robustness.worker``).

Each worker process opens its own kvstate Client and runs two kinds of tasks, every call
recorded (robustness.history):

- **compare-and-set writers** on a hot window of keys ``hot.NNNNNN``: read the key (a
  direct get, which any replica may answer), then ``store.update(key, value, revision)``.
  The value carries a unique write token, the revision it expected and its place in the
  chain. A key that holds ``capacity`` writes is full and the window slides on, so no key
  outgrows the bucket's history and every chain stays whole for the checker.
- **operation writers**: create an operation and walk it through the robustness pipeline
  (start, succeed each stage) with kvstate's own calls, each with an event id derived from
  the operation, retrying a call whose outcome is unknown with the same event id, as a
  service redelivering a queue message would.

Every loop is bounded by time (``seconds``) and by count (``max_acked``) and stops by
itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from kvstate import (
    Client,
    ConflictError,
    KvstateError,
    Operation,
    Pipeline,
    Settings,
    StageSpec,
    UpdateResult,
)
from kvstate.keys import operation_key
from robustness.history import History

__all__ = [
    "HOT_PREFIX",
    "PIPELINE",
    "HotValue",
    "WorkerSpec",
    "open_client",
    "run_worker",
    "spawn_worker",
    "worker_settings",
]

_ROOT = str(Path(__file__).resolve().parent.parent)
"""The repository root, put on the workers' PYTHONPATH (robustness/ is not installed)."""
HOT_PREFIX = "hot."
PIPELINE = Pipeline(
    name="robust",
    heartbeat_timeout=60.0,
    stages=(
        StageSpec(name="ingest"),
        StageSpec(name="check", after=("ingest",)),
        StageSpec(name="enrich", after=("check",)),
        StageSpec(name="store", after=("enrich",)),
    ),
)


class HotValue(msgspec.Struct, frozen=True):
    """What a compare-and-set writer stores: its token, the revision it expected, its place in the chain."""

    t: str
    p: int
    n: int
    pad: str = ""


_hot_encoder = msgspec.json.Encoder()
_hot_decoder = msgspec.json.Decoder(HotValue)


class WorkerSpec(msgspec.Struct, frozen=True):
    """What one worker process does (passed as JSON)."""

    name: str
    nats_url: str
    bucket: str
    out: str
    replicas: int = 3
    timeout: float = 5.0
    history: int = 64
    cas_tasks: int = 16
    ops_tasks: int = 0
    seconds: float = 60.0
    max_acked: int = 1_000_000
    window: int = 20
    capacity: int = 48
    seed: int = 0
    value_size: int = 64
    ops_pause: float = 0.0
    """seconds each operation writer sleeps between its calls (to pace a watched workload)"""


def worker_settings(spec: WorkerSpec) -> Settings:
    """The worker's Settings, built through ``Settings.from_env`` like any service's."""
    return Settings.from_env(
        {
            "NATS_URL": spec.nats_url,
            "KVSTATE_BUCKET": spec.bucket,
            "KVSTATE_REPLICAS": str(spec.replicas),
            "KVSTATE_HISTORY": str(spec.history),
            "KVSTATE_TIMEOUT": str(spec.timeout),
        }
    )


async def open_client(settings: Settings, *, name: str, within: float = 60.0, create: bool = False) -> Client:
    """An open Client; retried while the cluster is still electing (a fault may be under way)."""
    deadline = time.monotonic() + within
    while True:
        client = Client(settings, name=name, create_bucket=create)
        try:
            return await client.__aenter__()
        except KvstateError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class _Budget:
    """Shared stop condition of one process's tasks: a deadline and a count of acknowledged writes."""

    def __init__(self, seconds: float, max_acked: int) -> None:
        self.deadline = time.monotonic() + seconds
        self.max_acked = max_acked
        self.acked = 0

    def spent(self) -> bool:
        return self.acked >= self.max_acked or time.monotonic() >= self.deadline


class _HotWindow:
    """The keys a writer may pick: the ``size`` lowest keys it does not know to be full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.lowest = 0
        self.full: set[int] = set()

    def pick(self, rng: random.Random) -> int:
        candidates: list[int] = []
        index = self.lowest
        while len(candidates) < self.size:
            if index not in self.full:
                candidates.append(index)
            index += 1
        return rng.choice(candidates)

    def mark_full(self, index: int) -> None:
        self.full.add(index)
        while self.lowest in self.full:
            self.full.discard(self.lowest)
            self.lowest += 1

    def is_full(self, index: int) -> bool:
        return index < self.lowest or index in self.full


async def _cas_writer(
    client: Client, history: History, name: str, spec: WorkerSpec, budget: _Budget, window: _HotWindow, seed: int
) -> None:
    rng = random.Random(seed)
    store = client._open_store()
    pad = "x" * spec.value_size
    count = 0
    while not budget.spent():
        index = window.pick(rng)
        key = f"{HOT_PREFIX}{index:06d}"
        try:
            async with history.call(name, key, "get"):
                entry = await store.get(key)
        except KvstateError:
            await asyncio.sleep(0.05)
            continue
        chained, last = 0, 0
        if entry is not None and entry.value is not None:
            chained, last = _hot_decoder.decode(entry.value).n, entry.revision
        if chained >= spec.capacity:
            window.mark_full(index)
            continue
        if window.is_full(index):
            continue
        count += 1
        token = f"{name}.{count}"
        value = _hot_encoder.encode(HotValue(t=token, p=last, n=chained + 1, pad=pad))
        try:
            async with history.call(name, key, "cas", expected=last, token=token) as call:
                revision = await store.update(key, value, last)
                call.ok(revision)
            budget.acked += 1
            if chained + 1 >= spec.capacity:
                window.mark_full(index)
        except ConflictError:
            continue
        except KvstateError:
            await asyncio.sleep(0.05)


async def _retried(
    history: History,
    name: str,
    key: str,
    verb: str,
    event_id: str,
    budget: _Budget,
    call: Callable[[], Awaitable[Operation | UpdateResult]],
) -> bool:
    """Run one kvstate call until it is acknowledged (same event id each time); False if it never was."""
    give_up = budget.deadline + 30.0
    while time.monotonic() < give_up:
        try:
            async with history.call(name, key, verb, token=event_id) as recorder:
                answer = await call()
                if isinstance(answer, UpdateResult):
                    recorder.ok(answer.operation.revision, answer.outcome.value)
                else:
                    recorder.ok(answer.revision, "applied")
            budget.acked += 1
            return True
        except KvstateError:
            await asyncio.sleep(0.1)
    return False


async def _ops_writer(client: Client, history: History, name: str, spec: WorkerSpec, budget: _Budget) -> None:
    count = 0
    while not budget.spent():
        count += 1
        op_id = f"{name}-{count}"
        key = operation_key(op_id)
        create = functools.partial(client.create, PIPELINE.name, op_id=op_id, event_id=f"{op_id}:create")
        if not await _retried(history, name, key, "create", f"{op_id}:create", budget, create):
            return
        for stage in PIPELINE.stage_names:
            for verb in ("start", "succeed"):
                if budget.spent() and verb == "start":
                    return
                if spec.ops_pause:
                    await asyncio.sleep(spec.ops_pause)
                event_id = f"{op_id}:{stage}:{verb}"
                method = client.start if verb == "start" else client.succeed
                send = functools.partial(method, op_id, stage, worker=name, event_id=event_id)
                if not await _retried(history, name, key, verb, event_id, budget, send):
                    return


async def run_worker(spec: WorkerSpec) -> dict[str, int]:
    """Run one worker process's tasks to the end of their budget; returns its counts."""
    with History(Path(spec.out)) as history:
        client = await open_client(worker_settings(spec), name=spec.name)
        try:
            budget = _Budget(spec.seconds, spec.max_acked)
            window = _HotWindow(spec.window)
            tasks = [
                _cas_writer(client, history, f"{spec.name}c{i}", spec, budget, window, spec.seed * 1000 + i)
                for i in range(spec.cas_tasks)
            ]
            tasks += [_ops_writer(client, history, f"{spec.name}o{i}", spec, budget) for i in range(spec.ops_tasks)]
            await asyncio.gather(*tasks)
        finally:
            await client.close()
        return {"acked": budget.acked, "calls": len(history.calls)}


async def spawn_worker(spec: WorkerSpec, workdir: Path) -> asyncio.subprocess.Process:
    """Start ``python -m robustness.worker`` for ``spec``; its output goes to a file beside the spec."""
    spec_path = _write_spec(spec, workdir)
    log = spec_path.with_suffix(".log").open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "robustness.worker",
            str(spec_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": _ROOT},
        )
    finally:
        log.close()


def _write_spec(spec: WorkerSpec, workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{spec.name}.json"
    spec_path.write_bytes(msgspec.json.encode(spec))
    return spec_path


def main(argv: list[str]) -> int:
    """Entry of ``python -m robustness.worker SPEC.json``: prints the counts as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = msgspec.json.decode(Path(argv[0]).read_bytes(), type=WorkerSpec)
    counts = asyncio.run(run_worker(spec))
    print(json.dumps(counts), flush=True)
    return 0
