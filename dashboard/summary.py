"""What the dashboard's index remembers of one operation: ``OpSummary``, and ``Summarizer`` that makes it.

A summary is a few hundred bytes (slots, interned strings, one byte per stage status):
at 100,000 live operations it is the index's memory budget, so it holds no Operation
objects and shares every repeated tuple and string. Pure values and functions, no I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import datetime

from dashboard.sorted_keys import Key
from kvstate import Operation, OpStatus, StageStatus

__all__ = [
    "CORRUPT",
    "META_PAIRS",
    "META_TEXT",
    "STAGE_CODE",
    "STAGE_STATUSES",
    "OpSummary",
    "Summarizer",
    "counted",
    "stage_labels",
]

CORRUPT = "corrupt"
"""The status shown for a key whose value is not a valid operation."""

STAGE_STATUSES: tuple[StageStatus, ...] = tuple(StageStatus)
"""Every stage status, in the order of the one-byte codes summaries store."""
STAGE_CODE: dict[StageStatus, int] = {status: code for code, status in enumerate(STAGE_STATUSES)}
"""The one-byte code of each stage status."""
_WAITING = STAGE_CODE[StageStatus.WAITING]
_ACTIVE = (STAGE_CODE[StageStatus.RUNNING], STAGE_CODE[StageStatus.RETRYING])
_FAILED = STAGE_CODE[StageStatus.FAILED]
_TERMINAL_OP = frozenset(s.value for s in OpStatus if s.terminal)

META_PAIRS = 4
"""Top-level scalar metadata pairs kept per operation for the metadata filter."""
META_TEXT = 48
"""Longest metadata key or value (characters) kept in the index."""


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
        return [n for n, c in zip(self.stage_names, self.stage_codes, strict=True) if c in _ACTIVE]

    @property
    def failed_stages(self) -> list[str]:
        """Stages that failed for good."""
        return [n for n, c in zip(self.stage_names, self.stage_codes, strict=True) if c == _FAILED]

    def metadata_value(self, key: str) -> str | None:
        """The indexed text of top-level metadata ``key`` (None when not indexed)."""
        for i in range(0, len(self.meta), 2):
            if self.meta[i] == key:
                return self.meta[i + 1]
        return None


def counted(op: OpSummary, code: int) -> bool:
    """Whether a stage of ``op`` in status ``code`` counts: stages still waiting in finished operations do not."""
    return not (code == _WAITING and op.done)


def stage_labels(op: OpSummary) -> set[tuple[str, int]]:
    """The (stage, status code) pairs ``op`` is counted and listed under: its counted stages."""
    return {(name, code) for name, code in zip(op.stage_names, op.stage_codes, strict=True) if counted(op, code)}


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


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


class Summarizer:
    """Makes summaries, sharing one tuple of stage names (and of workers) between operations that have the same."""

    def __init__(self) -> None:
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}

    def _share(self, value: tuple[str, ...]) -> tuple[str, ...]:
        return self._shared.setdefault(value, value)

    def summarize(self, op: Operation) -> OpSummary:
        """The summary of a valid operation."""
        names = self._share(tuple(sys.intern(n) for n in op.stages))
        codes = bytes(STAGE_CODE[st.status] for st in op.stages.values())
        workers = self._share(tuple(sorted({sys.intern(st.worker) for st in op.stages.values() if st.worker})))
        return OpSummary(
            id=op.id,
            pipeline=sys.intern(op.pipeline),
            status=op.status.value,
            created=op.created_at.timestamp(),
            updated=op.updated_at.timestamp(),
            finished=_ts(op.finished_at),
            revision=op.revision,
            stage_names=names,
            stage_codes=codes,
            workers=workers,
            meta=_metadata_pairs(op.metadata),
        )

    @staticmethod
    def corrupt(op_id: str, revision: int, created: float, now: float) -> OpSummary:
        """The summary of a key whose value is not an operation (status ``corrupt``, no stages)."""
        return OpSummary(op_id, "", CORRUPT, created, now, None, revision, (), b"", (), ())
