"""The in-memory index of live operations that every dashboard request reads: ``OperationIndex``.

One watcher per process feeds it (``dashboard.feed``); requests never scan the bucket.
``OperationIndex.apply`` takes each watched change to the parts that each do one job:

- ``dashboard.summary``: what is remembered of one operation (``OpSummary``, a few hundred bytes);
- ``dashboard.store``: the summaries by id and in age orders (``SummaryStore``);
- ``dashboard.planner``: which age orders a filtered page walks (``OperationFilter``, ``QueryPlanner``);
- ``dashboard.aggregates``: the overview's live counts, percentiles, throughput and failures (``LiveAggregates``);
- ``dashboard.stuck``: which running stages are stuck, by ``kvstate.derive.stuck_checks`` (``StuckScheduler``).

Every figure is kept per change, so the overview costs the same with 1,000 or 100,000
operations in the bucket. Plain data and methods with an explicit ``now`` (epoch
seconds): no I/O, no clock.
"""

from __future__ import annotations

from dashboard.aggregates import Failure, LiveAggregates, StageStats
from dashboard.planner import OperationFilter, QueryPlanner
from dashboard.sorted_keys import Key
from dashboard.store import SummaryStore
from dashboard.stuck import Stuck, StuckScheduler
from dashboard.summary import OpSummary, Summarizer
from kvstate import Change, Operation, Pipeline

__all__ = ["OperationIndex"]


class OperationIndex:
    """Summaries of every operation in the bucket, with counts kept up to date per change.

    ``store``, ``planner``, ``aggregates`` and ``scheduler`` are its parts; callers use the
    methods here, which keep them in step (a change touches all of them, in one order).
    """

    def __init__(self, stats_window: float = 900.0) -> None:
        self.stats_window = stats_window
        self.pipelines: dict[str, Pipeline] = {}
        self.changes = 0
        self.version = 0  # bumped whenever something a page shows may have changed
        self._clear()

    def _clear(self) -> None:
        self._summarizer = Summarizer()
        self.store = SummaryStore()
        self.aggregates = LiveAggregates(self.stats_window)
        self.scheduler = StuckScheduler(self.store, self.pipelines)
        self.planner = QueryPlanner(self.store, self.scheduler)

    # ------------------------------------------------------------------ feeding

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, op_id: object) -> bool:
        return op_id in self.store

    def get(self, op_id: str) -> OpSummary | None:
        """The summary of ``op_id``, if indexed."""
        return self.store.get(op_id)

    def set_pipeline(self, pipeline: Pipeline) -> None:
        """Remember a pipeline definition (its stage order, deadlines and heartbeat timeout)."""
        self.pipelines[pipeline.name] = pipeline
        self.version += 1

    def reset(self) -> None:
        """Forget every operation (before a watcher replays the bucket again)."""
        self._clear()
        self.version += 1

    def begin_bulk(self) -> None:
        """Defer keeping the age orders sorted (while a watcher replays the bucket)."""
        self.store.begin_bulk()

    def end_bulk(self) -> None:
        """Sort the age order once after a bulk load and build the per-term orders from it."""
        if self.store.end_bulk():
            self.version += 1

    def apply(self, change: Change, now: float) -> None:
        """Apply one watched change: a new value, a removal or a corrupt value."""
        self.changes += 1
        self.version += 1
        if change.operation is not None and not change.deleted:
            self._put(change.operation, now)
            return
        old = self.store.get(change.op_id)
        if change.deleted:
            if old is not None:
                self._replace(old, None)
        else:
            created = old.created if old is not None else now
            self._replace(old, Summarizer.corrupt(change.op_id, change.revision, created, now))

    def _put(self, op: Operation, now: float) -> None:
        new = self._summarizer.summarize(op)
        old = self.store.get(op.id)
        if old is not None and old.revision >= new.revision:
            return  # a replay of something already seen
        self._replace(old, new)
        self.aggregates.note_transitions(old, new, op, now)
        self.scheduler.schedule(op)

    def _replace(self, old: OpSummary | None, new: OpSummary | None) -> None:
        """Swap one operation's summary (None: not there) in the counts, the stuck marks and the orders."""
        if old is not None:
            self.aggregates.uncount(old)
            self.scheduler.forget(old.id)  # a changed operation is scheduled again by _put
        if new is not None:
            self.aggregates.count(new)
        self.store.replace(old, new)

    def tick(self, now: float) -> bool:
        """Mark stages whose deadline or heartbeat timeout passed; True when any became stuck."""
        found = self.scheduler.tick(now)
        if found:
            self.version += 1
        return found

    # ------------------------------------------------------------------ reading

    def stuck(self, limit: int = 20, pipeline: str | None = None) -> tuple[list[Stuck], int]:
        """The ``limit`` longest-stuck stages and how many are stuck in all (cost: ``limit``, not the index size)."""
        return self.scheduler.longest(limit, pipeline)

    def stuck_stages_of(self, op_id: str) -> dict[str, Stuck]:
        """The stuck stages of one operation."""
        return self.scheduler.stages_of(op_id)

    def status_counts(self, pipeline: str | None = None) -> dict[str, int]:
        """Operations per status (every pipeline when ``pipeline`` is None)."""
        return self.aggregates.status_counts(pipeline)

    def stage_stats(self, pipeline: Pipeline, now: float) -> dict[str, StageStats]:
        """Counts, p50/p95 over the stats window and stuck counts for every stage of ``pipeline``."""
        return self.aggregates.stage_stats(pipeline, now, self.scheduler.counts_by_stage(pipeline.name))

    def throughput(self, now: float, minutes: int = 30) -> list[tuple[int, int, int]]:
        """(minute start epoch, started, finished) for the last ``minutes`` minutes, oldest first."""
        return self.aggregates.throughput(now, minutes)

    def recent_failures(self, limit: int = 10, pipeline: str | None = None) -> list[Failure]:
        """The latest operation failures, newest first."""
        return self.aggregates.recent_failures(limit, pipeline)

    def query(self, flt: OperationFilter, limit: int, after: Key | None = None) -> tuple[list[OpSummary], Key | None]:
        """One page of operations matching ``flt`` in age order after the cursor ``after``, and the next cursor."""
        return self.planner.query(flt, limit, after)

    def count(self, flt: OperationFilter) -> int:
        """How many operations match ``flt`` (walks the candidates of its narrowest term: for tests and small lists)."""
        return self.planner.count(flt)
