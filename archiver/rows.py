"""The archive row of a finished operation: a pure function of the operation.

The writer (``archiver.store``) and the benchmark's raw COPY use the same rows, in the
order of ``COLUMNS``; the reader turns a row back into an ``Operation``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import msgspec

from kvstate.derive import failed_stage
from kvstate.model import Action, CancelInfo, JSONObject, Operation, OpStatus, StageState, Transition

__all__ = [
    "COLUMNS",
    "ArchiveRow",
    "HistoryEntry",
    "decode_history",
    "encode_history",
    "operation_from_record",
    "row_for",
]


class HistoryEntry(msgspec.Struct, array_like=True, frozen=True):
    """A ``Transition`` as the archive stores it: ``[at, to, from, stage, attempt, worker, event]``.

    ``at`` is in microseconds since the operation's ``created_at``. A positional array
    with a small integer instead of an object with an ISO timestamp makes the compressed
    ``history`` of a 20-change operation about 110 bytes smaller (docs/archive.md).
    """

    at: int
    to: str
    from_: str | None = None
    stage: str | None = None
    attempt: int | None = None
    worker: str | None = None
    event: str | None = None


_MICROSECOND = timedelta(microseconds=1)
_encoder = msgspec.json.Encoder()
_stages_decoder = msgspec.json.Decoder(dict[str, StageState])
_history_decoder = msgspec.json.Decoder(list[HistoryEntry])
_object_history_decoder = msgspec.json.Decoder(list[Transition])
_metadata_decoder = msgspec.json.Decoder(dict[str, object])
_cancel_decoder = msgspec.json.Decoder(CancelInfo)
_actions_decoder = msgspec.json.Decoder(list[Action])


class ArchiveRow(NamedTuple):
    """One row of ``archived_operations`` (jsonb columns as encoded JSON)."""

    id: str
    pipeline: str
    status: str
    failed_stage: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime
    duration: float | None
    revision: int
    source: int
    """the bucket incarnation the operation came from (``archive_sources``, migration 0003)"""
    archived_at: datetime
    value_schema: int
    origin: str | None
    cancel: bytes | None
    metadata: bytes
    stages: bytes
    history: bytes
    redrives: int = 0
    """the operation's life: 0, or how many times it was re-driven from the archive (migration 0004)"""
    actions: bytes | None = None
    """its cancels, retries and re-drives (the value's ``actions``), None without any"""


COLUMNS: tuple[str, ...] = ArchiveRow._fields


def row_for(op: Operation, archived_at: datetime, source: int = 0) -> ArchiveRow:
    """The archive row of a terminal operation read from the bucket incarnation ``source``.

    The event-id window (``events``) is not archived: it only serves duplicate detection
    of live updates. ``finished_at`` falls back to ``updated_at`` for values written
    without it.
    """
    finished = op.finished_at or op.updated_at
    return ArchiveRow(
        id=op.id,
        pipeline=op.pipeline,
        status=op.status.value,
        failed_stage=failed_stage(op),
        created_at=op.created_at,
        updated_at=op.updated_at,
        finished_at=finished,
        duration=(finished - op.created_at).total_seconds(),
        revision=op.revision,
        source=source,
        archived_at=archived_at,
        value_schema=op.schema,
        origin=op.origin,
        cancel=_encoder.encode(op.cancel) if op.cancel is not None else None,
        metadata=_encoder.encode(op.metadata),
        stages=_encoder.encode(op.stages),
        history=encode_history(op.history, op.created_at),
        redrives=op.redrives,
        actions=_encoder.encode(op.actions) if op.actions else None,
    )


def encode_history(history: list[Transition], created_at: datetime) -> bytes:
    """The ``history`` column: one ``HistoryEntry`` array per transition."""
    return _encoder.encode(
        [
            HistoryEntry((t.at - created_at) // _MICROSECOND, t.to, t.from_, t.stage, t.attempt, t.worker, t.event)
            for t in history
        ]
    )


def decode_history(raw: bytes, created_at: datetime) -> list[Transition]:
    """The transitions of a ``history`` column: arrays (``encode_history``) or, in rows archived
    before migration 0002, objects as the operation stores them."""
    if raw.lstrip()[1:].lstrip()[:1] == b"{":
        return _object_history_decoder.decode(raw)
    return [
        Transition(
            at=created_at + e.at * _MICROSECOND,
            to=e.to,
            from_=e.from_,
            stage=e.stage,
            attempt=e.attempt,
            worker=e.worker,
            event=e.event,
        )
        for e in _history_decoder.decode(raw)
    ]


def operation_from_record(record: asyncpg.Record | dict[str, Any]) -> Operation:
    """The archived ``Operation`` of a row read with the archive's jsonb codec (JSON as bytes)."""
    get = record.__getitem__
    cancel = get("cancel")
    actions = get("actions")
    metadata: JSONObject = _metadata_decoder.decode(get("metadata"))
    return Operation(
        schema=get("value_schema"),
        id=get("id"),
        pipeline=get("pipeline"),
        status=OpStatus(get("status")),
        created_at=get("created_at"),
        updated_at=get("updated_at"),
        finished_at=get("finished_at"),
        stages=_stages_decoder.decode(get("stages")),
        metadata=metadata,
        cancel=_cancel_decoder.decode(cancel) if cancel is not None else None,
        origin=get("origin"),
        history=decode_history(get("history"), get("created_at")),
        actions=_actions_decoder.decode(actions) if actions is not None else [],
        redrives=get("redrives"),
        revision=get("revision"),
    )
