"""The archiver: consumes operation changes, snapshots finished operations, removes them later.

    async with Archiver(ArchiverSettings.from_env(os.environ)) as archiver:
        counts = await archiver.run(burst=True)   # everything pending, then return
        await archiver.run()                      # until stop() (the CLI wires SIGTERM to it)

The lifecycle and the fetch loop; each step has a module of its own (docs/archive.md):

1. pull messages from the durable change feed (``kvstate.feed.ChangeFeed``) and sort
   them as they arrive (``archiver.classify``): removal markers and operations not
   finished yet are acked at once; finished operations become rows and undecodable
   values dead letters in a size-or-time batch (``archiver.batch.BatchBuffer``);
2. the writer task (``archiver.writer``) writes one batch at a time while the next ones
   fill: one transaction, then the acks, then the removals are scheduled; a refused
   batch is nak'ed with a backoff delay and JetStream delivers it again;
3. the remover task (``archiver.removals``) sends what is due as one pipelined batch of
   revision-checked removals;
4. a periodic sweep (``archiver.sweep``; in a burst, one at the end) removes finished
   operations the archive holds at their revision; counts live in ``archiver.accounting``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from archiver.accounting import Accounting, ArchiveCounts
from archiver.batch import BatchBuffer
from archiver.classify import Kind, needs_decoding
from archiver.errors import ArchiveUnavailable
from archiver.metrics import ArchiverMetrics, MetricsServer
from archiver.removals import Removals
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore
from archiver.sweep import sweep, sweep_periodically
from archiver.writer import Writer, acknowledge
from kvstate.backoff import Backoff
from kvstate.client import Client
from kvstate.errors import BucketNotFound, ConnectionLostError, KvstateError
from kvstate.feed import ChangeFeed, FeedMessage, FeedState

__all__ = ["ArchiveCounts", "Archiver", "ArchiverHooks"]

log = logging.getLogger("archiver")

RETRY = Backoff(first=0.2, cap=5.0)
"""between two tries to reach NATS, the bucket or PostgreSQL"""
_MIN_ACK_PENDING = 2000
_MIN_FETCH = 1000
_MONITOR_EVERY = 5.0
"""most seconds between two reads of the consumer's lag by the monitor task"""
_TASK_STOP = 10.0
"""most seconds the end of a run waits for a cancelled helper task (nats-py's wait_for can swallow a cancel)"""


@dataclass(frozen=True)
class ArchiverHooks:
    """Test hooks: ``after_commit(messages)`` runs between the commit and the acks,
    ``before_remove(op_id, revision)`` just before a removal."""

    after_commit: Callable[[Sequence[FeedMessage]], Awaitable[None]] | None = None
    before_remove: Callable[[str, int], Awaitable[None]] | None = None


class Archiver:
    """Snapshots finished operations from the bucket into PostgreSQL, exactly once per revision.

    An async context manager: entering starts the metrics endpoint, connects to NATS and
    opens the bucket (waiting while either is missing; it never creates the bucket), applies
    the migrations (retrying while PostgreSQL is down); leaving closes them in reverse order.
    """

    def __init__(self, settings: ArchiverSettings, *, hooks: ArchiverHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or ArchiverHooks()
        self.metrics = ArchiverMetrics()
        self.accounting = Accounting(self.metrics)
        self._stack = AsyncExitStack()
        self._client: Client | None = None
        self._store: ArchiveStore | None = None
        self._feed: ChangeFeed | None = None
        self._removals: Removals | None = None
        self._server: MetricsServer | None = None
        self._stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[object]] = {}
        """the run's tasks (writer, remover, sweeper, monitor), for /healthz"""
        self._source = 0
        """the bucket incarnation being archived (ArchiveStore.register_source)"""
        self._running = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        try:
            if self.settings.metrics_port:
                self._server = MetricsServer(
                    self.metrics, self.health, self.settings.metrics_host, self.settings.metrics_port
                )
                await self._server.start()
                self._stack.push_async_callback(self._server.close)
            self._client = await self._open_client()
            self._store = await self._open_store()
        except BaseException:
            await self._stack.aclose()
            raise
        if self._client is not None:
            self._feed = self._client.feed(
                self.settings.consumer,
                ack_wait=self.settings.ack_wait,
                max_ack_pending=max(_MIN_ACK_PENDING, 4 * self.settings.batch_size),
                stall_after=self.settings.stall_after / 3,  # acts well before /healthz reports the stall
                on_stall=self.accounting.stalled,
                description="kvstate archiver: snapshots finished operations into PostgreSQL",
            )
            self._removals = Removals(
                self._client,
                self.accounting,
                marker_ttl=self.settings.marker_ttl,
                before_remove=self.hooks.before_remove,
            )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _open_client(self) -> Client | None:
        """Open the bucket, waiting with backoff while NATS or the bucket is missing (None if stopped first).

        Never creates the bucket: with a mistyped KVSTATE_BUCKET it would otherwise archive
        an empty bucket of its own, silently, for ever.
        """
        for tries in itertools.count(1):
            if self._stopping.is_set():
                break
            try:
                return await self._stack.enter_async_context(Client(self.settings.kv, name="kvstate-archiver"))
            except (ConnectionLostError, BucketNotFound) as exc:
                self.accounting.nats_error()
                delay = RETRY.delay(tries)
                log.warning("waiting for NATS and the bucket, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
        return None

    async def _open_store(self) -> ArchiveStore | None:
        """Open the archive, retrying with backoff while PostgreSQL is unreachable (None if stopped first)."""
        for tries in itertools.count(1):
            if self._stopping.is_set():
                break
            try:
                store = await self._stack.enter_async_context(
                    ArchiveStore.open(self.settings.database_url, reader_role=self.settings.reader_role)
                )
            except ArchiveUnavailable as exc:
                self.accounting.database_up(False)
                delay = RETRY.delay(tries)
                log.warning("archive database unavailable, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
                continue
            self.accounting.database_up(True)
            return store
        return None

    def stop(self) -> None:
        """Ask ``run`` to finish its current batch and return (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping.is_set()

    @property
    def totals(self) -> ArchiveCounts:
        """Counts over every run of this archiver."""
        return self.accounting.totals

    def health(self) -> dict[str, object]:
        """What /healthz reports (``Accounting.health``): ok unless NATS or PostgreSQL is down, a task
        of the run died, or the archiver stalled for more than ARCHIVER_STALL_AFTER seconds."""
        nats_ok = self._client is not None and self._client.connected
        self.metrics.nats_up.set(1 if nats_ok else 0)
        return self.accounting.health(nats_ok, self._tasks, self.settings.stall_after)

    @property
    def client(self) -> Client:
        """The kvstate client (open while the archiver is)."""
        if self._client is None:
            raise RuntimeError("use the Archiver inside `async with`")
        return self._client

    # ------------------------------------------------------------------ the run

    async def run(self, *, burst: bool = False) -> ArchiveCounts:
        """Archive until ``stop()`` (or, with ``burst``, until nothing is pending); returns this run's counts.

        In burst mode the bucket is swept once as soon as nothing fetched waits to be
        written or removed (while the markers of the last removals still come in), and
        the run ends once that sweep is done and the consumer has nothing pending or
        awaiting acknowledgement.
        """
        counts = self.accounting.start_run()
        if self._client is None or self._store is None or self._feed is None or self._removals is None:
            return counts  # stopped before NATS, the bucket or PostgreSQL came up
        feed, removals = self._feed, self._removals
        await self._retry(feed.open)
        await self._retry(self._register_source)
        self.accounting.progressed()
        log.info(
            "archiver started: bucket=%s consumer=%s batch_size=%d batch_timeout=%.3f grace_period=%g burst=%s",
            self._client.settings.bucket,
            feed.name,
            self.settings.batch_size,
            self.settings.batch_timeout,
            self.settings.grace_period,
            burst,
        )
        self._running = True
        self._tasks = {"remover": asyncio.create_task(removals.run(self._active), name="archiver-remover")}
        if not burst:
            self._tasks["sweeper"] = asyncio.create_task(
                sweep_periodically(self.sweep, self.settings.sweep_interval, self._active), name="archiver-sweeper"
            )
        self._tasks["monitor"] = asyncio.create_task(self._monitor(feed), name="archiver-monitor")
        try:
            await self._consume(feed, self._store, removals, burst)
        finally:
            self._running = False  # the loops end by themselves should a cancel be swallowed
            helpers = [task for name, task in self._tasks.items() if name != "writer" and not task.done()]
            for task in helpers:
                task.cancel()
            if helpers:
                await asyncio.wait(helpers, timeout=_TASK_STOP)
            await feed.close()
        log.info("archiver stopped: %s", " ".join(f"{k}={v}" for k, v in counts.as_dict().items()))
        return counts

    async def _consume(self, feed: ChangeFeed, store: ArchiveStore, removals: Removals, burst: bool) -> None:
        """Fetch and sort messages while earlier batches are written (one write at a time, one more queued)."""
        accounting = self.accounting
        fetch_size = max(self.settings.batch_size, _MIN_FETCH)
        writer = Writer(
            store,
            accounting,
            removals,
            grace_period=self.settings.grace_period,
            sleep=self._sleep,
            after_commit=self.hooks.after_commit,
        )
        self._tasks["writer"] = writer.task
        generation = feed.generation
        sweeping: asyncio.Task[int] | None = None  # burst: the one sweep at the end
        # Messages delivered before this run and not acknowledged yet (an instance that
        # crashed holding them): the sweep waits until they came back and were handled.
        inherited = await self._feed_state(feed) if burst else None
        sweep_waits_for_acks = inherited is None or inherited.ack_pending > 0
        failures = 0
        try:
            async with BatchBuffer(
                writer,
                max_size=self.settings.batch_size,
                max_wait=self.settings.batch_timeout,
                burst=burst,
                source=self._source,
            ) as batches:
                while not self._stopping.is_set():
                    writer.check()  # raises what a write raised
                    try:
                        messages = await feed.fetch(fetch_size, timeout=batches.wait_time())
                    except KvstateError as exc:
                        accounting.nats_error()
                        failures += 1
                        delay = RETRY.delay(failures)
                        log.warning("fetching from NATS failed, retrying in %.1fs: %s", delay, exc)
                        await self._sleep(delay)
                        continue
                    failures = 0
                    if feed.generation != generation:
                        # The consumer was created again (deleted, or stalled): its stream may be a
                        # new incarnation of the bucket, whose rows are a source of their own.
                        await batches.drain()
                        await self._retry(self._register_source)
                        generation = feed.generation
                        await batches.restart(self._source)
                    markers = 0
                    if messages:
                        markers = await self._sort(messages, batches)
                    if await batches.flush_if_due() or not burst or batches or not writer.idle or removals.pending:
                        continue
                    # burst, nothing held, nothing being written or removed: sweep, and end when done
                    if sweeping is None and not sweep_waits_for_acks and messages and markers == len(messages):
                        # Nothing but removal markers came: sweep while the rest of them come in.
                        sweeping = asyncio.create_task(self.sweep(), name="archiver-sweep")
                    elif not messages:
                        state = await self._feed_state(feed)
                        if sweeping is None:
                            if state is not None and state.ack_pending == 0:
                                sweeping = asyncio.create_task(self.sweep(), name="archiver-sweep")
                        elif sweeping.done():
                            sweeping.result()  # raises what the sweep raised
                            if state is not None and state.pending == 0 and state.ack_pending == 0:
                                return
        finally:
            await writer.close()  # after an error: abandons what is unwritten, JetStream redelivers it
            if sweeping is not None and not sweeping.done():
                sweeping.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sweeping

    async def _sort(self, messages: list[FeedMessage], batches: BatchBuffer) -> int:
        """Put what may be finished into the batch and acknowledge the rest at once; returns the markers."""
        now = datetime.now(UTC)
        nothing_to_write: list[FeedMessage] = []
        markers = running = 0
        for message in messages:
            value = message.value
            if value is None:  # a removal marker
                nothing_to_write.append(message)
                markers += 1
                continue
            if needs_decoding(value) and await batches.add(message, value, now) is not Kind.RUNNING:
                continue
            nothing_to_write.append(message)  # not finished
            running += 1
        await acknowledge(nothing_to_write, self.accounting)
        self.accounting.acknowledged(markers, running, messages[-1].pending)
        return markers

    async def sweep(self) -> int:
        """Remove every finished operation past its grace period that the archive holds at its
        revision, from this incarnation of the bucket (``archiver.sweep``); returns how many."""
        if self._feed is None or self._store is None or self._removals is None:
            raise RuntimeError("use the Archiver inside `async with`")
        return await sweep(
            self._feed, self._store, self._removals, source=self._source, grace_period=self.settings.grace_period
        )

    # ------------------------------------------------------------------ helpers

    async def _register_source(self) -> None:
        """Find (or register) the archive's source number of this incarnation of the bucket
        (its stream's creation time, ``ChangeFeed.stream_created``)."""
        assert self._store is not None
        assert self._feed is not None
        created = await self._feed.stream_created() or datetime.fromtimestamp(0, UTC)
        bucket = self.client.settings.bucket
        source = await self._store.register_source(bucket, created)
        if source != self._source:
            log.info("archiving bucket %s (stream created %s) as source %d", bucket, created.isoformat(), source)
        self._source = source

    async def _feed_state(self, feed: ChangeFeed) -> FeedState | None:
        """The consumer's pending and unacknowledged counts (None when NATS cannot say now); updates the lag."""
        try:
            state = await feed.state()
        except KvstateError as exc:
            log.warning("cannot read the consumer state: %s", exc)
            return None
        self.accounting.feed_state(state)
        return state

    async def _monitor(self, feed: ChangeFeed) -> None:
        """Read the consumer's lag now and then, also while the fetch loop is stuck (for /healthz)."""
        every = min(_MONITOR_EVERY, self.settings.stall_after / 4)
        while self._running:
            await asyncio.sleep(every)
            await self._feed_state(feed)

    def _active(self) -> bool:
        """True while a run is under way (its helper tasks loop while it is)."""
        return self._running

    async def _retry(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` until it gets through NATS (and PostgreSQL), with backoff."""
        for tries in itertools.count(1):
            try:
                await action()
                return
            except (ConnectionLostError, ArchiveUnavailable) as exc:
                if self._stopping.is_set():
                    raise
                component = "database" if isinstance(exc, ArchiveUnavailable) else "nats"
                self.metrics.errors.labels(component).inc()
                delay = RETRY.delay(tries)
                log.warning("%s unavailable, retrying in %.1fs: %s", component, delay, exc)
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when stop() is called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
