"""The archiver: consumes operation changes, snapshots finished operations, removes them later.

    async with Archiver(ArchiverSettings.from_env(os.environ)) as archiver:
        counts = await archiver.run(burst=True)   # everything pending, then return
        await archiver.run()                      # until stop() (the CLI wires SIGTERM to it)

The loop (docs/archive.md):

1. pull messages from the durable consumer and sort them as they arrive: removal
   markers and operations not finished yet (read by a status peek, without decoding)
   are acked at once; finished operations become rows and undecodable values dead
   letters in a size-or-time ``WriteBatch``;
2. a writer task writes one batch at a time while the next ones fill (one more can wait
   in its queue): one PostgreSQL transaction, a COPY, or the upsert guarded by revision
   when an id is archived already; on failure nak the batch with a backoff delay and
   retry nothing in memory: JetStream delivers it again;
3. after the commit, ack every message of the batch (an ack that fails is logged and
   counted: the message comes back after ack_wait and is absorbed as a duplicate), then
   schedule the removal, at ``finished_at + grace_period``, of each (id, revision) the
   archive holds at exactly that revision: the one rule for removals, the sweep's too;
4. one remover sends what is due as a batch, ``client.remove_many``: pipelined removals,
   each revision-checked, so an operation that changed after its snapshot stays (and is
   archived again when it finishes again);
5. a periodic sweep (in a burst: one, at the end) removes finished operations the
   archive already holds at their revision, which covers removals lost to a crash or a
   NATS outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from nats.aio.msg import Msg

from archiver._consumer import ArchiveConsumer, ConsumerState, delivery_sequence, live_revisions
from archiver.batch import Kind, WriteBatch, needs_decoding
from archiver.errors import ArchiveUnavailable
from archiver.metrics import ArchiverMetrics, MetricsServer
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore, WriteResult
from kvstate._kv import is_removal_marker, nats_errors
from kvstate.client import Client
from kvstate.errors import BucketNotFound, ConflictError, ConnectionLostError, KvstateError

__all__ = ["ArchiveCounts", "Archiver", "ArchiverHooks"]

log = logging.getLogger("archiver")

_MAX_BACKOFF = 5.0
_REMOVE_BATCH = 4096
"""most removals sent as one pipelined batch of purges"""
_MIN_ACK_PENDING = 2000
_MIN_FETCH = 1000
_BURST_POLL = 0.01
"""burst mode: how long an empty fetch waits before the run checks whether it is done"""
_MIN_POLL = 0.01
_PROGRESS_EVERY = 5.0
_MONITOR_EVERY = 5.0
"""most seconds between two reads of the consumer's lag by the monitor task"""


@dataclass
class ArchiveCounts:
    """What one ``run`` did."""

    archived: int = 0
    """rows inserted, or replaced by a newer revision"""
    duplicates: int = 0
    """finished snapshots the archive already held at that revision or newer"""
    dead_letters: int = 0
    """undecodable values parked in archive_dead_letters"""
    removed: int = 0
    """operations removed from the bucket"""
    remove_conflicts: int = 0
    """removals refused because the operation changed after its snapshot"""
    skipped: int = 0
    """messages of operations not finished yet (acked, nothing written)"""
    markers: int = 0
    """removal markers (acked, nothing written)"""
    batches: int = 0
    """batches committed"""
    failed_batches: int = 0
    """batches PostgreSQL refused (nak'ed, delivered again later)"""

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class ArchiverHooks:
    """Test hooks: ``after_commit(messages)`` runs between the commit and the acks,
    ``before_remove(op_id, revision)`` just before a removal."""

    after_commit: Callable[[Sequence[Msg]], Awaitable[None]] | None = None
    before_remove: Callable[[str, int], Awaitable[None]] | None = None


class _Writer:
    """Writes batches one at a time, in order, in a task of its own, with one more batch queued.

    ``submit`` returns as soon as the batch is queued, so the fetch loop goes on sorting
    (markers, the next batch) while PostgreSQL writes; it waits only when a batch is being
    written and another one is already queued. A write that raises stops the writer: the
    next ``check``, ``submit`` or ``finish`` raises it.
    """

    def __init__(self, write: Callable[[WriteBatch], Awaitable[None]]) -> None:
        self._write = write
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
        """Stop the writer (a write under way is cancelled)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def _run(self) -> None:
        while True:
            batch = await self._queue.get()
            self._busy = True
            try:
                await self._write(batch)
            finally:
                self._busy = False
                self._queue.task_done()


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
        self._marker_messages = self.metrics.messages.labels(Kind.MARKER.value)
        self._running_messages = self.metrics.messages.labels(Kind.RUNNING.value)
        self.totals = ArchiveCounts()
        self._stack = AsyncExitStack()
        self._client: Client | None = None
        self._store: ArchiveStore | None = None
        self._server: MetricsServer | None = None
        self._stopping = asyncio.Event()
        self._counts = ArchiveCounts()
        self._removals: list[tuple[float, str, int]] = []
        """a heap of (due time, operation id, archived revision)"""
        self._removal_added = asyncio.Event()
        self._removing = False
        self._backoff = 0.0
        self._database_ok = False
        self._progress = (time.monotonic(), 0)
        self._lag = 0
        self._ack_pending = 0
        """messages delivered and not acknowledged yet, as the monitor last read it"""
        self._last_progress = time.monotonic()
        """monotonic time of the last commit or acknowledgement"""
        self._tasks: dict[str, asyncio.Task[object]] = {}
        """the run's tasks (writer, remover, sweeper, monitor), for /healthz"""
        self._source = 0
        """the bucket incarnation being archived (ArchiveStore.register_source)"""

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
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _open_client(self) -> Client | None:
        """Connect and open the bucket, waiting with backoff while NATS is unreachable or the
        bucket does not exist yet (None if stopped first).

        The archiver never creates the bucket: with a mistyped KVSTATE_BUCKET it would
        otherwise archive an empty bucket of its own, silently, for ever.
        """
        delay = 0.2
        while not self._stopping.is_set():
            try:
                return await self._stack.enter_async_context(Client(self.settings.kv, name="kvstate-archiver"))
            except (ConnectionLostError, BucketNotFound) as exc:
                self.metrics.errors.labels("nats").inc()
                log.warning("waiting for NATS and the bucket, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        return None

    async def _open_store(self) -> ArchiveStore | None:
        """Open the archive, retrying with backoff while PostgreSQL is unreachable (None if stopped first)."""
        delay = 0.2
        while not self._stopping.is_set():
            try:
                store = await self._stack.enter_async_context(ArchiveStore.open(self.settings.database_url))
            except ArchiveUnavailable as exc:
                self._database_ok = False
                self.metrics.database_up.set(0)
                self.metrics.errors.labels("database").inc()
                log.warning("archive database unavailable, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            self._database_ok = True
            self.metrics.database_up.set(1)
            return store
        return None

    def stop(self) -> None:
        """Ask ``run`` to finish its current batch and return (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping.is_set()

    def health(self) -> dict[str, object]:
        """What /healthz reports: ok unless NATS or PostgreSQL is down, a task died, or the archiver stalled.

        ``stalled``: messages wait (``lag``, not delivered yet, or ``ack_pending``,
        delivered and not acknowledged) and nothing was committed or acknowledged for
        more than ARCHIVER_STALL_AFTER seconds. ``tasks``: each of the
        run's tasks as running, stopped (cancelled or finished) or dead (it raised).
        """
        nats_ok = self._client is not None and self._client.connected
        self.metrics.nats_up.set(1 if nats_ok else 0)
        tasks = {name: _task_state(task) for name, task in self._tasks.items()}
        quiet = time.monotonic() - self._last_progress
        stalled = (self._lag > 0 or self._ack_pending > 0) and quiet > self.settings.stall_after
        ok = nats_ok and self._database_ok and not stalled and "dead" not in tasks.values()
        return {
            "ok": ok,
            "nats": nats_ok,
            "database": self._database_ok,
            "lag": self._lag,
            "ack_pending": self._ack_pending,
            "seconds_since_progress": round(quiet, 3),
            "stalled": stalled,
            "tasks": tasks,
        }

    @property
    def client(self) -> Client:
        """The kvstate client (open while the archiver is)."""
        if self._client is None:
            raise RuntimeError("use the Archiver inside `async with`")
        return self._client

    # ------------------------------------------------------------------ the loop

    async def run(self, *, burst: bool = False) -> ArchiveCounts:
        """Archive until ``stop()`` (or, with ``burst``, until nothing is pending); returns this run's counts.

        In burst mode the bucket is swept once as soon as nothing fetched waits to be
        written or removed (while the markers of the last removals still come in), and
        the run ends once that sweep is done and the consumer has nothing pending or
        awaiting acknowledgement.
        """
        self._counts = ArchiveCounts()
        if self._client is None or self._store is None:
            return self._counts  # stopped before NATS, the bucket or PostgreSQL came up
        client = self._client
        consumer = ArchiveConsumer(
            client.store,
            self.settings.consumer,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=max(_MIN_ACK_PENDING, 4 * self.settings.batch_size),
            stall_after=self.settings.stall_after / 3,  # acts well before /healthz reports the stall
            on_stall=self._stalled,
        )
        await self._retry_nats(consumer.open)
        await self._retry_nats(self._register_source)
        self._last_progress = time.monotonic()
        log.info(
            "archiver started: bucket=%s consumer=%s batch_size=%d batch_timeout=%.3f grace_period=%g burst=%s",
            client.settings.bucket,
            consumer.name,
            self.settings.batch_size,
            self.settings.batch_timeout,
            self.settings.grace_period,
            burst,
        )
        self._tasks = {"remover": asyncio.create_task(self._remove_when_due(), name="archiver-remover")}
        if not burst:
            self._tasks["sweeper"] = asyncio.create_task(self._sweep_periodically(), name="archiver-sweeper")
        self._tasks["monitor"] = asyncio.create_task(self._monitor(consumer), name="archiver-monitor")
        try:
            await self._consume(consumer, burst)
        finally:
            for name, task in self._tasks.items():
                if name != "writer" and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await consumer.close()
        log.info("archiver stopped: %s", " ".join(f"{k}={v}" for k, v in self._counts.as_dict().items()))
        return self._counts

    async def _consume(self, consumer: ArchiveConsumer, burst: bool) -> None:
        """Fetch and sort messages while earlier batches are written (one write at a time, one more queued)."""
        loop = asyncio.get_running_loop()
        size = self.settings.batch_size
        fetch_size = max(size, _MIN_FETCH)
        key_start = len(self.client.store.subject(""))
        batch = WriteBatch(loop.time(), self._source)
        writer = _Writer(self._process)
        self._tasks["writer"] = writer.task
        generation = consumer.generation
        sweeping: asyncio.Task[int] | None = None  # burst: the one sweep at the end
        # Messages delivered before this run and not acknowledged yet (an instance that
        # crashed holding them): the sweep waits until they came back and were handled.
        inherited = await self._consumer_state(consumer) if burst else None
        sweep_waits_for_acks = inherited is None or inherited.ack_pending > 0

        async def hand_over() -> None:
            nonlocal batch
            await writer.submit(batch)  # waits while one batch is written and another queued
            batch = WriteBatch(loop.time(), self._source)

        try:
            while not self._stopping.is_set():
                writer.check()  # raises what a write raised
                if burst:
                    timeout = _BURST_POLL
                elif batch:
                    timeout = max(batch.opened + self.settings.batch_timeout - loop.time(), _MIN_POLL)
                else:
                    timeout = max(1.0, self.settings.batch_timeout)
                try:
                    messages = await consumer.fetch(fetch_size, timeout=timeout)
                except KvstateError as exc:
                    self.metrics.errors.labels("nats").inc()
                    log.warning("fetching from NATS failed, retrying: %s", exc)
                    await self._sleep(1.0)
                    continue
                if consumer.generation != generation:
                    # The consumer was created again (deleted, or stalled): its stream may be a
                    # new incarnation of the bucket, whose rows are a source of their own.
                    if batch:
                        await hand_over()
                    await writer.finish()
                    await self._retry_nats(self._register_source)
                    generation = consumer.generation
                    batch = WriteBatch(loop.time(), self._source)
                markers = running = 0
                if messages:
                    now = datetime.now(UTC)
                    nothing_to_write: list[Msg] = []
                    for msg in messages:
                        value = msg.data
                        if not value and is_removal_marker(msg.headers):
                            nothing_to_write.append(msg)
                            markers += 1
                            continue
                        if needs_decoding(value):
                            if not batch:
                                batch.opened = loop.time()
                            revision = delivery_sequence(msg)[0]
                            if batch.add(msg, msg.subject[key_start:], revision, value, now) is not Kind.RUNNING:
                                if len(batch) >= size:
                                    await hand_over()
                                continue
                        nothing_to_write.append(msg)  # not finished
                        running += 1
                    await self._ack(nothing_to_write)
                    self._lag = delivery_sequence(messages[-1])[1]
                    self.metrics.lag.set(self._lag)
                    self._count_acks(markers, running)
                if batch and (
                    len(batch) >= size
                    or loop.time() - batch.opened >= self.settings.batch_timeout
                    or (burst and writer.idle)  # burst: keep the writer busy
                ):
                    await hand_over()
                elif burst and not batch and writer.idle and not self._removals_pending():
                    if sweeping is None and not sweep_waits_for_acks and messages and markers == len(messages):
                        # Nothing but removal markers came: sweep while the rest of them come in.
                        sweeping = asyncio.create_task(self.sweep(), name="archiver-sweep")
                    elif not messages:
                        state = await self._consumer_state(consumer)
                        if sweeping is None:
                            if state is not None and state.ack_pending == 0:
                                sweeping = asyncio.create_task(self.sweep(), name="archiver-sweep")
                        elif sweeping.done():
                            sweeping.result()  # raises what the sweep raised
                            if state is not None and state.pending == 0 and state.ack_pending == 0:
                                return
            if batch:  # stopping: write what was fetched (or nak it if PostgreSQL refuses)
                await hand_over()
            await writer.finish()
        finally:
            await writer.close()  # after an error: abandons what is unwritten, JetStream redelivers it
            if sweeping is not None and not sweeping.done():
                sweeping.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sweeping

    def _count_acks(self, markers: int, running: int) -> None:
        """Count messages acknowledged with nothing to write: removal markers, operations not finished."""
        for counts in (self._counts, self.totals):
            counts.markers += markers
            counts.skipped += running
        if markers:
            self._marker_messages.inc(markers)
        if running:
            self._running_messages.inc(running)

    async def _consumer_state(self, consumer: ArchiveConsumer) -> ConsumerState | None:
        """The consumer's pending and unacknowledged counts (None when NATS cannot say now); updates the lag."""
        try:
            state = await consumer.state()
        except KvstateError as exc:
            log.warning("cannot read the consumer state: %s", exc)
            return None
        self._lag = state.pending
        self._ack_pending = state.ack_pending
        self.metrics.lag.set(state.pending)
        return state

    async def _process(self, batch: WriteBatch) -> None:
        """One batch: write it in one transaction, then ack; nak everything on failure."""
        assert self._store is not None
        started = time.perf_counter()
        messages = batch.messages
        try:
            result = await self._store.write(batch.rows, batch.letters)
        except ArchiveUnavailable as exc:
            await self._refused(messages, exc)
            return
        self._backoff = 0.0
        self._database_ok = True
        self.metrics.database_up.set(1)
        self._last_progress = time.monotonic()
        if self.hooks.after_commit is not None:
            await self.hooks.after_commit(messages)
        await self._ack(messages)
        # Only what the archive holds at exactly that revision leaves the bucket: a row the
        # guarded upsert refused (a newer revision is archived) stays where it is.
        archived = result.archived
        for op_id, revision, finished_at in batch.finished:
            if (op_id, batch.source, revision) in archived:
                self._schedule_removal(op_id, revision, finished_at + self.settings.grace_period)
        self._account(messages, result, len(batch.letters), time.perf_counter() - started)

    async def _ack(self, messages: Sequence[Msg]) -> None:
        """Acknowledge ``messages``; a failure (NATS gone) is logged and counted, not raised.

        What was not acknowledged is delivered again after ack_wait: a committed row then
        comes back as a duplicate, which the guarded upsert absorbs.
        """
        if not messages:
            return
        try:
            with nats_errors("ack"):
                for msg in messages:
                    await msg.ack()
        except KvstateError as exc:
            self.metrics.errors.labels("nats").inc()
            self.metrics.ack_failures.inc()
            log.warning(
                "acknowledging %d messages failed (delivered again after ack_wait, absorbed as duplicates): %s",
                len(messages),
                exc,
            )
            return
        self._last_progress = time.monotonic()

    def _stalled(self, action: str) -> None:
        """The consumer's stall guard acted (restarted the pull or re-created the consumer)."""
        self.metrics.stalls.labels(action).inc()
        self.metrics.errors.labels("nats").inc()

    async def _register_source(self) -> None:
        """Find (or register) the archive's source number of this incarnation of the bucket.

        An incarnation is the bucket's stream as created: its ``created`` time (stream
        info) stays the same across server restarts and changes when the bucket is
        deleted and created again.
        """
        assert self._store is not None
        info = await self.client.store.info()
        created = info.created or datetime.fromtimestamp(0, UTC)
        source = await self._store.register_source(self.client.settings.bucket, created)
        if source != self._source:
            log.info(
                "archiving bucket %s (stream created %s) as source %d",
                self.client.settings.bucket,
                created.isoformat(),
                source,
            )
        self._source = source

    async def _monitor(self, consumer: ArchiveConsumer) -> None:
        """Read the consumer's lag now and then, also while the fetch loop is stuck (for /healthz)."""
        every = min(_MONITOR_EVERY, self.settings.stall_after / 4)
        while True:
            await asyncio.sleep(every)
            await self._consumer_state(consumer)

    async def _refused(self, messages: list[Msg], exc: ArchiveUnavailable) -> None:
        self._database_ok = False
        self.metrics.database_up.set(0)
        self.metrics.errors.labels("database").inc()
        self._counts.failed_batches += 1
        self.totals.failed_batches += 1
        self._backoff = min(max(self._backoff * 2, 0.25), _MAX_BACKOFF)
        log.warning(
            "batch of %d messages not archived, delivered again in %.2fs: %s", len(messages), self._backoff, exc
        )
        try:
            for msg in messages:
                await msg.nak(delay=self._backoff)
        except Exception as nak_error:  # noqa: BLE001 - unacked messages come back after ack_wait anyway
            log.warning("nak failed (messages return after ack_wait): %s", nak_error)
        await self._sleep(self._backoff)

    def _account(self, messages: list[Msg], result: WriteResult, letters: int, seconds: float) -> None:
        archived, duplicates = len(result.written), result.duplicates
        for counts in (self._counts, self.totals):
            counts.archived += archived
            counts.duplicates += duplicates
            counts.dead_letters += letters
            counts.batches += 1
        m = self.metrics
        m.archived.inc(archived)
        m.duplicates.inc(duplicates)
        m.dead_letters.inc(letters)
        m.messages.labels("terminal").inc(archived + duplicates)
        m.messages.labels("corrupt").inc(letters)
        m.batches.inc()
        m.batch_rows.observe(len(messages))
        m.batch_seconds.observe(seconds)
        m.last_commit.set(time.time())
        log.debug(
            "batch messages=%d archived=%d duplicates=%d dead_letters=%d lag=%d seconds=%.4f",
            len(messages),
            archived,
            duplicates,
            letters,
            self._lag,
            seconds,
        )
        since, before = self._progress
        elapsed = time.monotonic() - since
        if elapsed >= _PROGRESS_EVERY:
            done = self.totals.archived + self.totals.duplicates
            log.info(
                "progress archived=%d duplicates=%d dead_letters=%d removed=%d lag=%d rows_per_s=%.1f batch_size=%d",
                self.totals.archived,
                self.totals.duplicates,
                self.totals.dead_letters,
                self.totals.removed,
                self._lag,
                (done - before) / elapsed,
                len(messages),
            )
            self._progress = (time.monotonic(), done)

    # ------------------------------------------------------------------ removal

    def _schedule_removal(self, op_id: str, revision: int, due: float) -> None:
        heapq.heappush(self._removals, (due, op_id, revision))
        self._removal_added.set()

    async def _remove_when_due(self) -> None:
        """The remover: whatever is due goes out as one pipelined batch of removals, then the next."""
        while True:
            self._removal_added.clear()
            due = self._take_due(time.time())
            if due:
                self._removing = True
                try:
                    await self._remove_batch(due)
                finally:
                    self._removing = False
                continue
            timeout = self._removals[0][0] - time.time() if self._removals else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                    await self._removal_added.wait()

    def _take_due(self, now: float) -> list[tuple[str, int]]:
        """Up to _REMOVE_BATCH removals whose grace period is over, oldest first."""
        due: list[tuple[str, int]] = []
        while self._removals and self._removals[0][0] <= now and len(due) < _REMOVE_BATCH:
            _, op_id, revision = heapq.heappop(self._removals)
            due.append((op_id, revision))
        return due

    def _removals_pending(self) -> bool:
        """True while a removal is under way or overdue."""
        return self._removing or bool(self._removals and self._removals[0][0] <= time.time())

    async def _remove_batch(self, items: Sequence[tuple[str, int]]) -> None:
        """Remove ``items`` with pipelined revision-checked purges, _REMOVE_BATCH at a time."""
        for start in range(0, len(items), _REMOVE_BATCH):
            chunk = list(items[start : start + _REMOVE_BATCH])
            if self.hooks.before_remove is not None:
                for op_id, revision in chunk:
                    await self.hooks.before_remove(op_id, revision)
            try:
                results = await self.client.remove_many(chunk, marker_ttl=self.settings.marker_ttl)
            except KvstateError as exc:  # the reply subscription could not even be set up
                self.metrics.errors.labels("nats").inc()
                log.warning("removing %d operations failed (the next sweep retries): %s", len(chunk), exc)
                continue
            removed = 0
            for (op_id, revision), result in zip(chunk, results, strict=True):
                if isinstance(result, int):
                    removed += 1
                elif isinstance(result, ConflictError):
                    # Changed after the snapshot (reopened, updated) or already removed by another
                    # instance: keep it; a newer terminal revision is archived and removed later.
                    self._counts.remove_conflicts += 1
                    self.totals.remove_conflicts += 1
                    self.metrics.remove_conflicts.inc()
                    log.info("not removing %s: it changed after revision %d", op_id, revision)
                else:
                    self.metrics.errors.labels("nats").inc()
                    log.warning(
                        "removing %s at revision %d failed (the next sweep retries): %s", op_id, revision, result
                    )
            self._counts.removed += removed
            self.totals.removed += removed
            self.metrics.removed.inc(removed)

    async def sweep(self) -> int:
        """Remove every finished operation past its grace period that the archive holds at its revision.

        The same rule as removals after a commit: only an (id, revision) archived from this
        incarnation of the bucket at exactly that revision leaves the bucket.

        Catches removals lost to a crash (they were only scheduled in memory) or to a
        NATS outage. Reads only the keys and revisions of the bucket (no values): an
        operation whose current revision is the one archived is finished, and the
        archive row says when. Returns how many were removed.
        """
        assert self._store is not None
        cutoff = time.time() - self.settings.grace_period
        current = await live_revisions(self.client.store, self.settings.consumer)
        if not current:
            return 0
        ids = list(current)
        archived: dict[str, tuple[int, float]] = {}
        for start in range(0, len(ids), 1000):
            archived.update(await self._store.archived_snapshots(ids[start : start + 1000], self._source))
        eligible = [
            (op_id, revision)
            for op_id, revision in current.items()
            if op_id in archived and archived[op_id][0] == revision and archived[op_id][1] <= cutoff
        ]
        before = self._counts.removed
        await self._remove_batch(eligible)
        removed = self._counts.removed - before
        if removed:
            log.info("sweep removed=%d live=%d", removed, len(current))
        return removed

    async def _sweep_periodically(self) -> None:
        while True:
            try:
                await self.sweep()
            except (ArchiveUnavailable, KvstateError) as exc:
                log.warning("sweep failed (retried next interval): %s", exc)
            await asyncio.sleep(self.settings.sweep_interval)

    # ------------------------------------------------------------------ helpers

    async def _retry_nats(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` until it gets through NATS (and PostgreSQL), with backoff."""
        delay = 0.2
        while True:
            try:
                await action()
                return
            except (ConnectionLostError, ArchiveUnavailable) as exc:
                if self._stopping.is_set():
                    raise
                component = "database" if isinstance(exc, ArchiveUnavailable) else "nats"
                self.metrics.errors.labels(component).inc()
                log.warning("%s unavailable, retrying in %.1fs: %s", component, delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when stop() is called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()


def _task_state(task: asyncio.Task[object]) -> str:
    """running, stopped (cancelled or returned) or dead (it raised)."""
    if not task.done():
        return "running"
    if task.cancelled() or task.exception() is None:
        return "stopped"
    return "dead"
