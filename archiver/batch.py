"""The batch of work for one PostgreSQL transaction, and the size-or-time buffer that fills it.

``WriteBatch`` holds rows and dead letters and the feed messages to acknowledge once
they are committed. ``BatchBuffer`` is the one place that decides when a batch goes to
the writer: when it holds ``max_size`` messages, when its oldest message waited
``max_wait`` seconds, or (burst mode) whenever the writer is idle; leaving its ``async
with`` block hands over what it holds and waits until everything is written. It never
requeues in memory: a batch the writer could not commit is nak'ed and JetStream
delivers it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Self

from archiver.classify import Kind
from archiver.rows import ArchiveRow, row_for
from archiver.store import DeadLetter
from archiver.writer import Writer
from kvstate.codec import decode_operation
from kvstate.errors import CorruptValue
from kvstate.feed import FeedMessage

__all__ = ["BatchBuffer", "WriteBatch"]

_BURST_POLL = 0.01
"""burst mode: how long an empty fetch waits before the run checks whether it is done"""
_MIN_POLL = 0.01


@dataclass
class WriteBatch:
    """Rows and dead letters for one transaction, and the messages to acknowledge after it."""

    opened: float
    """loop time of the first message"""
    source: int = 0
    """the bucket incarnation the messages came from (``ArchiveStore.register_source``)"""
    messages: list[FeedMessage] = field(default_factory=list)
    rows: list[ArchiveRow] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    finished: list[tuple[str, int, float]] = field(default_factory=list)
    """(operation id, revision, finished_at as a timestamp) of each row"""

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: FeedMessage, value: bytes, archived_at: datetime) -> Kind:
        """Decode ``value`` (the message's, maybe a finished operation) into a row or a dead letter.

        RUNNING when it turns out not to be finished (then nothing is kept).
        """
        key, revision = message.key, message.revision
        try:
            op = decode_operation(key, revision, value)
        except CorruptValue as exc:
            self.messages.append(message)
            self.letters.append(DeadLetter(key, revision, value, exc.detail))
            return Kind.CORRUPT
        if not op.done:
            return Kind.RUNNING
        self.messages.append(message)
        self.rows.append(row_for(op, archived_at, self.source))
        self.finished.append((op.id, op.revision, (op.finished_at or op.updated_at).timestamp()))
        return Kind.FINISHED


class BatchBuffer:
    """Fills batches and hands them to ``writer`` by size, age or (``burst``) idleness.

    ``async with BatchBuffer(writer, ...) as batches``: on a clean exit what is held is
    handed over and every batch written (a write that failed raises); after an error
    nothing more is handed over.
    """

    def __init__(
        self,
        writer: Writer,
        *,
        max_size: int,
        max_wait: float,
        burst: bool,
        source: int,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._writer = writer
        self._max_size = max_size
        self._max_wait = max_wait
        self._burst = burst
        self._clock = clock or asyncio.get_running_loop().time
        self._source = source
        self._batch = WriteBatch(self._clock(), source)

    def __len__(self) -> int:
        return len(self._batch)

    def wait_time(self) -> float:
        """How long the next fetch may wait for messages: until the batch is due, at most."""
        if self._burst:
            return _BURST_POLL
        if self._batch:
            return max(self._batch.opened + self._max_wait - self._clock(), _MIN_POLL)
        return max(1.0, self._max_wait)

    async def add(self, message: FeedMessage, value: bytes, archived_at: datetime) -> Kind:
        """Sort a value that may be finished into the batch; a full batch goes to the writer at once."""
        batch = self._batch
        if not batch:
            batch.opened = self._clock()
        kind = batch.add(message, value, archived_at)
        if kind is not Kind.RUNNING and len(batch) >= self._max_size:
            await self.hand_over()
        return kind

    async def flush_if_due(self) -> bool:
        """Hand the batch over if it is full, old enough, or (burst) the writer is idle; True if it was."""
        batch = self._batch
        if batch and (
            len(batch) >= self._max_size
            or self._clock() - batch.opened >= self._max_wait
            or (self._burst and self._writer.idle)  # burst: keep the writer busy
        ):
            await self.hand_over()
            return True
        return False

    async def hand_over(self) -> None:
        """Queue the batch for the writer (waits while one is written and another queued) and start a new one."""
        await self._writer.submit(self._batch)
        self._batch = WriteBatch(self._clock(), self._source)

    async def restart(self, source: int) -> None:
        """Write everything held, then fill batches for the bucket incarnation ``source``."""
        await self.drain()
        self._source = source
        self._batch = WriteBatch(self._clock(), source)

    async def drain(self) -> None:
        """Hand over what is held and wait until every batch is written."""
        if self._batch:
            await self.hand_over()
        await self._writer.finish()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:  # stopping: write what was fetched (or nak it if PostgreSQL refuses)
            await self.drain()
