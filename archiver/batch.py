"""A size-or-time batch buffer, used as an async context manager.

    async with ArchiveBatch(max_size=500, max_wait=0.2, flush=handle) as batch:
        for msg in await consumer.fetch(...):
            await batch.add(msg)

``handle(items)`` runs when the buffer holds ``max_size`` items, when its oldest item
waited ``max_wait`` seconds, on ``flush()`` and on a clean exit. Flushes never overlap
and ``add`` waits while one runs, so at most ``max_size`` items are held. Unlike
pgqueuer's TimedOverflowBuffer nothing is ever put back: when ``handle`` cannot store
a batch it leaves the messages unacknowledged (or naks them) and JetStream delivers
them again. Leaving the context on an exception drops what is buffered, unacknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = ["ArchiveBatch"]

T = TypeVar("T")


class ArchiveBatch(Generic[T]):
    """Collects items and hands them to ``flush`` by size or by age."""

    def __init__(self, *, max_size: int, max_wait: float, flush: Callable[[list[T]], Awaitable[None]]) -> None:
        if max_size < 1 or max_wait <= 0:
            raise ValueError("max_size must be >= 1 and max_wait > 0")
        self.max_size = max_size
        self.max_wait = max_wait
        self._handle = flush
        self._items: list[T] = []
        self._oldest: float | None = None
        self._lock = asyncio.Lock()
        self._added = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    async def __aenter__(self) -> Self:
        self._timer = asyncio.create_task(self._flush_when_old(), name="archive-batch-timer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if exc_type is None:
            await self.flush()
        else:
            self._items = []

    async def add(self, item: T) -> None:
        """Buffer ``item``; flush first if the buffer is full."""
        self._raise_failure()
        self._items.append(item)
        if self._oldest is None:
            self._oldest = asyncio.get_running_loop().time()
            self._added.set()
        if len(self._items) >= self.max_size:
            await self.flush()

    async def flush(self) -> None:
        """Hand everything buffered to ``flush`` now (waits for a flush under way)."""
        self._raise_failure()
        async with self._lock:
            items, self._items, self._oldest = self._items, [], None
            self._added.clear()
            if items:
                await self._handle(items)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def _flush_when_old(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._added.wait()
            oldest = self._oldest
            if oldest is None:
                self._added.clear()
                continue
            delay = oldest + self.max_wait - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self._oldest != oldest:
                    continue  # flushed (and maybe refilled) meanwhile
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - surfaced by the next add() or flush()
                self._failure = exc
                return
