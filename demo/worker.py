"""One simulated service: pulls its stage's work from the queue and reports through kvstate.

The worker behaves like a real service that reads a work queue: every kvstate event id
is derived from the message (its stream sequence plus the kind of event), so when the
queue delivers a message again its updates come back ``duplicate``, and a different
message for work that already happened comes back ``stale``: nothing is applied twice.
After each update it queues the work the new state calls for (``Router``); the queue's
message-id deduplication keeps two workers from queueing the same next step twice.

When kvstate raises, the message is never simply acknowledged (``demo.retry`` has the
table):

- a transient error (ConnectionLostError, ConflictError, BucketError) is retried in place,
  up to ``IN_PLACE_TRIES`` tries with jittered exponential back-off and the same event id,
  so the result of work already done is not thrown away; a try that comes back
  ``duplicate`` after a failed one is that earlier try having landed. When the tries run
  out, or the error came before any update (reading the operation, queueing the next
  step), the message is handed back (``nak``) with a back-off that grows with its delivery
  count: the queue redelivers it and its updates repeat their event ids. A redelivery
  whose ``start`` comes back ``duplicate`` does not run the attempt again (the delivery
  before it may have): the supervisor fails that attempt once it is overdue and the
  retry is queued, so the operation still moves on;
- a permanent error (ValidationError, InvalidTransition, OperationNotFound, CorruptValue)
  would come back on every delivery: the message is terminated and the reason logged once;
- a ``stale`` outcome is no error: the state machine moved past the message; it is
  acknowledged like any finished work.

Each case is counted (``DemoStats.transient``, ``rejected``, ``stale``); anything else is a
bug, counted in ``errors``, logged with its traceback and handed back.

Misbehaviour on purpose (``DemoSettings``): transient stage failures (the stage is retried
with back-off), poison inputs, workers that hang without heartbeats (the supervisor fails
the attempt), and chaos after a success: the message is handed back for redelivery instead
of acknowledged, or a late copy of it (and of the previous attempt) is queued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
from collections.abc import Awaitable, Callable
from functools import partial

from demo.errors import QueueError
from demo.queue import WorkConsumer, WorkItem, WorkMessage, WorkQueue, now
from demo.retry import TRANSIENT, Verdict, backoff, verdict
from demo.services import Service, StageFailure, StageResult
from demo.settings import DemoSettings
from demo.stats import DemoStats
from kvstate import (
    Client,
    KvstateError,
    Operation,
    Outcome,
    Pipeline,
    StageStatus,
    UpdateResult,
    ready_stages,
)

__all__ = ["Router", "StageWorker"]

log = logging.getLogger("demo.worker")

STOP_GRACE = 3.0
"""Seconds running attempts get to finish on shutdown before they are cancelled (and redelivered later)."""
IN_PLACE_TRIES = 4
"""Tries of one kvstate update before a transient error hands the message back (each try
is itself bounded by the client's ``KVSTATE_DEADLINE``)."""


class Router:
    """Queues the work an operation's state calls for: ready stages and due retries."""

    def __init__(self, queue: WorkQueue, pipeline: Pipeline, settings: DemoSettings) -> None:
        self._queue = queue
        self._pipeline = pipeline
        self._settings = settings

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, scaled like the latencies."""
        return min(3.0, 0.25 * 2.0 ** (attempt - 1)) * self._settings.latency_scale

    async def follow(self, op: Operation, stage: str | None = None) -> None:
        """Queue every ready stage of ``op``, and the retry of ``stage`` when it is retrying."""
        if op.done:
            return
        for name in ready_stages(op, self._pipeline):
            await self._queue.publish(WorkItem(op=op.id, stage=name, attempt=op.stage(name).attempt + 1))
        retrying = [stage] if stage is not None else list(op.stages)
        for name in retrying:
            state = op.stage(name)
            if state.status is StageStatus.RETRYING:
                item = WorkItem(
                    op=op.id, stage=name, attempt=state.attempt + 1, not_before=now() + self.backoff(state.attempt)
                )
                await self._queue.publish(item)


class StageWorker:
    """The service of one stage: up to ``concurrency`` attempts at once, each its own task."""

    def __init__(
        self,
        client: Client,
        queue: WorkQueue,
        router: Router,
        pipeline: Pipeline,
        service: Service,
        settings: DemoSettings,
        stats: DemoStats,
        rng: random.Random,
    ) -> None:
        self._client = client
        self._queue = queue
        self._router = router
        self._pipeline = pipeline
        self._spec = pipeline.stage(service.stage)
        self._service = service
        self._settings = settings
        self._stats = stats
        self._rng = rng
        self.name = f"{service.stage}-{os.getpid()}"
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def stage(self) -> str:
        """The stage this service runs."""
        return self._spec.name

    async def run(self, stopping: asyncio.Event) -> None:
        """Pull and handle work until ``stopping`` is set, then finish or cancel what runs."""
        consumer: WorkConsumer | None = None
        try:
            while not stopping.is_set():
                if consumer is None:
                    try:
                        consumer = await self._queue.consumer(self.stage, max_ack_pending=self._settings.concurrency)
                    except QueueError as exc:
                        log.warning("%s: %s; retrying", self.name, exc)
                        await _sleep_unless(stopping, 1.0)
                        continue
                free = self._settings.concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    batch = await consumer.fetch(free, timeout=1.0)
                except QueueError as exc:
                    log.warning("%s: %s", self.name, exc)
                    await _sleep_unless(stopping, 1.0)
                    continue
                for message in batch:
                    task = asyncio.get_running_loop().create_task(self._handle(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self._finish()
            if consumer is not None:
                await consumer.close()

    async def _finish(self) -> None:
        if not self._tasks:
            return
        _, still_running = await asyncio.wait(self._tasks, timeout=STOP_GRACE)
        for task in still_running:
            task.cancel()
        await asyncio.gather(*still_running, return_exceptions=True)

    async def _handle(self, message: WorkMessage) -> None:
        item = message.item
        if item.not_before is not None and item.not_before > now():
            await message.nak(delay=item.not_before - now())
            return
        try:
            await self._process(message)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the service; logged there
            await self._settle_error(message, exc)

    async def _settle_error(self, message: WorkMessage, exc: Exception) -> None:
        """Hand the message back, refuse it for good, or acknowledge it, as ``exc`` calls for."""
        key = message.item.key
        # The queue is ours, not kvstate's: a failed publish of the next step is transient too.
        decision = Verdict.RETRY if isinstance(exc, QueueError) else verdict(exc)
        if decision is Verdict.STALE:
            self._stats.stale += 1
            await message.ack()
        elif decision is Verdict.REJECT:
            # Every delivery would meet the same error: say why once and drop the message.
            self._stats.rejected += 1
            log.warning("%s: %s rejected for good (%s): %s", self.name, key, type(exc).__name__, exc)
            await message.term()
        else:
            # Never acknowledge what may not have landed: the redelivery repeats the event ids,
            # so an update that did land comes back duplicate and is not applied twice.
            delay = backoff(message.delivered, self._rng)
            if decision is Verdict.RETRY:
                self._stats.transient += 1
                log.warning("%s: %s: %s; redelivered in %.1fs", self.name, key, exc, delay)
            else:
                self._stats.errors += 1
                log.error("%s: %s failed unexpectedly; redelivered in %.1fs", self.name, key, delay, exc_info=exc)
            await message.nak(delay=delay)

    async def _update(self, message: WorkMessage, call: Callable[[], Awaitable[UpdateResult]]) -> UpdateResult:
        """Make one kvstate update, retried in place while it fails transiently, and count its outcome.

        Every try sends the same event id. A try that failed may still have landed (its answer
        was lost): when a later try comes back ``duplicate``, it is that earlier try of this
        very update, so for this delivery the update was applied. After ``IN_PLACE_TRIES``
        the error goes up and the message is handed back (``_settle_error``).
        """
        retried = False
        for tries in range(1, IN_PLACE_TRIES + 1):
            try:
                result = await call()
            except TRANSIENT as exc:
                if tries == IN_PLACE_TRIES:
                    raise
                self._stats.transient += 1
                delay = backoff(tries, self._rng)
                log.warning("%s: %s: %s; trying again in %.1fs", self.name, message.item.key, exc, delay)
                await message.in_progress()
                await asyncio.sleep(delay)
                retried = True
                continue
            if retried and result.outcome is Outcome.DUPLICATE:
                result = dataclasses.replace(result, outcome=Outcome.APPLIED, reason="an earlier try landed")
            self._stats.record(result.outcome)
            return result
        raise AssertionError("unreachable: the last try returns or raises")

    async def _process(self, message: WorkMessage) -> None:
        item = message.item
        client, stage, name = self._client, self.stage, self.name
        op = await client.get(item.op)  # nothing done yet: a transient error here hands the message back
        if op.done:
            await message.ack()
            return
        skip_reason = self._service.skip(op) if op.stage(stage).status is StageStatus.WAITING else None
        if skip_reason is not None:
            skipped = await self._update(
                message,
                partial(
                    client.skip, item.op, stage, reason=skip_reason, worker=name, event_id=message.event_id("skip")
                ),
            )
            self._stats.skipped += skipped.applied
            await self._router.follow(skipped.operation)
            await message.ack()
            return
        started = await self._update(
            message,
            partial(
                client.start, item.op, stage, worker=name, attempt=item.attempt, event_id=message.event_id("start")
            ),
        )
        if not started.applied:
            # A redelivery or a late replay: another delivery owns this attempt, or it is over.
            await self._router.follow(started.operation, stage)
            await message.ack()
            return
        if self._rng.random() < self._settings.stuck_rate:
            await self._hang(message)
            await message.ack()
            return
        try:
            result = await self._attempt(message, started.operation)
        except StageFailure as failure:
            failed = await self._update(
                message,
                partial(
                    client.fail,
                    item.op,
                    stage,
                    failure.message,
                    retryable=failure.retryable,
                    code=failure.code,
                    worker=name,
                    attempt=item.attempt,
                    event_id=message.event_id("fail"),
                ),
            )
            if failed.applied and failed.operation.stage(stage).status is StageStatus.RETRYING:
                self._stats.retries += 1
            await self._router.follow(failed.operation, stage)
        else:
            if result.shared is not None:
                await self._update(
                    message,
                    partial(
                        client.merge_metadata, item.op, result.shared, worker=name, event_id=message.event_id("output")
                    ),
                )
            done = await self._update(
                message,
                partial(
                    client.succeed,
                    item.op,
                    stage,
                    metadata=result.metadata,
                    worker=name,
                    attempt=item.attempt,
                    event_id=message.event_id("done"),
                ),
            )
            await self._router.follow(done.operation, stage)
            if self._rng.random() < self._settings.chaos_rate:
                await self._chaos(message)
                return
        await message.ack()

    async def _attempt(self, message: WorkMessage, op: Operation) -> StageResult:
        """Run the service for its simulated latency, heartbeating while it runs."""
        beats = asyncio.get_running_loop().create_task(self._heartbeats(message))
        try:
            await asyncio.sleep(self._service.latency(self._rng, self._settings.latency_scale))
            return self._service.attempt(op, self._rng, self._settings.failure_rate)
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    async def _heartbeats(self, message: WorkMessage) -> None:
        item = message.item
        interval = min(2.0, self._pipeline.heartbeat_timeout / 3)
        while True:
            await asyncio.sleep(interval)
            await message.in_progress()
            try:
                beat = await self._client.heartbeat(item.op, self.stage, worker=self.name, attempt=item.attempt)
            except KvstateError as exc:
                log.debug("%s: heartbeat for %s failed: %s", self.name, item.key, exc)
                continue
            if not beat.applied:
                return  # the attempt was taken away (stuck, cancelled): stop beating

    async def _hang(self, message: WorkMessage) -> None:
        """A stuck worker: no heartbeat, no progress, well past the deadline; then it reports
        success as if nothing happened. By then the supervisor failed the attempt, so the
        late report comes back stale."""
        item = message.item
        limit = self._spec.deadline or self._pipeline.heartbeat_timeout
        await asyncio.sleep(limit * self._rng.uniform(1.3, 2.0))
        late = await self._update(
            message,
            partial(
                self._client.succeed,
                item.op,
                self.stage,
                worker=self.name,
                attempt=item.attempt,
                event_id=message.event_id("done"),
            ),
        )
        if late.applied:  # nobody noticed the hang: carry on like a slow success
            await self._router.follow(late.operation, self.stage)

    async def _chaos(self, message: WorkMessage) -> None:
        """Misbehave after a success the way queues do. Half the time hand the message back
        instead of acknowledging it: its redelivery repeats its event ids (``duplicate``).
        Otherwise acknowledge it and queue late copies of it and of the previous attempt: new
        messages for work already done (``stale``)."""
        item = message.item
        if message.delivered == 1 and self._rng.random() < 0.5:
            self._stats.replays += 1
            await message.nak()
            return
        await message.ack()
        replays = [item]
        if item.attempt > 1:
            replays.append(WorkItem(op=item.op, stage=item.stage, attempt=item.attempt - 1))
        for replay in replays:
            if await self._queue.publish(replay, msg_id=f"{replay.key}.replay"):
                self._stats.replays += 1


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return
