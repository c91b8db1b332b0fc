"""The archive row of a finished operation: a pure function of the operation.

The writer (``archiver.store``) and the benchmark's raw COPY use the same rows, in the
order of ``COLUMNS``; the reader turns a row back into an ``Operation``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import msgspec

from kvstate.model import CancelInfo, JSONObject, Operation, OpStatus, StageState, StageStatus, Transition

__all__ = ["COLUMNS", "ArchiveRow", "failed_stage", "operation_from_record", "row_for"]

_encoder = msgspec.json.Encoder()
_stages_decoder = msgspec.json.Decoder(dict[str, StageState])
_history_decoder = msgspec.json.Decoder(list[Transition])
_metadata_decoder = msgspec.json.Decoder(dict[str, object])
_cancel_decoder = msgspec.json.Decoder(CancelInfo)


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
    archived_at: datetime
    value_schema: int
    origin: str | None
    cancel: bytes | None
    metadata: bytes
    stages: bytes
    history: bytes


COLUMNS: tuple[str, ...] = ArchiveRow._fields


def failed_stage(op: Operation) -> str | None:
    """The first stage (in pipeline order) that failed for good, for a failed operation."""
    if op.status is not OpStatus.FAILED:
        return None
    for name, state in op.stages.items():
        if state.status is StageStatus.FAILED:
            return name
    return None


def row_for(op: Operation, archived_at: datetime) -> ArchiveRow:
    """The archive row of a terminal operation.

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
        archived_at=archived_at,
        value_schema=op.schema,
        origin=op.origin,
        cancel=_encoder.encode(op.cancel) if op.cancel is not None else None,
        metadata=_encoder.encode(op.metadata),
        stages=_encoder.encode(op.stages),
        history=_encoder.encode(op.history),
    )


def operation_from_record(record: asyncpg.Record | dict[str, Any]) -> Operation:
    """The archived ``Operation`` of a row read with the archive's jsonb codec (JSON as bytes)."""
    get = record.__getitem__
    cancel = get("cancel")
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
        history=_history_decoder.decode(get("history")),
        revision=get("revision"),
    )
