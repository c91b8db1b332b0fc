"""The one watcher per process that feeds the index, and the broadcaster of change signals.

``IndexFeed`` runs ``client.watch(include_existing=True, include_corrupt=True)`` and
applies every change to the ``OperationIndex``; kvstate's watcher already survives NATS
restarts (it resubscribes from the last sequence it delivered: no gaps, no duplicates).
A ticker marks stuck stages and notices connection loss and recovery. Should the watch
itself end or fail, the feed opens a new one and replays the bucket into an emptied
index: ``ready`` is cleared for that replay (pages show "Loading", ``/healthz`` says 503)
and set again, with the age order sorted, once the replay is in.

``Broadcaster`` sends *signals*, not data, to the browsers' server-sent-event streams:
"something changed, re-fetch your fragment". It is debounced (at most one signal per
``debounce`` seconds), gives each client a small bounded queue (a slow client misses
signals it would not need anyway: one pending signal is as good as ten) and sends
keepalive comments so proxies keep idle streams open.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable

from litestar.response import ServerSentEventMessage

from dashboard.index import OperationIndex
from kvstate import Change, Client, CorruptValue, KvstateError, UnknownPipeline, Watcher
from kvstate.tasks import cancel_and_wait

__all__ = ["Broadcaster", "IndexFeed", "running"]

log = logging.getLogger("dashboard.feed")

_STOP = "stop"
_CHANGE = "change"


class Broadcaster:
    """Debounced change signals fanned out to bounded per-client queues."""

    def __init__(self, debounce: float = 0.25, queue_size: int = 4, keepalive: float = 15.0) -> None:
        self.debounce = debounce
        self.queue_size = queue_size
        self.keepalive = keepalive
        self._clients: set[asyncio.Queue[str]] = set()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.sent = 0
        self.dropped = 0

    @property
    def clients(self) -> int:
        """Connected event streams."""
        return len(self._clients)

    def start(self) -> None:
        """Start the debounce loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-broadcaster")

    def notify(self) -> None:
        """Something changed: signal every client soon (many calls within the debounce collapse into one)."""
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            for queue in list(self._clients):
                try:
                    queue.put_nowait(_CHANGE)
                    self.sent += 1
                except asyncio.QueueFull:
                    self.dropped += 1

    def subscribe(self) -> asyncio.Queue[str]:
        """A new client queue (``unsubscribe`` it when the client leaves)."""
        queue: asyncio.Queue[str] = asyncio.Queue(self.queue_size)
        if self._stopped:
            queue.put_nowait(_STOP)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        """Forget a client queue."""
        self._clients.discard(queue)

    async def stream(self, max_age: float = 300.0) -> AsyncIterator[ServerSentEventMessage]:
        """Server-sent events for one client: ``change`` signals and keepalive comments.

        Ends after ``max_age`` seconds (the browser's EventSource reconnects by itself), so
        no stream outlives a deploy for long, and at ``stop()``.
        """
        queue = self.subscribe()
        deadline = time.monotonic() + max_age
        try:
            yield ServerSentEventMessage(data=None, comment="connected", retry=2000)
            while time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(min(self.keepalive, max(0.0, deadline - time.monotonic()))):
                        item = await queue.get()
                except TimeoutError:
                    yield ServerSentEventMessage(data=None, comment="keepalive")
                    continue
                if item == _STOP:
                    return
                yield ServerSentEventMessage(event=_CHANGE, data="1")
        finally:
            self.unsubscribe(queue)

    async def stop(self) -> None:
        """End every stream and the debounce loop."""
        self._stopped = True
        for queue in list(self._clients):
            while True:
                try:
                    queue.put_nowait(_STOP)
                    break
                except asyncio.QueueFull:
                    queue.get_nowait()  # make room: the stop matters more than a pending change
        if self._task is not None:
            await cancel_and_wait([self._task])


class IndexFeed:
    """Runs the process's one watcher into the index and notifies the broadcaster."""

    def __init__(
        self,
        client: Client,
        index: OperationIndex,
        broadcaster: Broadcaster,
        *,
        clock: Callable[[], float] = time.time,
        tick: float = 0.5,
    ) -> None:
        self.client = client
        self.index = index
        self.broadcaster = broadcaster
        self.clock = clock
        self.tick_interval = tick
        self.ready = asyncio.Event()  # set while the index holds a complete replay of the bucket
        self.watcher: Watcher | None = None  # the watch feeding the index now
        self.connected = True
        self.disconnected_since: float | None = None
        self.restarts = 0
        self.corrupt_seen = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load the pipelines, then start watching and ticking."""
        try:
            for pipeline in await self.client.pipelines():
                self.index.set_pipeline(pipeline)
        except KvstateError as exc:
            log.warning("could not load pipelines yet: %s", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_forever(), name="dashboard-watch"),
            loop.create_task(self._tick_forever(), name="dashboard-tick"),
        ]

    async def stop(self) -> None:
        """Stop watching (the client stops its watcher too when it closes)."""
        await cancel_and_wait(self._tasks)

    @property
    def running(self) -> bool:
        """True while the watch and tick tasks are alive."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def _watch_forever(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except KvstateError as exc:
                log.warning("watch failed (%s); starting again in 1s", exc)
            except Exception:
                log.exception("watch crashed; starting again in 1s")
            self.restarts += 1
            await asyncio.sleep(1.0)

    async def _watch_once(self) -> None:
        async with self.client.watch(include_existing=True, include_corrupt=True) as changes:
            # The index is emptied only once a new watch is open, so a watch that cannot be
            # opened (NATS away) leaves the last figures on the pages.
            self.watcher = changes
            self.ready.clear()
            self.index.reset()
            self.index.begin_bulk()
            self.broadcaster.notify()
            replaying = True
            while True:
                if replaying and changes.initial_done.is_set():
                    upcoming = asyncio.ensure_future(_next(changes))
                    try:
                        await asyncio.sleep(0)  # see _next: a change already queued is taken now
                    except asyncio.CancelledError:
                        upcoming.cancel()
                        raise
                    if not upcoming.done():  # nothing was queued: the whole replay is applied
                        self._replayed()
                        replaying = False
                    change = await upcoming
                else:
                    change = await _next(changes)
                if change is None:
                    return
                await self._apply(change)
                if not replaying:
                    self.broadcaster.notify()

    def _replayed(self) -> None:
        """The (re)play is in: sort the age order once and mark the index ready."""
        self.index.end_bulk()
        # The replayed index is long-lived: move it out of the cyclic collector's way, so
        # collections triggered by request handling do not walk every summary
        # (render time stays flat in the bucket's size; summaries hold no cycles, so
        # reference counting still frees them when operations go).
        gc.freeze()
        self.ready.set()
        self.broadcaster.notify()

    async def _apply(self, change: Change) -> None:
        op = change.operation
        if op is not None and op.pipeline not in self.index.pipelines:
            try:
                self.index.set_pipeline(await self.client.pipeline(op.pipeline))
            except (UnknownPipeline, CorruptValue) as exc:
                log.warning("operation %s names pipeline %r that cannot be read: %s", op.id, op.pipeline, exc)
            except KvstateError as exc:
                log.warning("could not read pipeline %r: %s", op.pipeline, exc)
        if change.error is not None:
            self.corrupt_seen += 1
        self.index.apply(change, self.clock())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            changed = self.index.tick(self.clock())
            connected = self.client.connected
            if connected != self.connected:
                self.connected = connected
                self.disconnected_since = None if connected else self.clock()
                log.warning("NATS %s", "reachable again" if connected else "unreachable")
                changed = True
            if changed:
                self.broadcaster.notify()


async def _next(changes: Watcher) -> Change | None:
    """The next change, or None once the watch has ended.

    kvstate sets ``initial_done`` when the last replayed value *reaches* the watcher,
    which can be long before the feed has applied the queued replay. So once it is set,
    the feed runs ``_next`` as a task and yields once: on a watcher with changes queued
    the task completes in its first step, before the feed resumes; when it has not
    completed, the queue was empty and the whole replay is in the index.
    """
    try:
        return await anext(changes)
    except StopAsyncIteration:
        return None


@contextlib.asynccontextmanager
async def running(feed: IndexFeed, broadcaster: Broadcaster) -> AsyncIterator[None]:
    """Start the broadcaster and the feed; stop them in reverse order."""
    broadcaster.start()
    try:
        await feed.start()
        try:
            yield
        finally:
            await feed.stop()
    finally:
        await broadcaster.stop()
