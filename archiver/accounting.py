"""What the archiver counts: per-run and total counts, the Prometheus metrics, lag and progress.

One ``Accounting`` per Archiver. Every other module reports to it (a batch committed or
refused, messages acknowledged with nothing to write, removals, failures) and /healthz
reads it (lag, unacknowledged messages, seconds since the last progress).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from archiver.metrics import ArchiverMetrics
from archiver.store import WriteResult
from kvstate.feed import FeedState

__all__ = ["Accounting", "ArchiveCounts"]

log = logging.getLogger("archiver")

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


class Accounting:
    """Counts of the current run and of the archiver's life, and the metrics that mirror them."""

    def __init__(self, metrics: ArchiverMetrics) -> None:
        self.metrics = metrics
        self.run = ArchiveCounts()
        self.totals = ArchiveCounts()
        self.lag = 0
        """messages not delivered yet, as last seen"""
        self.ack_pending = 0
        """messages delivered and not acknowledged yet, as the monitor last read it"""
        self.last_progress = time.monotonic()
        """monotonic time of the last commit or acknowledgement"""
        self.database_ok = False
        self._progress = (time.monotonic(), 0)
        self._marker_messages = metrics.messages.labels("marker")
        self._running_messages = metrics.messages.labels("running")

    def health(self, nats_ok: bool, tasks: Mapping[str, asyncio.Task[object]], stall_after: float) -> dict[str, object]:
        """What /healthz reports: ok unless NATS or PostgreSQL is down, a task died, or the archiver stalled.

        ``stalled``: messages wait (``lag``, not delivered yet, or ``ack_pending``,
        delivered and not acknowledged) and nothing was committed or acknowledged for
        more than ``stall_after`` seconds. ``tasks``: each of the run's tasks as running,
        stopped (cancelled or finished) or dead (it raised).
        """
        states = {name: _task_state(task) for name, task in tasks.items()}
        quiet = time.monotonic() - self.last_progress
        stalled = (self.lag > 0 or self.ack_pending > 0) and quiet > stall_after
        return {
            "ok": nats_ok and self.database_ok and not stalled and "dead" not in states.values(),
            "nats": nats_ok,
            "database": self.database_ok,
            "lag": self.lag,
            "ack_pending": self.ack_pending,
            "seconds_since_progress": round(quiet, 3),
            "stalled": stalled,
            "tasks": states,
        }

    def start_run(self) -> ArchiveCounts:
        """Fresh counts for a new run."""
        self.run = ArchiveCounts()
        self.last_progress = time.monotonic()
        return self.run

    def progressed(self) -> None:
        """Something was committed or acknowledged."""
        self.last_progress = time.monotonic()

    def acknowledged(self, markers: int, running: int, lag: int) -> None:
        """Messages acknowledged with nothing to write: removal markers, operations not finished."""
        for counts in (self.run, self.totals):
            counts.markers += markers
            counts.skipped += running
        if markers:
            self._marker_messages.inc(markers)
        if running:
            self._running_messages.inc(running)
        self.lag = lag
        self.metrics.lag.set(lag)

    def feed_state(self, state: FeedState) -> None:
        """The consumer's pending and unacknowledged counts, as just read."""
        self.lag = state.pending
        self.ack_pending = state.ack_pending
        self.metrics.lag.set(state.pending)

    def database_up(self, up: bool) -> None:
        """The last PostgreSQL call succeeded (or failed, counted as an error)."""
        self.database_ok = up
        self.metrics.database_up.set(1 if up else 0)
        if not up:
            self.metrics.errors.labels("database").inc()

    def nats_error(self) -> None:
        """A NATS call failed."""
        self.metrics.errors.labels("nats").inc()

    def ack_failed(self) -> None:
        """Acknowledging committed messages failed (they come back as duplicates)."""
        self.metrics.errors.labels("nats").inc()
        self.metrics.ack_failures.inc()

    def stalled(self, action: str) -> None:
        """The feed's stall guard acted (restarted the pull or re-created the consumer)."""
        self.metrics.stalls.labels(action).inc()
        self.metrics.errors.labels("nats").inc()

    def refused(self) -> None:
        """PostgreSQL refused a batch."""
        self.database_up(False)
        self.run.failed_batches += 1
        self.totals.failed_batches += 1

    def removals(self, removed: int, conflicts: int) -> None:
        """Operations removed from the bucket, and removals refused by the revision check."""
        for counts in (self.run, self.totals):
            counts.removed += removed
            counts.remove_conflicts += conflicts
        self.metrics.removed.inc(removed)
        if conflicts:
            self.metrics.remove_conflicts.inc(conflicts)

    def committed(self, messages: int, result: WriteResult, letters: int, seconds: float) -> None:
        """A batch of ``messages`` committed in ``seconds`` (and acknowledged)."""
        archived, duplicates = len(result.written), result.duplicates
        for counts in (self.run, self.totals):
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
        m.batch_rows.observe(messages)
        m.batch_seconds.observe(seconds)
        m.last_commit.set(time.time())
        log.debug(
            "batch messages=%d archived=%d duplicates=%d dead_letters=%d lag=%d seconds=%.4f",
            messages,
            archived,
            duplicates,
            letters,
            self.lag,
            seconds,
        )
        since, before = self._progress
        elapsed = time.monotonic() - since
        if elapsed >= _PROGRESS_EVERY:
            totals = self.totals
            done = totals.archived + totals.duplicates
            log.info(
                "progress archived=%d duplicates=%d dead_letters=%d removed=%d lag=%d rows_per_s=%.1f batch_size=%d",
                totals.archived,
                totals.duplicates,
                totals.dead_letters,
                totals.removed,
                self.lag,
                (done - before) / elapsed,
                messages,
            )
            self._progress = (time.monotonic(), done)


def _task_state(task: asyncio.Task[object]) -> str:
    """running, stopped (cancelled or returned) or dead (it raised)."""
    if not task.done():
        return "running"
    if task.cancelled() or task.exception() is None:
        return "stopped"
    return "dead"
