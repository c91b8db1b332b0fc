"""The in-memory index of live operations that every dashboard request reads.

One watcher per process feeds it (``dashboard.feed``); requests never scan the bucket.
It keeps a compact summary per operation (a few hundred bytes, no Operation objects)
and maintains every count incrementally, so the overview costs the same with 1,000 or
100,000 operations in the bucket. Lists walk age orders, sorted (created, id) keys:
one over every operation and one per status, pipeline, worker and (stage, stage
status), so a filtered page walks only the operations its narrowest term admits.
Everything here is plain data and pure-ish methods with an explicit ``now`` (epoch
seconds): no I/O, no clock.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from dashboard.sorted_keys import Key, SortedKeys
from kvstate import (
    Change,
    Operation,
    OpStatus,
    Pipeline,
    StageStatus,
    StuckKind,
    failed_stage,
    stuck_checks,
    stuck_reason,
)

__all__ = [
    "CORRUPT",
    "STAGE_STATUSES",
    "Failure",
    "Key",
    "OpSummary",
    "OperationFilter",
    "OperationIndex",
    "StageStats",
    "Stuck",
]

CORRUPT = "corrupt"
"""The status shown for a key whose value is not a valid operation."""

STAGE_STATUSES: tuple[StageStatus, ...] = tuple(StageStatus)
_CODE = {status: code for code, status in enumerate(STAGE_STATUSES)}
_WAITING = _CODE[StageStatus.WAITING]
_RUNNING = _CODE[StageStatus.RUNNING]
_RETRYING = _CODE[StageStatus.RETRYING]
_SUCCEEDED = _CODE[StageStatus.SUCCEEDED]
_TERMINAL_OP = frozenset(s.value for s in OpStatus if s.terminal)

META_PAIRS = 4
"""Top-level scalar metadata pairs kept per operation for the metadata filter."""
META_TEXT = 48
"""Longest metadata key or value (characters) kept in the index."""
DURATIONS_KEPT = 2048
"""Finished stage attempts remembered per stage for the percentiles."""
FAILURES_KEPT = 20

_Label = TypeVar("_Label")


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class OpSummary:
    """What the index remembers of one operation (slots only: this is the memory budget).

    ``key`` is (created, id): the one tuple every ordered list of the index holds for
    this operation, so each extra list costs a pointer per operation, not a tuple.
    """

    __slots__ = (
        "finished",
        "key",
        "meta",
        "pipeline",
        "revision",
        "stage_codes",
        "stage_names",
        "status",
        "updated",
        "workers",
    )

    def __init__(
        self,
        id: str,
        pipeline: str,
        status: str,
        created: float,
        updated: float,
        finished: float | None,
        revision: int,
        stage_names: tuple[str, ...],
        stage_codes: bytes,
        workers: tuple[str, ...],
        meta: tuple[str, ...],
    ) -> None:
        self.key: Key = (created, id)
        self.pipeline = pipeline
        self.status = status
        self.updated = updated
        self.finished = finished
        self.revision = revision
        self.stage_names = stage_names
        self.stage_codes = stage_codes
        self.workers = workers
        self.meta = meta

    @property
    def id(self) -> str:
        """The operation's id."""
        return self.key[1]

    @property
    def created(self) -> float:
        """When the operation was created (epoch seconds)."""
        return self.key[0]

    @property
    def done(self) -> bool:
        """True once the operation reached a terminal status."""
        return self.status in _TERMINAL_OP

    @property
    def corrupt(self) -> bool:
        """True when the stored value is not a valid operation."""
        return self.status == CORRUPT

    def stages(self) -> Iterator[tuple[str, StageStatus]]:
        """(stage, status) pairs in the operation's stage order."""
        for name, code in zip(self.stage_names, self.stage_codes, strict=True):
            yield name, STAGE_STATUSES[code]

    def stage_status(self, stage: str) -> StageStatus | None:
        """The status of ``stage`` (None when the operation has no such stage)."""
        try:
            return STAGE_STATUSES[self.stage_codes[self.stage_names.index(stage)]]
        except ValueError:
            return None

    @property
    def active_stages(self) -> list[str]:
        """Stages running or retrying now."""
        return [n for n, c in zip(self.stage_names, self.stage_codes, strict=True) if c in (_RUNNING, _RETRYING)]

    @property
    def failed_stages(self) -> list[str]:
        """Stages that failed for good."""
        failed = _CODE[StageStatus.FAILED]
        return [n for n, c in zip(self.stage_names, self.stage_codes, strict=True) if c == failed]

    def metadata_value(self, key: str) -> str | None:
        """The indexed text of top-level metadata ``key`` (None when not indexed)."""
        for i in range(0, len(self.meta), 2):
            if self.meta[i] == key:
                return self.meta[i + 1]
        return None


@dataclass(frozen=True, slots=True)
class Failure:
    """A recently failed operation, for the overview."""

    op_id: str
    pipeline: str
    stage: str | None
    message: str
    at: float


@dataclass(frozen=True, slots=True)
class Stuck:
    """A running stage past its deadline or without a heartbeat."""

    op_id: str
    pipeline: str
    stage: str
    reason: str
    since: float


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


@dataclass(frozen=True, slots=True)
class OperationFilter:
    """A query over the index. Empty fields match everything.

    ``stage`` alone matches operations with that stage running or retrying; with
    ``stage_status`` it matches that status of that stage. ``stuck`` keeps operations
    with a stuck stage (with ``stage``: with that stage stuck); the index checks it, as
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
        """True when ``op`` passes every set field."""
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
            elif status is not self.stage_status or not _counted(op, _CODE[status]):
                return False
        if self.meta_key is not None:
            value = op.metadata_value(self.meta_key)
            if value is None or (self.meta_value is not None and value != self.meta_value):
                return False
        return True


def _counted(op: OpSummary, code: int) -> bool:
    """Stage counts leave out stages still waiting in operations that already finished."""
    return not (code == _WAITING and op.done)


def _stage_labels(op: OpSummary) -> set[tuple[str, int]]:
    """The (stage, status code) lists ``op`` belongs to: its counted stages."""
    return {(name, code) for name, code in zip(op.stage_names, op.stage_codes, strict=True) if _counted(op, code)}


_NO_KEYS = SortedKeys()  # the keys of a value no operation has (never changed)


def _insert(lists: dict[_Label, SortedKeys], label: _Label, key: Key) -> None:
    keys = lists.get(label)
    if keys is None:
        keys = lists[label] = SortedKeys()
    keys.add(key)


def _delete(lists: dict[_Label, SortedKeys], label: _Label, key: Key) -> None:
    keys = lists[label]
    keys.discard(key)
    if not keys:
        del lists[label]  # worker names come and go: keep no empty lists


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


def _metadata_pairs(metadata: dict[str, object]) -> tuple[str, ...]:
    pairs: list[str] = []
    for key, value in metadata.items():
        if len(pairs) >= 2 * META_PAIRS:
            break
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            continue
        if len(key) <= META_TEXT and len(text) <= META_TEXT:
            pairs.append(sys.intern(key))
            pairs.append(sys.intern(text))  # repeated values (countries, tiers) share one string
    return tuple(pairs)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values`` by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class OperationIndex:
    """Summaries of every operation in the bucket, with counts kept up to date per change."""

    def __init__(self, stats_window: float = 900.0) -> None:
        self.stats_window = stats_window
        self.pipelines: dict[str, Pipeline] = {}
        self.changes = 0
        self.version = 0  # bumped whenever something a page shows may have changed
        self._clear()

    def _clear(self) -> None:
        self._ops: dict[str, OpSummary] = {}
        self._order = SortedKeys()  # every operation's key: the age order
        # The age order of the operations with one value of a selective filter term, so a
        # filtered page walks only operations that can match. Kept per change like the
        # counts; during a bulk load only _loading is kept, and end_bulk() builds them all.
        self._by_status: dict[str, SortedKeys] = {}
        self._by_pipeline: dict[str, SortedKeys] = {}
        self._by_worker: dict[str, SortedKeys] = {}
        self._by_stage: dict[tuple[str, int], SortedKeys] = {}  # (stage, status code): counted stages only
        self._loading: list[Key] = []  # the keys in arrival order, during a bulk load
        self._bulk = False
        self._status_counts: dict[str, dict[str, int]] = {}  # pipeline -> status -> n
        self._stage_counts: dict[tuple[str, str], list[int]] = {}  # (pipeline, stage) -> per StageStatus code
        self._durations: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._percentile_cache: dict[tuple[str, str], tuple[object, tuple[float | None, float | None, int]]] = {}
        self._started: dict[int, int] = {}  # minute -> operations created
        self._finished: dict[int, int] = {}  # minute -> operations finished
        self._failures: list[Failure] = []
        self._due: list[tuple[float, str, str, int, StuckKind]] = []  # heap of (due, op id, stage, revision, kind)
        self._stuck: dict[str, dict[str, Stuck]] = {}  # op id -> stage -> Stuck
        # Insertion order is (nearly) the order stages became stuck: tick() pops due times in order.
        self._stuck_order: dict[tuple[str, str], Stuck] = {}
        self._stuck_counts: dict[tuple[str, str], int] = {}  # (pipeline, stage) -> stuck now
        self._shared: dict[object, object] = {}  # interned stage-name and worker tuples

    # ------------------------------------------------------------------ feeding

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op_id: object) -> bool:
        return op_id in self._ops

    def get(self, op_id: str) -> OpSummary | None:
        """The summary of ``op_id``, if indexed."""
        return self._ops.get(op_id)

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
        if not self._bulk:
            self._bulk = True
            self._loading = list(self._order)
            self._order = SortedKeys()
            self._by_status, self._by_pipeline, self._by_worker, self._by_stage = {}, {}, {}, {}

    def end_bulk(self) -> None:
        """Sort the age order once after a bulk load and build the per-term orders from it."""
        if self._bulk:
            self._bulk = False
            self._loading.sort()
            self._build_orders(self._loading)
            self._loading = []
            self.version += 1

    def _build_orders(self, ordered: list[Key]) -> None:
        """Every age order from the sorted keys of all operations: appended in order, no sort."""
        by_status: defaultdict[str, list[Key]] = defaultdict(list)
        by_pipeline: defaultdict[str, list[Key]] = defaultdict(list)
        by_worker: defaultdict[str, list[Key]] = defaultdict(list)
        by_stage: defaultdict[tuple[str, int], list[Key]] = defaultdict(list)
        ops = self._ops
        for key in ordered:
            op = ops[key[1]]
            by_status[op.status].append(key)
            by_pipeline[op.pipeline].append(key)
            for worker in op.workers:
                by_worker[worker].append(key)
            uncounted = _WAITING if op.done else -1
            for label in zip(op.stage_names, op.stage_codes, strict=True):
                if label[1] != uncounted:
                    by_stage[label].append(key)
        self._order = SortedKeys(ordered)
        self._by_status = {label: SortedKeys(keys) for label, keys in by_status.items()}
        self._by_pipeline = {label: SortedKeys(keys) for label, keys in by_pipeline.items()}
        self._by_worker = {label: SortedKeys(keys) for label, keys in by_worker.items()}
        self._by_stage = {label: SortedKeys(keys) for label, keys in by_stage.items()}

    def apply(self, change: Change, now: float) -> None:
        """Apply one watched change: a new value, a removal or a corrupt value."""
        self.changes += 1
        self.version += 1
        if change.deleted:
            self._remove(change.op_id)
            return
        if change.operation is None:
            self._put_corrupt(change.op_id, change.revision, now)
            return
        self._put(change.operation, now)

    def _share(self, value: tuple[str, ...]) -> tuple[str, ...]:
        shared = self._shared.setdefault(value, value)
        assert isinstance(shared, tuple)
        return shared

    def _summarize(self, op: Operation) -> OpSummary:
        names = self._share(tuple(sys.intern(n) for n in op.stages))
        codes = bytes(_CODE[st.status] for st in op.stages.values())
        workers = self._share(tuple(sorted({sys.intern(st.worker) for st in op.stages.values() if st.worker})))
        created = op.created_at.timestamp()
        return OpSummary(
            id=op.id,
            pipeline=sys.intern(op.pipeline),
            status=op.status.value,
            created=created,
            updated=op.updated_at.timestamp(),
            finished=_ts(op.finished_at),
            revision=op.revision,
            stage_names=names,
            stage_codes=codes,
            workers=workers,
            meta=_metadata_pairs(op.metadata),
        )

    def _put(self, op: Operation, now: float) -> None:
        new = self._summarize(op)
        old = self._ops.get(op.id)
        if old is not None and old.revision >= new.revision:
            return  # a replay of something already seen
        self._replace(old, new)
        self._note_transitions(old, new, op, now)
        self._schedule_stuck(op, now)

    def _put_corrupt(self, op_id: str, revision: int, now: float) -> None:
        old = self._ops.get(op_id)
        created = old.created if old is not None else now
        self._replace(old, OpSummary(op_id, "", CORRUPT, created, now, None, revision, (), b"", (), ()))

    def _remove(self, op_id: str) -> None:
        old = self._ops.get(op_id)
        if old is not None:
            self._replace(old, None)

    def _replace(self, old: OpSummary | None, new: OpSummary | None) -> None:
        """Swap one operation's summary (None: not there) in the counts and the orders."""
        if old is not None:
            self._uncount(old)
        if new is not None:
            self._count(new)
        if old is not None and new is not None and old.key == new.key:
            new.key = old.key  # keep one key tuple per operation in every list
            if not self._bulk:
                self._relink(old, new)
            return
        if old is not None:
            if self._bulk:
                self._loading.remove(old.key)  # rare during a replay: each key comes once
            else:
                self._order.discard(old.key)
                self._unlink(old)
        if new is not None:
            if self._bulk:
                self._loading.append(new.key)
            else:
                self._order.add(new.key)
                self._link(new)

    def _link(self, op: OpSummary) -> None:
        key = op.key
        _insert(self._by_status, op.status, key)
        _insert(self._by_pipeline, op.pipeline, key)
        for worker in op.workers:
            _insert(self._by_worker, worker, key)
        for label in _stage_labels(op):
            _insert(self._by_stage, label, key)

    def _unlink(self, op: OpSummary) -> None:
        key = op.key
        _delete(self._by_status, op.status, key)
        _delete(self._by_pipeline, op.pipeline, key)
        for worker in op.workers:
            _delete(self._by_worker, worker, key)
        for label in _stage_labels(op):
            _delete(self._by_stage, label, key)

    def _relink(self, old: OpSummary, new: OpSummary) -> None:
        """Move a changed operation between per-term lists: only the lists it joins or leaves."""
        key = new.key
        if old.status != new.status:
            _delete(self._by_status, old.status, key)
            _insert(self._by_status, new.status, key)
        if old.pipeline != new.pipeline:
            _delete(self._by_pipeline, old.pipeline, key)
            _insert(self._by_pipeline, new.pipeline, key)
        if old.workers != new.workers:
            for worker in old.workers:
                if worker not in new.workers:
                    _delete(self._by_worker, worker, key)
            for worker in new.workers:
                if worker not in old.workers:
                    _insert(self._by_worker, worker, key)
        if old.stage_codes != new.stage_codes or old.stage_names != new.stage_names or old.done != new.done:
            before, after = _stage_labels(old), _stage_labels(new)
            for label in before - after:
                _delete(self._by_stage, label, key)
            for label in after - before:
                _insert(self._by_stage, label, key)

    def _count(self, op: OpSummary) -> None:
        self._ops[op.id] = op
        per_status = self._status_counts.setdefault(op.pipeline, {})
        per_status[op.status] = per_status.get(op.status, 0) + 1
        for name, code in zip(op.stage_names, op.stage_codes, strict=True):
            if _counted(op, code):
                counts = self._stage_counts.setdefault((op.pipeline, name), [0] * len(STAGE_STATUSES))
                counts[code] += 1

    def _uncount(self, op: OpSummary) -> None:
        del self._ops[op.id]
        for stuck in self._stuck.pop(op.id, {}).values():
            del self._stuck_order[(stuck.op_id, stuck.stage)]
            self._stuck_counts[(stuck.pipeline, stuck.stage)] -= 1
        self._status_counts[op.pipeline][op.status] -= 1
        for name, code in zip(op.stage_names, op.stage_codes, strict=True):
            if _counted(op, code):
                self._stage_counts[(op.pipeline, name)][code] -= 1

    def _note_transitions(self, old: OpSummary | None, new: OpSummary, op: Operation, now: float) -> None:
        horizon = now - self.stats_window
        if old is None and new.created >= horizon:
            minute = int(new.created // 60)
            self._started[minute] = self._started.get(minute, 0) + 1
        was_done = old is not None and old.done
        if new.done and not was_done and new.finished is not None and new.finished >= horizon:
            minute = int(new.finished // 60)
            self._finished[minute] = self._finished.get(minute, 0) + 1
            if new.status == OpStatus.FAILED.value:
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
        stage = failed_stage(op)
        error = op.stage(stage).error if stage is not None else None
        message = error.message[:200] if error is not None else "failed"
        self._failures.append(Failure(op.id, op.pipeline, stage, message, at))
        if len(self._failures) > 2 * FAILURES_KEPT:
            self._failures = heapq.nlargest(FAILURES_KEPT, self._failures, key=lambda f: f.at)

    # ------------------------------------------------------------------ stuck stages

    def _schedule_stuck(self, op: Operation, now: float) -> None:
        pipeline = self.pipelines.get(op.pipeline)
        if pipeline is None:
            return
        for check in stuck_checks(op, pipeline):  # the one rule (kvstate.derive)
            heapq.heappush(self._due, (check.due.timestamp(), op.id, check.stage, op.revision, check.kind))
        if len(self._due) > 4 * len(self._ops) + 1024:
            self._compact_due()

    def _compact_due(self) -> None:
        self._due = [e for e in self._due if (op := self._ops.get(e[1])) is not None and op.revision == e[3]]
        heapq.heapify(self._due)

    def tick(self, now: float) -> bool:
        """Mark stages whose deadline or heartbeat timeout passed; True when any became stuck."""
        found = False
        while self._due and self._due[0][0] <= now:
            due, op_id, stage, revision, kind = heapq.heappop(self._due)
            op = self._ops.get(op_id)
            if op is None or op.revision != revision or op.done:
                continue  # the operation moved on since this was scheduled
            reason = self._stuck_reason(op.pipeline, stage, kind)
            per_op = self._stuck.setdefault(op_id, {})
            if stage in per_op:
                continue
            entry = per_op[stage] = Stuck(op_id, op.pipeline, stage, reason, due)
            self._stuck_order[(op_id, stage)] = entry
            key = (op.pipeline, stage)
            self._stuck_counts[key] = self._stuck_counts.get(key, 0) + 1
            found = True
        if found:
            self.version += 1
        return found

    def _stuck_reason(self, pipeline_name: str, stage: str, kind: StuckKind) -> str:
        pipeline = self.pipelines.get(pipeline_name)
        return kind.value if pipeline is None else stuck_reason(pipeline, stage, kind)

    def stuck(self, limit: int = 20, pipeline: str | None = None) -> tuple[list[Stuck], int]:
        """The ``limit`` longest-stuck stages and how many are stuck in all (cost: ``limit``, not the index size)."""
        total = sum(n for (name, _), n in self._stuck_counts.items() if pipeline is None or name == pipeline)
        found: list[Stuck] = []
        if limit > 0:
            for entry in self._stuck_order.values():
                if pipeline is None or entry.pipeline == pipeline:
                    found.append(entry)
                    if len(found) == limit:
                        break
        return sorted(found, key=lambda s: s.since), total

    def stuck_stages_of(self, op_id: str) -> dict[str, Stuck]:
        """The stuck stages of one operation."""
        return dict(self._stuck.get(op_id, {}))

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

    def stage_stats(self, pipeline: Pipeline, now: float) -> dict[str, StageStats]:
        """Counts, p50/p95 over the stats window and stuck counts for every stage of ``pipeline``."""
        horizon = now - self.stats_window
        stuck_per_stage = {stage: n for (name, stage), n in self._stuck_counts.items() if name == pipeline.name}
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
                stuck=stuck_per_stage.get(spec.name, 0),
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

    def query(self, flt: OperationFilter, limit: int, after: Key | None = None) -> tuple[list[OpSummary], Key | None]:
        """One page of operations matching ``flt`` in age order, starting after the cursor ``after``.

        Returns the page and the cursor of the next page (None on the last page). Walks
        only the candidates of the filter's narrowest indexed term (see ``_candidates``).
        """
        page: list[OpSummary] = []
        for key in self._candidates(flt, after):
            op = self._ops[key[1]]
            if self._selects(flt, op):
                if len(page) == limit:
                    return page, page[-1].key
                page.append(op)
        return page, None

    def count(self, flt: OperationFilter) -> int:
        """How many operations match ``flt`` (walks the candidates of its narrowest term: for tests and small lists)."""
        return sum(1 for key in self._candidates(flt, None) if self._selects(flt, self._ops[key[1]]))

    def _selects(self, flt: OperationFilter, op: OpSummary) -> bool:
        if flt.stuck:
            stuck = self._stuck.get(op.id)
            if not stuck or (flt.stage is not None and flt.stage not in stuck):
                return False
        return flt.matches(op)

    def _candidates(self, flt: OperationFilter, after: Key | None) -> Iterator[Key]:
        """Keys that may match ``flt``, in the page's order, after the cursor, within the created range.

        Every indexed term of the filter (statuses, pipeline, worker, stage, stuck) names
        age orders whose union holds every operation matching it; the full age order
        holds them all. This walks the union with the fewest keys in range; the caller
        checks the whole filter on each, so the result is the same whichever is walked.
        """
        low, high = _range(flt, after)
        if self._bulk:  # a query while the bucket replays: sort what has arrived so far
            self._loading.sort()
            best: list[SortedKeys] = [SortedKeys(self._loading)]
        else:
            best = [self._order]
        best_size = best[0].count(low, high)
        for orders in self._term_orders(flt):
            size = sum(keys.count(low, high) for keys in orders)
            if size < best_size:
                best, best_size = orders, size
        if flt.stuck and len(self._stuck) < best_size:
            best = [SortedKeys(self._stuck_order_by_age(flt.stage))]  # sorted per request: few are stuck
        runs = [keys.walk(low, high, flt.newest_first) for keys in best if keys]
        if len(runs) == 1:
            return runs[0]
        return heapq.merge(*runs, reverse=flt.newest_first)

    def _term_orders(self, flt: OperationFilter) -> Iterator[list[SortedKeys]]:
        """For each indexed term of ``flt``, the age orders whose union holds every operation it matches."""
        if self._bulk:
            return  # built by end_bulk()
        if flt.statuses:
            yield [self._by_status.get(status, _NO_KEYS) for status in flt.statuses]
        if flt.pipeline is not None:
            yield [self._by_pipeline.get(flt.pipeline, _NO_KEYS)]
        if flt.worker is not None:
            yield [self._by_worker.get(flt.worker, _NO_KEYS)]
        if flt.stage is not None:
            codes = (_RUNNING, _RETRYING) if flt.stage_status is None else (_CODE[flt.stage_status],)
            yield [self._by_stage.get((flt.stage, code), _NO_KEYS) for code in codes]

    def _stuck_order_by_age(self, stage: str | None) -> list[Key]:
        """The keys of the operations with a stuck stage (``stage`` when given), sorted.

        Costs the number of stuck operations, not the index size, so a stuck-only list
        does not walk every operation to find the few that are stuck.
        """
        return sorted(
            self._ops[op_id].key
            for op_id, stages in self._stuck.items()
            if stages and (stage is None or stage in stages)
        )
