"""The writer: one batch at a time, in a task of its own; commit, then acknowledge, then schedule removals.

``submit`` returns as soon as the batch is queued (one more may wait), so the fetch loop
goes on sorting while PostgreSQL writes. Each batch is one transaction
(``ArchiveStore.write``). After the commit every message of the batch is acknowledged,
and each (id, revision) the archive holds at exactly that revision is scheduled for
removal at ``finished_at + grace_period``. When PostgreSQL refuses the batch, its
messages are nak'ed with a backoff delay and nothing is retried in memory: JetStream
delivers them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from archiver.accounting import Accounting
from archiver.errors import ArchiveUnavailable
from archiver.removals import Removals
from archiver.store import ArchiveStore
from kvstate.backoff import Backoff
from kvstate.errors import KvstateError
from kvstate.feed import FeedMessage
from kvstate.tasks import cancel_and_wait

if TYPE_CHECKING:
    from archiver.batch import WriteBatch

__all__ = ["Writer", "acknowledge"]

log = logging.getLogger("archiver")

REFUSED_BACKOFF = Backoff(first=0.25, cap=5.0)
"""the nak delay of a batch PostgreSQL refused, and the writer's pause after it, by refusals in a row"""


async def acknowledge(messages: Sequence[FeedMessage], accounting: Accounting) -> None:
    """Acknowledge ``messages``; a failure (NATS gone) is logged and counted, not raised.

    What was not acknowledged is delivered again after ack_wait: a committed row then
    comes back as a duplicate, which the guarded upsert absorbs.
    """
    if not messages:
        return
    try:
        for message in messages:
            await message.ack()
    except KvstateError as exc:
        accounting.ack_failed()
        log.warning(
            "acknowledging %d messages failed (delivered again after ack_wait, absorbed as duplicates): %s",
            len(messages),
            exc,
        )
        return
    accounting.progressed()


class Writer:
    """Writes batches one at a time, in order, with one more batch queued.

    A write that raises stops the writer: the next ``check``, ``submit`` or ``finish``
    raises it. ``after_commit(messages)`` (a test hook) runs between commit and acks.
    """

    def __init__(
        self,
        store: ArchiveStore,
        accounting: Accounting,
        removals: Removals,
        *,
        grace_period: float,
        sleep: Callable[[float], Awaitable[None]],
        after_commit: Callable[[Sequence[FeedMessage]], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._accounting = accounting
        self._removals = removals
        self._grace_period = grace_period
        self._sleep = sleep
        self._after_commit = after_commit
        self._refusals = 0
        """batches refused in a row"""
        self._queue: asyncio.Queue[WriteBatch] = asyncio.Queue(maxsize=1)
        self._busy = False
        self.task = asyncio.create_task(self._run(), name="archiver-writer")

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        return not self._busy and self._queue.empty()

    def check(self) -> None:
        """Raise what a write raised, if one did."""
        if self.task.done():
            self.task.result()

    async def submit(self, batch: WriteBatch) -> None:
        """Queue ``batch``; wait while another one is already queued."""
        self.check()
        put = asyncio.ensure_future(self._queue.put(batch))
        if not put.done():
            await asyncio.wait((put, self.task), return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self.check()
        put.result()

    async def finish(self) -> None:
        """Wait until everything submitted is written."""
        join = asyncio.ensure_future(self._queue.join())
        await asyncio.wait((join, self.task), return_when=asyncio.FIRST_COMPLETED)
        if not join.done():
            join.cancel()
        self.check()

    async def close(self) -> None:
        """Stop the writer (a write under way is cancelled; JetStream delivers its messages again)."""
        await cancel_and_wait([self.task])

    async def _run(self) -> None:
        while True:
            batch = await self._queue.get()
            self._busy = True
            try:
                await self._write(batch)
            finally:
                self._busy = False
                self._queue.task_done()

    async def _write(self, batch: WriteBatch) -> None:
        """One batch: write it in one transaction, then ack; nak everything on failure."""
        started = time.perf_counter()
        messages = batch.messages
        try:
            result = await self._store.write(batch.rows, batch.letters)
        except ArchiveUnavailable as exc:
            await self._refused(messages, exc)
            return
        self._refusals = 0
        self._accounting.database_up(True)
        self._accounting.progressed()
        if self._after_commit is not None:
            await self._after_commit(messages)
        await acknowledge(messages, self._accounting)
        # Only what the archive holds at exactly that revision leaves the bucket: a row the
        # guarded upsert refused (a newer revision is archived) stays where it is.
        archived, source, grace = result.archived, batch.source, self._grace_period
        schedule = self._removals.schedule
        for op_id, revision, finished_at in batch.finished:
            if (op_id, source, revision) in archived:
                schedule(op_id, revision, finished_at + grace)
        self._accounting.committed(len(messages), result, len(batch.letters), time.perf_counter() - started)

    async def _refused(self, messages: list[FeedMessage], exc: ArchiveUnavailable) -> None:
        self._accounting.refused()
        self._refusals += 1
        delay = REFUSED_BACKOFF.delay(self._refusals)
        log.warning("batch of %d messages not archived, delivered again in %.2fs: %s", len(messages), delay, exc)
        try:
            for message in messages:
                await message.nak(delay=delay)
        except KvstateError as nak_error:  # unacked messages come back after ack_wait anyway
            log.warning("nak failed (messages return after ack_wait): %s", nak_error)
        await self._sleep(delay)
