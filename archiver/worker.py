"""The archiver: consumes operation changes, snapshots finished operations, removes them later.

    async with Archiver(ArchiverSettings.from_env(os.environ)) as archiver:
        counts = await archiver.run(burst=True)   # everything pending, then return
        await archiver.run()                      # until stop() (the CLI wires SIGTERM to it)

The loop (docs/archive.md):

1. pull messages from the durable consumer into a size-or-time ``ArchiveBatch``;
2. per batch: decode; terminal operations become rows, undecodable values dead
   letters, everything else (running operations, removal markers) is only acked;
3. one PostgreSQL transaction (upsert guarded by revision); on failure nak the batch
   with a backoff delay and retry nothing in memory: JetStream delivers it again;
4. after the commit, ack every message of the batch, then schedule each finished
   operation's removal for ``finished_at + grace_period``;
5. removal is ``client.remove(id, revision)``: revision-checked, so an operation that
   changed after its snapshot stays (and is archived again when it finishes again);
6. a periodic sweep removes finished operations the archive already holds at their
   revision, which covers removals lost to a crash or a NATS outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from nats.aio.msg import Msg

from archiver._consumer import ArchiveConsumer
from archiver.batch import ArchiveBatch
from archiver.errors import ArchiveUnavailable
from archiver.metrics import ArchiverMetrics, MetricsServer
from archiver.rows import ArchiveRow, row_for
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore, DeadLetter, WriteResult
from kvstate.client import Client
from kvstate.codec import decode_operation
from kvstate.errors import ConflictError, ConnectionLostError, CorruptValue, KvstateError

__all__ = ["ArchiveCounts", "Archiver", "ArchiverHooks"]

log = logging.getLogger("archiver")

_MAX_BACKOFF = 5.0
_REMOVE_CONCURRENCY = 128
_PROGRESS_EVERY = 5.0


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


@dataclass(order=True)
class _Removal:
    due: float
    op_id: str = field(compare=False)
    revision: int = field(compare=False)


class Archiver:
    """Snapshots finished operations from the bucket into PostgreSQL, exactly once per revision.

    An async context manager: entering connects to NATS, applies the migrations
    (retrying while PostgreSQL is down) and starts the metrics endpoint; leaving closes
    them in reverse order.
    """

    def __init__(self, settings: ArchiverSettings, *, hooks: ArchiverHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or ArchiverHooks()
        self.metrics = ArchiverMetrics()
        self.totals = ArchiveCounts()
        self._stack = AsyncExitStack()
        self._client: Client | None = None
        self._store: ArchiveStore | None = None
        self._server: MetricsServer | None = None
        self._stopping = asyncio.Event()
        self._counts = ArchiveCounts()
        self._removals: list[_Removal] = []
        self._removal_added = asyncio.Event()
        self._backoff = 0.0
        self._database_ok = False
        self._progress = (time.monotonic(), 0)
        self._lag = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        try:
            if self.settings.metrics_port:
                self._server = MetricsServer(
                    self.metrics, self.health, self.settings.metrics_host, self.settings.metrics_port
                )
                await self._server.start()
                self._stack.push_async_callback(self._server.close)
            self._client = await self._stack.enter_async_context(
                Client(self.settings.kv, create_bucket=True, name="kvstate-archiver")
            )
            self._store = await self._open_store()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

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
        """{"ok": bool, "nats": bool, "database": bool, "lag": int} for /healthz."""
        nats_ok = self._client is not None and self._client.connected
        self.metrics.nats_up.set(1 if nats_ok else 0)
        return {"ok": nats_ok and self._database_ok, "nats": nats_ok, "database": self._database_ok, "lag": self._lag}

    @property
    def client(self) -> Client:
        """The kvstate client (open while the archiver is)."""
        if self._client is None:
            raise RuntimeError("use the Archiver inside `async with`")
        return self._client

    # ------------------------------------------------------------------ the loop

    async def run(self, *, burst: bool = False) -> ArchiveCounts:
        """Archive until ``stop()`` (or, with ``burst``, until nothing is pending); returns this run's counts.

        In burst mode the run ends once the consumer has nothing pending or awaiting
        acknowledgement; due removals are then done and the bucket swept once.
        """
        client = self.client
        self._counts = ArchiveCounts()
        if self._store is None:
            return self._counts  # stopped before PostgreSQL came up
        consumer = ArchiveConsumer(
            client.store,
            self.settings.consumer,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=max(1000, 4 * self.settings.batch_size),
        )
        await self._retry_nats(consumer.open)
        log.info(
            "archiver started: bucket=%s consumer=%s batch_size=%d batch_timeout=%.3f grace_period=%g burst=%s",
            client.settings.bucket,
            consumer.name,
            self.settings.batch_size,
            self.settings.batch_timeout,
            self.settings.grace_period,
            burst,
        )
        remover = asyncio.create_task(self._remove_when_due(), name="archiver-remover")
        sweeper = None if burst else asyncio.create_task(self._sweep_periodically(), name="archiver-sweeper")
        try:
            await self._consume(consumer, burst)
            if burst:
                await self._remove_due(time.time())
                await self.sweep()
        finally:
            for task in (remover, sweeper):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await consumer.close()
        log.info("archiver stopped: %s", " ".join(f"{k}={v}" for k, v in self._counts.as_dict().items()))
        return self._counts

    async def _consume(self, consumer: ArchiveConsumer, burst: bool) -> None:
        size = self.settings.batch_size
        wait = self.settings.batch_timeout if burst else max(1.0, self.settings.batch_timeout)
        async with ArchiveBatch(max_size=size, max_wait=self.settings.batch_timeout, flush=self._process) as batch:
            while not self._stopping.is_set():
                try:
                    messages = await consumer.fetch(size - len(batch) or size, timeout=wait)
                except KvstateError as exc:
                    self.metrics.errors.labels("nats").inc()
                    log.warning("fetching from NATS failed, retrying: %s", exc)
                    await self._sleep(1.0)
                    continue
                if messages:
                    self._lag = messages[-1].metadata.num_pending
                    self.metrics.lag.set(self._lag)
                    for msg in messages:
                        await batch.add(msg)
                elif burst:
                    await batch.flush()
                    if await self._drained(consumer):
                        return

    async def _drained(self, consumer: ArchiveConsumer) -> bool:
        try:
            state = await consumer.state()
        except KvstateError as exc:
            log.warning("cannot read the consumer state: %s", exc)
            return False
        self._lag = state.pending
        self.metrics.lag.set(state.pending)
        return state.pending == 0 and state.ack_pending == 0

    async def _process(self, messages: list[Msg]) -> None:
        """One batch: decode, write in one transaction, then ack; nak everything on failure."""
        assert self._client is not None
        assert self._store is not None
        started = time.perf_counter()
        store = self._client.store
        now = datetime.now(UTC)
        rows: list[ArchiveRow] = []
        letters: list[DeadLetter] = []
        finished: list[tuple[str, int, float]] = []
        markers = skipped = 0
        for msg in messages:
            entry = store.decode_message(msg)
            if entry.value is None:
                markers += 1
                continue
            try:
                op = decode_operation(entry.key, entry.revision, entry.value)
            except CorruptValue as exc:
                letters.append(DeadLetter(entry.key, entry.revision, entry.value, exc.detail))
                continue
            if not op.done:
                skipped += 1
                continue
            rows.append(row_for(op, now))
            finished.append((op.id, op.revision, (op.finished_at or op.updated_at).timestamp()))
        result = WriteResult(frozenset(), 0, 0)
        if rows or letters:
            try:
                result = await self._store.write(rows, letters)
            except ArchiveUnavailable as exc:
                await self._refused(messages, exc)
                return
        self._backoff = 0.0
        self._database_ok = True
        self.metrics.database_up.set(1)
        if self.hooks.after_commit is not None:
            await self.hooks.after_commit(messages)
        for msg in messages:
            await msg.ack()
        for op_id, revision, finished_at in finished:
            self._schedule_removal(op_id, revision, finished_at + self.settings.grace_period)
        self._account(messages, result, len(letters), markers, skipped, time.perf_counter() - started)

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

    def _account(
        self, messages: list[Msg], result: WriteResult, letters: int, markers: int, skipped: int, seconds: float
    ) -> None:
        archived, duplicates = len(result.written), result.duplicates
        for counts in (self._counts, self.totals):
            counts.archived += archived
            counts.duplicates += duplicates
            counts.dead_letters += letters
            counts.markers += markers
            counts.skipped += skipped
            counts.batches += 1
        m = self.metrics
        m.archived.inc(archived)
        m.duplicates.inc(duplicates)
        m.dead_letters.inc(letters)
        m.messages.labels("terminal").inc(archived + duplicates)
        m.messages.labels("running").inc(skipped)
        m.messages.labels("marker").inc(markers)
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
        heapq.heappush(self._removals, _Removal(due, op_id, revision))
        self._removal_added.set()

    async def _remove_when_due(self) -> None:
        while True:
            now = time.time()
            await self._remove_due(now)
            self._removal_added.clear()
            timeout = self._removals[0].due - time.time() if self._removals else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                    await self._removal_added.wait()

    async def _remove_due(self, now: float) -> None:
        due: list[tuple[str, int]] = []
        while self._removals and self._removals[0].due <= now:
            item = heapq.heappop(self._removals)
            due.append((item.op_id, item.revision))
        await self._remove_many(due)

    async def _remove_many(self, items: Sequence[tuple[str, int]]) -> None:
        for start in range(0, len(items), _REMOVE_CONCURRENCY):
            chunk = items[start : start + _REMOVE_CONCURRENCY]
            await asyncio.gather(*(self._remove(op_id, revision) for op_id, revision in chunk))

    async def _remove(self, op_id: str, revision: int) -> None:
        if self.hooks.before_remove is not None:
            await self.hooks.before_remove(op_id, revision)
        try:
            await self.client.remove(op_id, revision, marker_ttl=self.settings.marker_ttl)
        except ConflictError:
            # Changed after the snapshot (reopened, updated) or already removed by another
            # instance: keep it; a newer terminal revision is archived and removed later.
            self._counts.remove_conflicts += 1
            self.totals.remove_conflicts += 1
            self.metrics.remove_conflicts.inc()
            log.info("not removing %s: it changed after revision %d", op_id, revision)
            return
        except KvstateError as exc:
            self.metrics.errors.labels("nats").inc()
            log.warning("removing %s at revision %d failed (the next sweep retries): %s", op_id, revision, exc)
            return
        self._counts.removed += 1
        self.totals.removed += 1
        self.metrics.removed.inc()

    async def sweep(self) -> int:
        """Remove every finished operation past its grace period that the archive holds at its revision.

        Catches removals lost to a crash (they were only scheduled in memory) or to a
        NATS outage. Returns how many were removed.
        """
        assert self._store is not None
        cutoff = time.time() - self.settings.grace_period
        candidates: dict[str, int] = {}
        async for op in self.client.scan():
            if op.done and (op.finished_at or op.updated_at).timestamp() <= cutoff:
                candidates[op.id] = op.revision
        if not candidates:
            return 0
        ids = list(candidates)
        archived: dict[str, int] = {}
        for start in range(0, len(ids), 1000):
            archived.update(await self._store.archived_revisions(ids[start : start + 1000]))
        eligible = [(i, rev) for i, rev in candidates.items() if archived.get(i, -1) >= rev]
        before = self._counts.removed
        await self._remove_many(eligible)
        removed = self._counts.removed - before
        if removed:
            log.info("sweep removed=%d candidates=%d", removed, len(candidates))
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
        delay = 0.2
        while True:
            try:
                await action()
                return
            except ConnectionLostError as exc:
                if self._stopping.is_set():
                    raise
                self.metrics.errors.labels("nats").inc()
                log.warning("NATS unavailable, retrying in %.1fs: %s", delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when stop() is called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
