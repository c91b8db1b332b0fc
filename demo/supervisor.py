"""The supervisor: watches the bucket, counts finished operations, unsticks stuck ones.

It keeps the live operations of the demo pipeline in memory from one kvstate watch
(the way the dashboard does) and, every second:

- fails attempts that ``kvstate.stuck_stages`` reports (past their deadline or silent
  for longer than the heartbeat timeout) as retryable, with an event id derived from
  the attempt, so two supervisors failing the same attempt apply it once;
- re-queues the work of operations that have not moved for a while (a lost publish
  after a crash): ready stages and due retries. The queue drops what it already holds.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from demo.errors import QueueError
from demo.stats import DemoStats
from demo.worker import Router
from kvstate import Change, Client, KvstateError, Operation, OpStatus, Pipeline, StageStatus, stuck_stages

__all__ = ["Supervisor"]

log = logging.getLogger("demo.supervisor")

FINISHED_MEMORY = 100_000
"""Ids of finished operations remembered, so a late revision is not counted twice."""


class Supervisor:
    """Live operations of one pipeline, kept current by a watch; stuck attempts failed."""

    def __init__(
        self,
        client: Client,
        pipeline: Pipeline,
        router: Router,
        stats: DemoStats,
        *,
        check_interval: float = 1.0,
        requeue_after: float = 15.0,
    ) -> None:
        self._client = client
        self._pipeline = pipeline
        self._router = router
        self._stats = stats
        self._check_interval = check_interval
        self._requeue_after = timedelta(seconds=requeue_after)
        self.active: dict[str, Operation] = {}
        self._finished: dict[str, None] = {}
        self.ready = asyncio.Event()

    def track(self, op: Operation) -> None:
        """Count a just-created operation as live before its first change arrives."""
        if op.id not in self._finished and op.id not in self.active:
            self.active[op.id] = op
            self._stats.in_flight = len(self.active)

    async def run(self) -> None:
        """Follow the bucket until cancelled."""
        async with self._client.watch() as changes:
            loop = asyncio.get_running_loop()
            waiter = loop.create_task(self._mark_ready(changes.initial_done))
            checker = loop.create_task(self._check_loop())
            try:
                async for change in changes:
                    self._apply(change)
            finally:
                for task in (waiter, checker):
                    task.cancel()
                await asyncio.gather(waiter, checker, return_exceptions=True)

    async def _mark_ready(self, initial_done: asyncio.Event) -> None:
        await initial_done.wait()
        self.ready.set()

    def _apply(self, change: Change) -> None:
        op = change.operation
        if op is None:
            self.active.pop(change.op_id, None)  # removed (archived) or unreadable
        elif op.pipeline != self._pipeline.name:
            return
        elif not op.done:
            if op.id not in self._finished:
                current = self.active.get(op.id)
                if current is None or current.revision < op.revision:
                    self.active[op.id] = op
        else:
            self.active.pop(op.id, None)
            if not change.initial and op.id not in self._finished:
                self._finished[op.id] = None
                if len(self._finished) > FINISHED_MEMORY:
                    del self._finished[next(iter(self._finished))]
                if op.status is OpStatus.SUCCEEDED:
                    self._stats.succeeded += 1
                elif op.status is OpStatus.FAILED:
                    self._stats.failed += 1
                else:
                    self._stats.cancelled += 1
        self._stats.in_flight = len(self.active)

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            await self.check()

    async def check(self) -> None:
        """One pass over the live operations: fail stuck attempts, re-queue idle work."""
        now = datetime.now(UTC)
        for op in list(self.active.values()):
            try:
                for stuck in stuck_stages(op, self._pipeline, now):
                    await self._unstick(op, stuck.stage, stuck.reason)
                if now - op.updated_at > self._requeue_after:
                    await self._router.follow(op)
            except (KvstateError, QueueError) as exc:
                log.warning("supervising %s: %s", op.id, exc)

    async def _unstick(self, op: Operation, stage: str, reason: str) -> None:
        attempt = op.stage(stage).attempt
        result = await self._client.fail(
            op.id,
            stage,
            f"stuck: {reason}",
            retryable=True,
            code="stuck",
            worker="supervisor",
            attempt=attempt,
            event_id=f"{op.id}.{stage}.{attempt}.stuck",
        )
        self._stats.record(result.outcome)
        if result.applied:
            self._stats.stuck += 1
            log.info("%s: attempt %d of %s was stuck (%s)", op.id, attempt, stage, reason)
            if result.operation.stage(stage).status is StageStatus.RETRYING:
                self._stats.retries += 1
        await self._router.follow(result.operation, stage)
