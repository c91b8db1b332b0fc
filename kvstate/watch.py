"""Watching the bucket: an async iterator of operation changes that survives reconnects.

nats-py's ordered consumer re-creates itself after a sequence gap or missed heartbeats.
On top of that, this watcher remembers the last stream sequence it delivered and, if the
subscription dies (for example the server restarted and forgot the ephemeral consumer
before nats-py noticed), subscribes again from the next sequence: no gaps, and revisions
it already delivered are filtered out, so no duplicates either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from kvstate._kv import KvEntry, KvStore
from kvstate.backoff import Backoff
from kvstate.codec import decode_operation
from kvstate.errors import ClientClosedError, CorruptValue, KvstateError
from kvstate.keys import OPERATION_PREFIX, operation_id_from_key
from kvstate.model import Operation
from kvstate.tasks import cancel_and_wait

__all__ = ["Change", "Watcher"]

log = logging.getLogger("kvstate.watch")

_PROBE_TIMEOUT = 2.0
"""seconds the supervisor waits for the consumer's info, or for a new consumer, before trying again"""
_RESUBSCRIBE_BACKOFF = Backoff(first=0.2, cap=2.0)
_RELEASE_WAIT = 3.0
"""seconds stop() waits for the consumers it deletes (the server may be down)"""


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one operation key.

    ``operation`` is None when the key was removed (``deleted``) or holds a value that
    is not an operation (``error``, only delivered with ``include_corrupt=True``).
    ``initial`` marks the changes that replay the bucket's state when the watch starts;
    ``last_initial`` the last of them.
    """

    op_id: str
    revision: int
    operation: Operation | None
    deleted: bool = False
    error: CorruptValue | None = None
    initial: bool = False
    last_initial: bool = False


class Watcher:
    """Async iterator of Changes. Use as ``async with client.watch() as changes``."""

    def __init__(
        self,
        store: KvStore,
        *,
        op_id: str | None = None,
        include_existing: bool = True,
        include_corrupt: bool = False,
        queue_size: int = 10_000,
        check_interval: float = 2.0,
        on_stop: Callable[[Watcher], None] | None = None,
    ) -> None:
        self._store = store
        self._pattern = OPERATION_PREFIX + (op_id if op_id is not None else "*")
        self._include_existing = include_existing
        self._include_corrupt = include_corrupt
        self._queue: asyncio.Queue[Change | BaseException | object] = asyncio.Queue(queue_size)
        self._check_interval = check_interval
        self._last_seq = 0
        self._sub: JetStreamContext.PushSubscription | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._replaying = include_existing
        """True until the last replayed message has arrived"""
        self._queued = 0
        """changes put in the queue"""
        self._taken = 0
        """changes handed out by __anext__"""
        self._replay_queued: int | None = None
        """how many of the queued changes belong to the replay, once its last message arrived"""
        self._initial_done = asyncio.Event()
        self._closed = False
        self._on_stop = on_stop
        self.resubscribes = 0
        self._releases: set[asyncio.Task[None]] = set()
        self._probe_timeout = min(_PROBE_TIMEOUT, store.timeout)

    @property
    def initial_done(self) -> asyncio.Event:
        """Set once the consumer has taken the last replayed change (or at once when there is none).

        Set as ``__anext__`` hands out the change marked ``last_initial``, so a task waiting
        for it runs only after the consumer's next await: with ``async for`` that is once
        the consumer applied the change and asked for the next one.
        """
        return self._initial_done

    async def start(self) -> Self:
        start_seq = None
        if not self._include_existing:
            info = await self._store.info()
            start_seq = info.state.last_seq + 1
            self._last_seq = info.state.last_seq
            self._initial_done.set()
        await self._subscribe(start_seq)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self

    async def _subscribe(self, start_seq: int | None, timeout: float | None = None) -> None:
        sub = await self._store.subscribe(self._pattern, self._on_message, start_sequence=start_seq, timeout=timeout)
        self._sub = sub
        if start_seq is None and self._replaying:
            info = await sub.consumer_info()
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                self._replay_ended()  # nothing to replay: no message will come to say so

    async def _on_message(self, msg: Msg) -> None:
        entry = self._store.decode_message(msg)
        if entry.revision <= self._last_seq:
            return  # already delivered before a resubscribe
        initial = self._replaying
        last = initial and msg.metadata.num_pending == 0
        change = self._change(entry, initial, last)
        if change is not None:
            # A resubscribe cancels a put blocked on a full queue: the sequence counts as
            # delivered only once the change is queued, so the new consumer sends it again.
            await self._queue.put(change)
            self._queued += 1
        self._last_seq = entry.revision
        if last:
            self._replay_ended()

    def _replay_ended(self) -> None:
        """The last replayed message arrived: ``initial_done`` waits until the consumer took every replayed change."""
        self._replaying = False
        self._replay_queued = self._queued
        if self._taken >= self._queued:
            self._initial_done.set()  # taken already (the last replayed value was skipped), or nothing to take

    def _change(self, entry: KvEntry, initial: bool, last: bool) -> Change | None:
        op_id = operation_id_from_key(entry.key) or entry.key
        if entry.value is None:
            return Change(op_id, entry.revision, None, deleted=True, initial=initial, last_initial=last)
        try:
            op = decode_operation(entry.key, entry.revision, entry.value)
        except CorruptValue as exc:
            log.warning("skipping corrupt value in watch: %s", exc)
            if not self._include_corrupt:
                return None
            return Change(op_id, entry.revision, None, error=exc, initial=initial, last_initial=last)
        return Change(op_id, entry.revision, op, initial=initial, last_initial=last)

    async def _supervise(self) -> None:
        """Resubscribe from the last delivered sequence when the consumer is gone or stuck.

        Gone: the server restarted and forgot the ephemeral consumer before nats-py
        noticed. Stuck: nats-server can leave a consumer created while keys were being
        purged with messages pending and nothing delivered; two checks without progress
        (while this watcher is not itself the one holding delivery back) count as stuck.
        """
        progress = -1
        while not self._closed:
            await asyncio.sleep(self._check_interval)
            if self._store.nc.is_closed:
                return
            if not self._store.nc.is_connected:
                continue
            sub = self._sub
            if sub is None:
                continue
            try:
                info = await self._store.consumer_alive(sub, self._probe_timeout)
            except Exception as exc:  # noqa: BLE001 - any failure means: resubscribe
                await self._resubscribe(sub, f"consumer lost ({exc})")
                progress = -1
                continue
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            stuck = (info.num_pending or 0) > 0 and delivered == progress and not self._queue.full()
            progress = delivered
            if stuck:
                await self._resubscribe(sub, f"consumer stuck with {info.num_pending} pending")
                progress = -1

    async def _resubscribe(self, sub: JetStreamContext.PushSubscription, reason: str) -> None:
        log.info("watch %s; resubscribing from sequence %d", reason, self._last_seq + 1)
        with contextlib.suppress(Exception):  # the old subscription may already be gone
            await sub.unsubscribe()
        # Its consumer would stay on the server until its inactivity threshold; delete it in
        # the background (its node may be the one that is down).
        task = asyncio.get_running_loop().create_task(self._store.release_consumer(sub))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        # While a replicated stream elects its leader (4-9 s after one died) no consumer can be
        # created: try again at once with short timeouts, not only at the next check, so changes
        # flow again within a second or two of the election.
        for tries in itertools.count(1):
            if self._closed or self._store.nc.is_closed:
                return
            try:
                await self._subscribe(self._last_seq + 1, timeout=self._probe_timeout)
            except KvstateError as again:
                if tries == 1 or tries % 10 == 0:
                    log.warning("watch resubscribe failed (try %d), trying again: %s", tries, again)
                await asyncio.sleep(_RESUBSCRIBE_BACKOFF.delay(tries))
                continue
            self.resubscribes += 1
            return

    async def stop(self) -> None:
        """Stop delivering changes and release the consumer."""
        if self._closed:
            return
        self._closed = True
        if self._on_stop is not None:
            self._on_stop(self)
        if self._supervisor is not None:
            await cancel_and_wait([self._supervisor])
        if self._sub is not None and not self._store.nc.is_closed:
            # Not left for the inactivity threshold; but stopping never waits on the server
            # for long (asyncio.wait returns at its timeout, whatever the task does).
            release = asyncio.get_running_loop().create_task(self._store.release_consumer(self._sub))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=_RELEASE_WAIT)
        with contextlib.suppress(asyncio.QueueFull):  # __anext__ stops once the queue is drained
            self._queue.put_nowait(StopAsyncIteration())

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        if self._supervisor is None:  # never started: nothing would ever arrive
            raise ClientClosedError("a watcher delivers changes inside `async with client.watch() as changes:`")
        item = await self._queue.get()
        if isinstance(item, StopAsyncIteration):
            raise item
        assert isinstance(item, Change)
        self._taken += 1
        if self._replay_queued is not None and self._taken >= self._replay_queued:
            self._initial_done.set()
        return item

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
