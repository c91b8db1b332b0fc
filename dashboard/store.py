"""The summaries of the live operations, by id and in age orders: ``SummaryStore``.

An age order holds (created, id) keys sorted (``dashboard.sorted_keys``). The store keeps
one over every operation and one per value of each selective filter term (operation
status, pipeline, worker, and (stage, stage status) for counted stages), so the query
planner (``dashboard.planner``) can walk only the operations a filter's narrowest term
admits. Every order is kept per change; during a bulk load (a watcher replaying the
bucket) only the arrival list is kept, and ``end_bulk`` sorts it once and builds the
rest from it. Plain data, no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TypeVar

from dashboard.sorted_keys import Key, SortedKeys
from dashboard.summary import STAGE_CODE, OpSummary, stage_labels
from kvstate import StageStatus

__all__ = ["SummaryStore"]

_Label = TypeVar("_Label")
_WAITING = STAGE_CODE[StageStatus.WAITING]
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


class SummaryStore:
    """Every operation's summary by id, and the age orders over them."""

    def __init__(self) -> None:
        self._ops: dict[str, OpSummary] = {}
        self._order = SortedKeys()  # every operation's key: the age order
        self._by_status: dict[str, SortedKeys] = {}
        self._by_pipeline: dict[str, SortedKeys] = {}
        self._by_worker: dict[str, SortedKeys] = {}
        self._by_stage: dict[tuple[str, int], SortedKeys] = {}  # (stage, status code): counted stages only
        self._loading: list[Key] = []  # the keys in arrival order, during a bulk load
        self._bulk = False

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op_id: object) -> bool:
        return op_id in self._ops

    def get(self, op_id: str) -> OpSummary | None:
        """The summary of ``op_id``, if stored."""
        return self._ops.get(op_id)

    @property
    def summaries(self) -> Mapping[str, OpSummary]:
        """Every summary by operation id (read-only: change them through ``replace``)."""
        return self._ops

    # ------------------------------------------------------------------ bulk loads

    @property
    def loading(self) -> bool:
        """True during a bulk load: only the full age order can be read, and only through ``every``."""
        return self._bulk

    def begin_bulk(self) -> None:
        """Defer keeping the age orders sorted (while a watcher replays the bucket)."""
        if not self._bulk:
            self._bulk = True
            self._loading = list(self._order)
            self._order = SortedKeys()
            self._by_status, self._by_pipeline, self._by_worker, self._by_stage = {}, {}, {}, {}

    def end_bulk(self) -> bool:
        """Sort the age order once after a bulk load and build the per-term orders from it; False when not loading."""
        if not self._bulk:
            return False
        self._bulk = False
        self._loading.sort()
        self._build_orders(self._loading)
        self._loading = []
        return True

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

    # ------------------------------------------------------------------ changes

    def replace(self, old: OpSummary | None, new: OpSummary | None) -> None:
        """Swap one operation's summary (None: not there) in the store and every age order."""
        if old is not None:
            del self._ops[old.id]
        if new is not None:
            self._ops[new.id] = new
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
        for label in stage_labels(op):
            _insert(self._by_stage, label, key)

    def _unlink(self, op: OpSummary) -> None:
        key = op.key
        _delete(self._by_status, op.status, key)
        _delete(self._by_pipeline, op.pipeline, key)
        for worker in op.workers:
            _delete(self._by_worker, worker, key)
        for label in stage_labels(op):
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
            before, after = stage_labels(old), stage_labels(new)
            for label in before - after:
                _delete(self._by_stage, label, key)
            for label in after - before:
                _insert(self._by_stage, label, key)

    # ------------------------------------------------------------------ the orders

    def every(self) -> SortedKeys:
        """The age order of every operation (during a bulk load: what has arrived so far, sorted now)."""
        if self._bulk:
            self._loading.sort()
            return SortedKeys(self._loading)
        return self._order

    def with_status(self, status: str) -> SortedKeys:
        """The age order of the operations in ``status`` (not kept during a bulk load)."""
        return self._by_status.get(status, _NO_KEYS)

    def of_pipeline(self, pipeline: str) -> SortedKeys:
        """The age order of the operations of ``pipeline`` (not kept during a bulk load)."""
        return self._by_pipeline.get(pipeline, _NO_KEYS)

    def with_worker(self, worker: str) -> SortedKeys:
        """The age order of the operations a stage of which names ``worker`` (not kept during a bulk load)."""
        return self._by_worker.get(worker, _NO_KEYS)

    def with_stage(self, stage: str, code: int) -> SortedKeys:
        """The age order of the operations with ``stage`` counted in status ``code`` (not kept during a bulk load)."""
        return self._by_stage.get((stage, code), _NO_KEYS)

    def keys(self, op_ids: Iterable[str]) -> list[Key]:
        """The keys of ``op_ids`` (all stored), sorted."""
        ops = self._ops
        return sorted(ops[op_id].key for op_id in op_ids)
