"""Queries over the index: ``OperationFilter``, and ``QueryPlanner`` choosing the candidate keys a filter walks.

Every indexed term of a filter (statuses, pipeline, worker, stage, stuck) names age
orders whose union holds every operation matching it; the full age order holds them all.
The planner walks the union with the fewest keys in the page's range and checks the
whole filter on each operation, so the page is the same whichever it walks: a filter
that matches few operations costs those few, not the size of the bucket.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from dashboard.sorted_keys import Key, SortedKeys
from dashboard.store import SummaryStore
from dashboard.stuck import StuckScheduler
from dashboard.summary import STAGE_CODE, OpSummary, counted
from kvstate import StageStatus

__all__ = ["OperationFilter", "QueryPlanner"]

_ACTIVE = (STAGE_CODE[StageStatus.RUNNING], STAGE_CODE[StageStatus.RETRYING])


@dataclass(frozen=True, slots=True)
class OperationFilter:
    """A query over the index. Empty fields match everything.

    ``stage`` alone matches operations with that stage running or retrying; with
    ``stage_status`` it matches that status of that stage. ``stuck`` keeps operations
    with a stuck stage (with ``stage``: with that stage stuck); the planner checks it, as
    the summaries do not know what is stuck.
    """

    statuses: frozenset[str] = frozenset()
    pipeline: str | None = None
    stage: str | None = None
    stage_status: StageStatus | None = None
    worker: str | None = None
    id_prefix: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    meta_key: str | None = None
    meta_value: str | None = None
    stuck: bool = False
    newest_first: bool = True

    def matches(self, op: OpSummary) -> bool:
        """True when ``op`` passes every set field but ``stuck``."""
        if self.statuses and op.status not in self.statuses:
            return False
        if self.pipeline is not None and op.pipeline != self.pipeline:
            return False
        if self.id_prefix is not None and not op.id.startswith(self.id_prefix):
            return False
        if self.created_after is not None and op.created < self.created_after:
            return False
        if self.created_before is not None and op.created >= self.created_before:
            return False
        if self.worker is not None and self.worker not in op.workers:
            return False
        if self.stage is not None:
            status = op.stage_status(self.stage)
            if status is None:
                return False
            if self.stage_status is None:
                if status not in (StageStatus.RUNNING, StageStatus.RETRYING):
                    return False
            elif status is not self.stage_status or not counted(op, STAGE_CODE[status]):
                return False
        if self.meta_key is not None:
            value = op.metadata_value(self.meta_key)
            if value is None or (self.meta_value is not None and value != self.meta_value):
                return False
        return True


def _range(flt: OperationFilter, after: Key | None) -> tuple[Key | None, Key | None]:
    """Bounds low <= key < high of the keys past the cursor ``after`` and within the created range.

    ``(t, "")`` sorts before every key created at ``t``; ``id + "\\0"`` is the least string
    after ``id``, so ``key >= (created, id + "\\0")`` means ``key > (created, id)``.
    """
    low = None if flt.created_after is None else (flt.created_after, "")
    high = None if flt.created_before is None else (flt.created_before, "")
    if after is not None:
        if flt.newest_first:
            high = after if high is None else min(high, after)
        else:
            past = (after[0], after[1] + "\0")
            low = past if low is None else max(low, past)
    return low, high


class QueryPlanner:
    """Pages and counts of a filter over the store's age orders (and the stuck scheduler's marks)."""

    def __init__(self, store: SummaryStore, stuck: StuckScheduler) -> None:
        self.store = store
        self.stuck = stuck

    def query(self, flt: OperationFilter, limit: int, after: Key | None = None) -> tuple[list[OpSummary], Key | None]:
        """One page of operations matching ``flt`` in age order, starting after the cursor ``after``.

        Returns the page and the cursor of the next page (None on the last page). Walks
        only the candidates of the filter's narrowest indexed term (see ``candidates``).
        """
        page: list[OpSummary] = []
        ops = self.store.summaries
        for key in self.candidates(flt, after):
            op = ops[key[1]]
            if self._selects(flt, op):
                if len(page) == limit:
                    return page, page[-1].key
                page.append(op)
        return page, None

    def count(self, flt: OperationFilter) -> int:
        """How many operations match ``flt`` (walks the candidates of its narrowest term: for tests and small lists)."""
        ops = self.store.summaries
        return sum(1 for key in self.candidates(flt, None) if self._selects(flt, ops[key[1]]))

    def _selects(self, flt: OperationFilter, op: OpSummary) -> bool:
        if flt.stuck and not self.stuck.is_stuck(op.id, flt.stage):
            return False
        return flt.matches(op)

    def candidates(self, flt: OperationFilter, after: Key | None) -> Iterator[Key]:
        """Keys that may match ``flt``, in the page's order, after the cursor, within the created range."""
        low, high = _range(flt, after)
        best: list[SortedKeys] = [self.store.every()]
        best_size = best[0].count(low, high)
        for orders in self._term_orders(flt):
            size = sum(keys.count(low, high) for keys in orders)
            if size < best_size:
                best, best_size = orders, size
        if flt.stuck and self.stuck.operations < best_size:
            best = [SortedKeys(self.stuck.keys_by_age(flt.stage))]  # sorted per request: few are stuck
        runs = [keys.walk(low, high, flt.newest_first) for keys in best if keys]
        if len(runs) == 1:
            return runs[0]
        return heapq.merge(*runs, reverse=flt.newest_first)

    def _term_orders(self, flt: OperationFilter) -> Iterator[list[SortedKeys]]:
        """For each indexed term of ``flt``, the age orders whose union holds every operation it matches."""
        store = self.store
        if store.loading:
            return  # the per-term orders are built once the load ends
        if flt.statuses:
            yield [store.with_status(status) for status in flt.statuses]
        if flt.pipeline is not None:
            yield [store.of_pipeline(flt.pipeline)]
        if flt.worker is not None:
            yield [store.with_worker(flt.worker)]
        if flt.stage is not None:
            codes = _ACTIVE if flt.stage_status is None else (STAGE_CODE[flt.stage_status],)
            yield [store.with_stage(flt.stage, code) for code in codes]
