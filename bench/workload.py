"""One workload for every system in the comparison: the demo pipeline's shape, replayed.

``plan_workload`` turns a seed into, per operation, the messages its stage services
receive: ``start`` / ``fail`` / ``succeed`` / ``skip`` with explicit attempt numbers and
event ids, including retries, redelivered messages (the same event id twice in a row)
and late messages (an earlier message of a stage delivered again after the stage
finished, as a queue does after an ack timeout, or with a new event id, as a producer
that re-sends does).

Services also write metadata patches. Every attempt of a stage writes its progress into
the stage's namespace (``stage-metadata``, naming its attempt), and each stage that runs
alone in its layer refines the shared ``decision`` after it succeeded
(``shared-metadata``: version k, expecting the version k - 1 the previous writer left).
Late deliveries follow the status messages' design: a superseded attempt's patch is
delivered again after the stage finished (so after the retry's own patch), and a shared
patch again after the next writer's newer one; half keep their event id, half carry a
new one. ``run_workload`` drives a ``System``
through the plans with a fixed number of operations in flight; stages of one layer
(geo, fraud and profile) run as concurrent tasks, so their writes race as they would in
production. Every acknowledged write comes back as a ``View`` that the checker
(``bench.compare_check``) compares with what the workers really did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from kvstate import Pipeline

__all__ = [
    "DEMO_PIPELINE",
    "Delivery",
    "Expected",
    "Message",
    "MessageKind",
    "OperationPlan",
    "RunRecord",
    "StageView",
    "System",
    "View",
    "WorkloadOptions",
    "plan_workload",
    "run_workload",
    "shared_writers",
]

DEMO_PIPELINE = Path(__file__).resolve().parent.parent / "demo" / "pipeline.toml"
"""The demo pipeline: ten stages, three parallel enrichers."""


class MessageKind(StrEnum):
    """What a stage service reports."""

    START = "start"
    FAIL = "fail"
    SUCCEED = "succeed"
    SKIP = "skip"
    STAGE_METADATA = "stage-metadata"
    """a patch of the stage's own namespace, written by one attempt (``attempt``)"""
    SHARED_METADATA = "shared-metadata"
    """a patch of the operation's shared metadata, applicable while ``expect`` holds"""


@dataclass(frozen=True, slots=True)
class Message:
    """One message a stage service processes (and reports as a status update or a metadata patch).

    ``metadata``: the result of ``succeed``, or the patch of a metadata message. ``expect``
    (shared metadata only): the members the patch was computed from, with their values
    (None: absent), which a guarded system checks before it applies the patch.
    """

    stage: str
    kind: MessageKind
    attempt: int
    event_id: str
    worker: str
    metadata: dict[str, object] | None = None
    expect: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class Expected:
    """What a stage really ended as: status, attempt and the metadata of its successful attempt."""

    status: str
    attempt: int
    metadata: dict[str, object] | None


@dataclass(frozen=True, slots=True)
class StagePlan:
    """The messages of one stage in delivery order, and the messages delivered again late.

    ``late`` is delivered ``late_delay`` after the stage's last message: an earlier status
    message or a superseded attempt's metadata patch of this stage, or the shared patch of
    the writer before this one (this stage's own shared patch has overtaken it).
    """

    messages: tuple[Message, ...]
    redelivered: frozenset[str]
    late: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class OperationPlan:
    """Everything one operation goes through."""

    key: str
    stages: dict[str, StagePlan]
    expected: dict[str, Expected]

    @property
    def message_count(self) -> int:
        """Updates this operation's services send, redeliveries and late ones included."""
        return sum(len(p.messages) + len(p.redelivered) + len(p.late) for p in self.stages.values())

    def stage_patches(self, stage: str) -> list[Message]:
        """The metadata patches of ``stage``'s namespace, one per attempt, oldest attempt first."""
        return [m for m in self.stages[stage].messages if m.kind is MessageKind.STAGE_METADATA]

    @property
    def shared_patches(self) -> list[Message]:
        """The shared-metadata patches in the order they were meant to apply (each expects the one before)."""
        return [m for p in self.stages.values() for m in p.messages if m.kind is MessageKind.SHARED_METADATA]


@dataclass(frozen=True, slots=True)
class WorkloadOptions:
    """The shape of the workload; the same options give the same plans on every system."""

    ops: int = 1000
    concurrency: int = 32
    seed: int = 1
    retry_rate: float = 0.08
    redeliver_rate: float = 0.03
    late_rate: float = 0.04
    skip_rate: float = 0.1
    late_delay: float = 0.005
    metadata_late_rate: float = 0.1
    """chance that a retried stage's superseded patch, or a shared patch that a newer one
    followed, is delivered again late"""


@dataclass(frozen=True, slots=True)
class StageView:
    """A stage as one acknowledged write left it."""

    status: str
    attempt: int
    metadata: dict[str, object] | None


@dataclass(frozen=True, slots=True)
class View:
    """An operation as one acknowledged write (or the final read) left it, in one vocabulary for every system.

    ``order`` orders the writes of one operation as the store committed them: the KV
    revision for kvstate, the row's revision counter for the PostgreSQL baseline.
    ``metadata`` is the shared metadata (stages' namespaces are in ``stages``).
    """

    order: int
    status: str
    stages: dict[str, StageView]
    metadata: dict[str, object] = field(default_factory=dict)


class System(Protocol):
    """What the workload needs from a system under test."""

    name: str

    async def create(self, key: str) -> None:
        """Create the operation ``key`` with every stage of the pipeline waiting."""

    async def deliver(self, key: str, message: Message) -> View | None:
        """Report ``message``; the state the write produced, or None when nothing was written."""

    async def final_views(self) -> dict[str, View]:
        """The final state of every operation, by key."""


@dataclass(slots=True)
class Delivery:
    """One update (a status message or a metadata patch) as the worker saw it."""

    key: str
    message: Message
    latency: float
    view: View | None
    error: str | None = None


@dataclass(slots=True)
class RunRecord:
    """What happened during one run: every delivery, and the wall time."""

    system: str
    deliveries: list[Delivery] = field(default_factory=list)
    elapsed: float = 0.0
    creates: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def updates(self) -> int:
        """Updates sent, status messages and metadata patches (successful or not)."""
        return len(self.deliveries)

    @property
    def updates_per_second(self) -> float:
        """Updates per second of wall time."""
        return self.updates / self.elapsed if self.elapsed > 0 else 0.0

    def latency_ms(self, quantile: float) -> float:
        """A quantile of update latency, in milliseconds."""
        values = sorted(d.latency for d in self.deliveries)
        if not values:
            return 0.0
        index = min(len(values) - 1, max(0, round(quantile * (len(values) - 1))))
        return values[index] * 1000.0


def plan_workload(pipeline: Pipeline, options: WorkloadOptions) -> list[OperationPlan]:
    """The messages every operation's services will send, from ``options.seed``."""
    rng = random.Random(options.seed)
    writers = shared_writers(pipeline)
    return [
        _plan_operation(pipeline, options, rng, f"op{options.seed}-{index:07d}", writers)
        for index in range(options.ops)
    ]


def shared_writers(pipeline: Pipeline) -> list[str]:
    """The stages that refine the shared ``decision``: required ones that run alone in their layer.

    They run one after another, so each writer's patch is meant to follow the one before.
    """
    optional = {spec.name for spec in pipeline.stages if spec.optional}
    return [layer[0] for layer in pipeline.layers() if len(layer) == 1 and layer[0] not in optional]


def _resent(message: Message) -> Message:
    """The same content with a new message id, as a producer that re-sends makes it."""
    return dataclasses.replace(message, event_id=message.event_id + ".resent")


def _plan_operation(
    pipeline: Pipeline, options: WorkloadOptions, rng: random.Random, key: str, writers: Sequence[str]
) -> OperationPlan:
    stages: dict[str, StagePlan] = {}
    expected: dict[str, Expected] = {}
    previous_shared: Message | None = None
    for spec in pipeline.stages:
        worker = f"{spec.name}-{rng.randrange(4)}"
        messages: list[Message] = []

        def message(
            kind: MessageKind,
            attempt: int,
            metadata: dict[str, object] | None = None,
            expect: dict[str, object] | None = None,
        ) -> Message:
            event_id = f"{key}.{spec.name}.{attempt}.{kind.value}"  # noqa: B023 - used at once, in this iteration
            return Message(spec.name, kind, attempt, event_id, worker, metadata, expect)  # noqa: B023

        def progress(attempt: int) -> Message:
            patch: dict[str, object] = {"progress": {"attempt": attempt, "worker": worker}}  # noqa: B023
            return message(MessageKind.STAGE_METADATA, attempt, patch)

        if spec.optional and rng.random() < options.skip_rate:
            messages.append(message(MessageKind.SKIP, 0))
            expected[spec.name] = Expected("skipped", 0, None)
        else:
            attempt = 1
            while attempt < spec.max_attempts and rng.random() < options.retry_rate:
                messages += [message(MessageKind.START, attempt), progress(attempt), message(MessageKind.FAIL, attempt)]
                attempt += 1
            result: dict[str, object] = {"worker": worker, "attempt": attempt, "token": f"{key}/{spec.name}/{attempt}"}
            messages += [
                message(MessageKind.START, attempt),
                progress(attempt),
                message(MessageKind.SUCCEED, attempt, result),
            ]
            expected[spec.name] = Expected("succeeded", attempt, result)
        shared: Message | None = None
        if spec.name in writers:
            version = writers.index(spec.name) + 1
            decision: dict[str, object] = {
                "decision": {"by": spec.name, "version": version},
                "decision_version": version,
            }
            basis: dict[str, object] = {"decision_version": version - 1 if version > 1 else None}
            shared = message(MessageKind.SHARED_METADATA, expected[spec.name].attempt, decision, basis)
            messages.append(shared)
        redelivered = frozenset(m.event_id for m in messages if rng.random() < options.redeliver_rate)
        late: list[Message] = []
        earlier = [m for m in messages if m.kind is MessageKind.START or m.kind is MessageKind.FAIL]
        if earlier and rng.random() < options.late_rate:
            again = rng.choice(earlier)
            if rng.random() < 0.5:  # re-sent by its producer: same content, a new message id
                again = _resent(again)
            late.append(again)
        final_attempt = expected[spec.name].attempt
        superseded = [m for m in messages if m.kind is MessageKind.STAGE_METADATA and m.attempt < final_attempt]
        if superseded and rng.random() < options.metadata_late_rate:
            again = rng.choice(superseded)
            late.append(_resent(again) if rng.random() < 0.5 else again)
        if shared is not None:
            if previous_shared is not None and rng.random() < options.metadata_late_rate:
                late.append(_resent(previous_shared) if rng.random() < 0.5 else previous_shared)
            previous_shared = shared
        stages[spec.name] = StagePlan(tuple(messages), redelivered, tuple(late))
    return OperationPlan(key, stages, expected)


async def run_workload(
    system: System,
    pipeline: Pipeline,
    plans: Sequence[OperationPlan],
    options: WorkloadOptions,
    *,
    timeout: float,
) -> RunRecord:
    """Drive ``system`` through ``plans`` with ``options.concurrency`` operations in flight.

    Raises TimeoutError when the run takes longer than ``timeout`` seconds.
    """
    record = RunRecord(system.name)
    queue: asyncio.Queue[OperationPlan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    layers = pipeline.layers()

    async def deliver(key: str, message: Message) -> None:
        started = time.perf_counter()
        try:
            view = await system.deliver(key, message)
        except Exception as exc:  # noqa: BLE001 - a failed update is a result to count, not a crash
            record.deliveries.append(Delivery(key, message, time.perf_counter() - started, None, repr(exc)))
            record.errors.append(f"{key} {message.event_id}: {exc!r}")
            return
        record.deliveries.append(Delivery(key, message, time.perf_counter() - started, view))

    async def late(key: str, message: Message) -> None:
        await asyncio.sleep(options.late_delay)
        await deliver(key, message)

    async def run_stage(key: str, stage: StagePlan, background: list[asyncio.Task[None]]) -> None:
        for message in stage.messages:
            await deliver(key, message)
            if message.event_id in stage.redelivered:
                await deliver(key, message)
        background.extend(asyncio.create_task(late(key, m)) for m in stage.late)

    async def run_operation(plan: OperationPlan) -> None:
        await system.create(plan.key)
        record.creates += 1
        background: list[asyncio.Task[None]] = []
        for layer in layers:
            await asyncio.gather(*(run_stage(plan.key, plan.stages[name], background) for name in layer))
        await asyncio.gather(*background)

    async def worker() -> None:
        while True:
            try:
                plan = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await run_operation(plan)
            except Exception as exc:  # noqa: BLE001 - a failed create is counted as an error
                record.errors.append(f"{plan.key} create: {exc!r}")

    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    record.elapsed = time.perf_counter() - started
    return record


def load_pipeline(path: Path = DEMO_PIPELINE) -> Pipeline:
    """The pipeline the workload follows (the demo's by default)."""
    return Pipeline.from_toml(path)
