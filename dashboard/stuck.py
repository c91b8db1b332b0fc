"""Which running stages are stuck now: ``StuckScheduler``, fed by ``kvstate.derive.stuck_checks``.

Each change of an operation schedules, per running stage, the moment it becomes stuck
unless the operation changes first (past its deadline, or without a heartbeat for longer
than the pipeline's heartbeat timeout: the one rule in ``kvstate.derive``). The moments
wait in a heap; ``tick(now)`` pops those that have passed and marks the stages whose
operation has not moved on since. Any later change of the operation clears its marks
and schedules it again. Cost per tick: the moments that passed, not the index size.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from dashboard.sorted_keys import Key
from dashboard.store import SummaryStore
from kvstate import Operation, Pipeline, StuckKind, stuck_checks, stuck_reason

__all__ = ["Stuck", "StuckScheduler"]


@dataclass(frozen=True, slots=True)
class Stuck:
    """A running stage past its deadline or without a heartbeat."""

    op_id: str
    pipeline: str
    stage: str
    reason: str
    since: float


class StuckScheduler:
    """The heap of moments stages become stuck, and the stages stuck now (by operation, in the order they stuck)."""

    def __init__(self, store: SummaryStore, pipelines: Mapping[str, Pipeline]) -> None:
        self.store = store
        self.pipelines = pipelines
        self._due: list[tuple[float, str, str, int, StuckKind]] = []  # heap of (due, op id, stage, revision, kind)
        self._stuck: dict[str, dict[str, Stuck]] = {}  # op id -> stage -> Stuck
        # Insertion order is (nearly) the order stages became stuck: tick() pops due times in order.
        self._order: dict[tuple[str, str], Stuck] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (pipeline, stage) -> stuck now

    def schedule(self, op: Operation) -> None:
        """Remember when each running stage of ``op`` (at its revision) becomes stuck."""
        pipeline = self.pipelines.get(op.pipeline)
        if pipeline is None:
            return
        for check in stuck_checks(op, pipeline):  # the one rule (kvstate.derive)
            heapq.heappush(self._due, (check.due.timestamp(), op.id, check.stage, op.revision, check.kind))
        if len(self._due) > 4 * len(self.store) + 1024:
            self._compact()

    def _compact(self) -> None:
        """Drop the moments of revisions that are no longer current."""
        ops = self.store.summaries
        self._due = [e for e in self._due if (op := ops.get(e[1])) is not None and op.revision == e[3]]
        heapq.heapify(self._due)

    def forget(self, op_id: str) -> None:
        """Clear the marks of an operation that changed or went (its new revision is scheduled anew)."""
        for stuck in self._stuck.pop(op_id, {}).values():
            del self._order[(stuck.op_id, stuck.stage)]
            self._counts[(stuck.pipeline, stuck.stage)] -= 1

    def tick(self, now: float) -> bool:
        """Mark stages whose deadline or heartbeat timeout passed; True when any became stuck."""
        found = False
        ops = self.store.summaries
        while self._due and self._due[0][0] <= now:
            due, op_id, stage, revision, kind = heapq.heappop(self._due)
            op = ops.get(op_id)
            if op is None or op.revision != revision or op.done:
                continue  # the operation moved on since this was scheduled
            per_op = self._stuck.setdefault(op_id, {})
            if stage in per_op:
                continue
            entry = per_op[stage] = Stuck(op_id, op.pipeline, stage, self._reason(op.pipeline, stage, kind), due)
            self._order[(op_id, stage)] = entry
            key = (op.pipeline, stage)
            self._counts[key] = self._counts.get(key, 0) + 1
            found = True
        return found

    def _reason(self, pipeline_name: str, stage: str, kind: StuckKind) -> str:
        pipeline = self.pipelines.get(pipeline_name)
        return kind.value if pipeline is None else stuck_reason(pipeline, stage, kind)

    # ------------------------------------------------------------------ reading

    def longest(self, limit: int = 20, pipeline: str | None = None) -> tuple[list[Stuck], int]:
        """The ``limit`` longest-stuck stages and how many are stuck in all (cost: ``limit``, not the index size)."""
        total = sum(n for (name, _), n in self._counts.items() if pipeline is None or name == pipeline)
        found: list[Stuck] = []
        if limit > 0:
            for entry in self._order.values():
                if pipeline is None or entry.pipeline == pipeline:
                    found.append(entry)
                    if len(found) == limit:
                        break
        return sorted(found, key=lambda s: s.since), total

    def stages_of(self, op_id: str) -> dict[str, Stuck]:
        """The stuck stages of one operation."""
        return dict(self._stuck.get(op_id, {}))

    def counts_by_stage(self, pipeline: str) -> dict[str, int]:
        """How many operations have each stage of ``pipeline`` stuck now."""
        return {stage: n for (name, stage), n in self._counts.items() if name == pipeline}

    def is_stuck(self, op_id: str, stage: str | None = None) -> bool:
        """True when ``op_id`` has a stuck stage (``stage``, when given)."""
        stuck = self._stuck.get(op_id)
        if not stuck:
            return False
        return stage is None or stage in stuck

    @property
    def operations(self) -> int:
        """How many operations have a stuck stage."""
        return len(self._stuck)

    def keys_by_age(self, stage: str | None) -> list[Key]:
        """The keys of the operations with a stuck stage (``stage`` when given), sorted.

        Costs the number of stuck operations, not the index size, so a stuck-only list
        does not walk every operation to find the few that are stuck.
        """
        return self.store.keys(
            op_id for op_id, stages in self._stuck.items() if stages and (stage is None or stage in stages)
        )
