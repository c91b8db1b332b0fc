"""The overview's live figures, kept per change: ``LiveAggregates``.

Operations per pipeline and status, stage counts per status, stage durations for p50/p95
over the stats window, operations started and finished per minute, and the recent
failures. Each change adds and removes its operation's share, so reading the figures
costs the number of pipelines and stages, not the number of operations. Plain data and
methods with an explicit ``now`` (epoch seconds): no I/O, no clock.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from dashboard.summary import STAGE_STATUSES, OpSummary, counted
from kvstate import Operation, OpStatus, Pipeline, StageStatus, failed_stage

__all__ = ["DURATIONS_KEPT", "FAILURES_KEPT", "Failure", "LiveAggregates", "StageStats", "percentile"]

DURATIONS_KEPT = 2048
"""Finished stage attempts remembered per stage for the percentiles."""
FAILURES_KEPT = 20
"""Recent failures remembered (at least; trimmed when twice as many arrived)."""
_FAILED = OpStatus.FAILED.value


@dataclass(frozen=True, slots=True)
class Failure:
    """A recently failed operation, for the overview."""

    op_id: str
    pipeline: str
    stage: str | None
    message: str
    at: float


@dataclass(frozen=True, slots=True)
class StageStats:
    """Live counts and recent durations of one stage of one pipeline."""

    name: str
    counts: dict[StageStatus, int]
    p50: float | None
    p95: float | None
    samples: int
    stuck: int
    optional: bool
    deadline: float | None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values`` by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class LiveAggregates:
    """Counts, durations, throughput and failures of the operations in the index."""

    def __init__(self, stats_window: float = 900.0) -> None:
        self.stats_window = stats_window
        self._status_counts: dict[str, dict[str, int]] = {}  # pipeline -> status -> n
        self._stage_counts: dict[tuple[str, str], list[int]] = {}  # (pipeline, stage) -> per StageStatus code
        self._durations: dict[tuple[str, str], deque[tuple[float, float]]] = {}  # (finished, seconds)
        self._percentile_cache: dict[tuple[str, str], tuple[object, tuple[float | None, float | None, int]]] = {}
        self._started: dict[int, int] = {}  # minute -> operations created
        self._finished: dict[int, int] = {}  # minute -> operations finished
        self._failures: list[Failure] = []

    # ------------------------------------------------------------------ feeding

    def count(self, op: OpSummary) -> None:
        """Add ``op``'s share to the status and stage counts."""
        per_status = self._status_counts.setdefault(op.pipeline, {})
        per_status[op.status] = per_status.get(op.status, 0) + 1
        for name, code in zip(op.stage_names, op.stage_codes, strict=True):
            if counted(op, code):
                counts = self._stage_counts.setdefault((op.pipeline, name), [0] * len(STAGE_STATUSES))
                counts[code] += 1

    def uncount(self, op: OpSummary) -> None:
        """Take ``op``'s share out of the status and stage counts."""
        self._status_counts[op.pipeline][op.status] -= 1
        for name, code in zip(op.stage_names, op.stage_codes, strict=True):
            if counted(op, code):
                self._stage_counts[(op.pipeline, name)][code] -= 1

    def note_transitions(self, old: OpSummary | None, new: OpSummary, op: Operation, now: float) -> None:
        """Record what the change from ``old`` to ``new`` (``op`` in full) started, finished or failed."""
        horizon = now - self.stats_window
        if old is None and new.created >= horizon:
            minute = int(new.created // 60)
            self._started[minute] = self._started.get(minute, 0) + 1
        was_done = old is not None and old.done
        if new.done and not was_done and new.finished is not None and new.finished >= horizon:
            minute = int(new.finished // 60)
            self._finished[minute] = self._finished.get(minute, 0) + 1
            if new.status == _FAILED:
                self._note_failure(op, new.finished)
        for name, state in op.stages.items():
            if state.status is not StageStatus.SUCCEEDED or state.finished_at is None:
                continue
            if old is not None and old.stage_status(name) is StageStatus.SUCCEEDED:
                continue
            duration = state.duration
            finished = state.finished_at.timestamp()
            if duration is not None and finished >= horizon:
                key = (new.pipeline, name)
                samples = self._durations.get(key)
                if samples is None:
                    samples = self._durations[key] = deque(maxlen=DURATIONS_KEPT)
                samples.append((finished, duration))

    def _note_failure(self, op: Operation, at: float) -> None:
        stage = failed_stage(op)  # the one rule (kvstate.derive)
        error = op.stage(stage).error if stage is not None else None
        # The stage's own error text, not kvstate.derive.failure_message: the overview's table and
        # /api/overview show the stage beside it, and "stage geo failed: ..." would say it twice.
        # The operation resource's error.message (dashboard.resources) is failure_message.
        message = error.message[:200] if error is not None else "failed"
        self._failures.append(Failure(op.id, op.pipeline, stage, message, at))
        if len(self._failures) > 2 * FAILURES_KEPT:
            self._failures = heapq.nlargest(FAILURES_KEPT, self._failures, key=lambda f: f.at)

    # ------------------------------------------------------------------ reading

    def status_counts(self, pipeline: str | None = None) -> dict[str, int]:
        """Operations per status (every pipeline when ``pipeline`` is None)."""
        totals: dict[str, int] = {}
        for name, per_status in self._status_counts.items():
            if pipeline is not None and name != pipeline:
                continue
            for status, n in per_status.items():
                if n:
                    totals[status] = totals.get(status, 0) + n
        return totals

    def stage_stats(self, pipeline: Pipeline, now: float, stuck: Mapping[str, int]) -> dict[str, StageStats]:
        """Counts, p50/p95 over the stats window and ``stuck`` (per stage) for every stage of ``pipeline``."""
        horizon = now - self.stats_window
        result = {}
        for spec in pipeline.stages:
            counts = self._stage_counts.get((pipeline.name, spec.name), [0] * len(STAGE_STATUSES))
            p50, p95, n = self._percentiles((pipeline.name, spec.name), horizon)
            result[spec.name] = StageStats(
                name=spec.name,
                counts={status: counts[code] for code, status in enumerate(STAGE_STATUSES)},
                p50=p50,
                p95=p95,
                samples=n,
                stuck=stuck.get(spec.name, 0),
                optional=spec.optional,
                deadline=spec.deadline,
            )
        return result

    def _percentiles(self, key: tuple[str, str], horizon: float) -> tuple[float | None, float | None, int]:
        """p50, p95 and sample count of one stage; recomputed only when its samples changed."""
        samples = self._durations.get(key)
        if samples is None:
            return None, None, 0
        trimmed = False
        while samples and samples[0][0] < horizon:
            samples.popleft()
            trimmed = True
        marker = (len(samples), samples[-1] if samples else None)
        cached = self._percentile_cache.get(key)
        if cached is not None and not trimmed and cached[0] == marker:
            return cached[1]
        durations = [d for finished, d in samples if finished >= horizon]
        value = (percentile(durations, 0.50), percentile(durations, 0.95), len(durations))
        self._percentile_cache[key] = (marker, value)
        return value

    def throughput(self, now: float, minutes: int = 30) -> list[tuple[int, int, int]]:
        """(minute start epoch, started, finished) for the last ``minutes`` minutes, oldest first."""
        current = int(now // 60)
        oldest_kept = current - max(minutes, int(self.stats_window // 60) + 1)
        for counter in (self._started, self._finished):
            for minute in [m for m in counter if m < oldest_kept]:
                del counter[minute]
        return [
            (m * 60, self._started.get(m, 0), self._finished.get(m, 0))
            for m in range(current - minutes + 1, current + 1)
        ]

    def recent_failures(self, limit: int = 10, pipeline: str | None = None) -> list[Failure]:
        """The latest operation failures, newest first."""
        failures = [f for f in self._failures if pipeline is None or f.pipeline == pipeline]
        return heapq.nlargest(limit, failures, key=lambda f: f.at)
