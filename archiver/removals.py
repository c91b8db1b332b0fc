"""Removing archived operations from the bucket: a heap of due times and one remover task.

The one rule for removals, after a commit and in the sweep alike: only an (id,
revision) the archive holds at exactly that revision is removed, revision-checked, so an
operation that changed after its snapshot stays (and is archived again when it
finishes again). Whatever is due goes out as one batch, ``client.remove_many``:
pipelined removals whose acks come back on one reply subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from archiver.accounting import Accounting
from kvstate.client import Client
from kvstate.errors import ConflictError, KvstateError

__all__ = ["REMOVE_BATCH", "Removals"]

log = logging.getLogger("archiver")

REMOVE_BATCH = 4096
"""most removals sent as one pipelined batch"""


class Removals:
    """Removals scheduled by due time, sent by ``run`` (the remover task) or at once by ``remove``.

    ``before_remove(op_id, revision)`` (a test hook) runs just before each removal.
    """

    def __init__(
        self,
        client: Client,
        accounting: Accounting,
        *,
        marker_ttl: float,
        before_remove: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._accounting = accounting
        self._marker_ttl = marker_ttl
        self._before_remove = before_remove
        self._heap: list[tuple[float, str, int]] = []
        """(due time, operation id, archived revision); tuples order cheaply"""
        self._added = asyncio.Event()
        self._removing = False

    def schedule(self, op_id: str, revision: int, due: float) -> None:
        """Remove ``op_id`` at ``revision`` once the wall-clock time ``due`` has passed."""
        heapq.heappush(self._heap, (due, op_id, revision))
        self._added.set()

    @property
    def pending(self) -> bool:
        """True while a removal is under way or overdue."""
        return self._removing or bool(self._heap and self._heap[0][0] <= time.time())

    async def run(self, active: Callable[[], bool]) -> None:
        """The remover (while ``active()``): whatever is due goes out as one pipelined batch, then the next."""
        while active():
            self._added.clear()
            due = self._take_due(time.time())
            if due:
                self._removing = True
                try:
                    await self.remove(due)
                finally:
                    self._removing = False
                continue
            timeout = self._heap[0][0] - time.time() if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                    await self._added.wait()

    def _take_due(self, now: float) -> list[tuple[str, int]]:
        """Up to REMOVE_BATCH removals whose grace period is over, oldest first."""
        heap = self._heap
        due: list[tuple[str, int]] = []
        while heap and heap[0][0] <= now and len(due) < REMOVE_BATCH:
            _, op_id, revision = heapq.heappop(heap)
            due.append((op_id, revision))
        return due

    async def remove(self, items: Sequence[tuple[str, int]]) -> int:
        """Remove ``items`` (revision-checked), REMOVE_BATCH at a time; returns how many were removed.

        Failures are logged and counted, never raised: the next sweep retries them.
        """
        total = 0
        for start in range(0, len(items), REMOVE_BATCH):
            chunk = list(items[start : start + REMOVE_BATCH])
            if self._before_remove is not None:
                for op_id, revision in chunk:
                    await self._before_remove(op_id, revision)
            try:
                results = await self._client.remove_many(chunk, marker_ttl=self._marker_ttl)
            except KvstateError as exc:  # the reply subscription could not even be set up
                self._accounting.nats_error()
                log.warning("removing %d operations failed (the next sweep retries): %s", len(chunk), exc)
                continue
            removed = conflicts = 0
            for (op_id, revision), result in zip(chunk, results, strict=True):
                if isinstance(result, int):
                    removed += 1
                elif isinstance(result, ConflictError):
                    # Changed after the snapshot (reopened, updated) or already removed by another
                    # instance: keep it; a newer terminal revision is archived and removed later.
                    conflicts += 1
                    log.info("not removing %s: it changed after revision %d", op_id, revision)
                else:
                    self._accounting.nats_error()
                    log.warning(
                        "removing %s at revision %d failed (the next sweep retries): %s", op_id, revision, result
                    )
            self._accounting.removals(removed, conflicts)
            total += removed
        return total
