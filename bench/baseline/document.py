"""The Operation document of the baseline service and the update rule its clients apply.

This is the design as such services are usually written: a row holds the operation's
status, the stage that reported last, the per-stage statuses (they do not fit in one
``stage`` column once stages run in parallel) and a JSON metadata blob. A service
reports a stage event by setting that stage's status and attempt, writing its metadata
under its own key and recomputing the operation status. The rule is blind: it applies
whatever arrives, in arrival order, because nothing in the row says which report is the
newer one. The naive variant runs it on the client between a GET and a PUT; the careful
variant runs it on the server under ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "CreateOperation",
    "OperationDocument",
    "StageEvent",
    "StageRow",
    "WriteResult",
    "apply_stage_event",
    "derive_status",
    "new_document",
]

EventKind = Literal["start", "fail", "succeed", "skip"]

_STAGE_STATUS: dict[str, str] = {"start": "running", "fail": "retrying", "succeed": "succeeded", "skip": "skipped"}


class StageRow(msgspec.Struct, kw_only=True, frozen=True):
    """One stage inside the document."""

    status: str = "waiting"
    attempt: int = 0
    optional: bool = False


class OperationDocument(msgspec.Struct, kw_only=True, frozen=True):
    """The whole state of one operation, as GET returns it and PUT replaces it."""

    id: str
    pipeline: str
    status: str = "pending"
    stage: str | None = None
    stages: dict[str, StageRow] = {}
    metadata: dict[str, object] = {}
    revision: int = 0


class CreateOperation(msgspec.Struct, kw_only=True, frozen=True):
    """POST /operations: a new operation with its stages (name -> optional)."""

    id: str
    pipeline: str
    stages: dict[str, bool]
    metadata: dict[str, object] = {}


class StageEvent(msgspec.Struct, kw_only=True, frozen=True):
    """POST /operations/{id}/events: one stage report, applied on the server."""

    stage: str
    kind: EventKind
    attempt: int
    worker: str | None = None
    metadata: dict[str, object] | None = None


class WriteResult(msgspec.Struct, kw_only=True, frozen=True):
    """PUT /operations/{id}: the revision the row got."""

    id: str
    revision: int


def new_document(request: CreateOperation) -> OperationDocument:
    """The document of a new operation: pending, every stage waiting."""
    stages = {name: StageRow(optional=optional) for name, optional in request.stages.items()}
    return OperationDocument(id=request.id, pipeline=request.pipeline, stages=stages, metadata=dict(request.metadata))


def derive_status(stages: dict[str, StageRow]) -> str:
    """failed when a required stage failed; succeeded when every required stage succeeded and
    every optional one finished; pending while nothing moved; running otherwise."""
    finished = {"succeeded", "skipped", "failed"}
    if any(s.status == "failed" and not s.optional for s in stages.values()):
        return "failed"
    if all((s.status in finished) if s.optional else s.status == "succeeded" for s in stages.values()):
        return "succeeded"
    if all(s.status == "waiting" for s in stages.values()):
        return "pending"
    return "running"


def apply_stage_event(doc: OperationDocument, event: StageEvent) -> OperationDocument:
    """The document after ``event``, applied blindly (the way such services do it).

    Raises KeyError for a stage the operation does not have.
    """
    current = doc.stages[event.stage]
    stages = dict(doc.stages)
    stages[event.stage] = StageRow(status=_STAGE_STATUS[event.kind], attempt=event.attempt, optional=current.optional)
    metadata = doc.metadata
    if event.metadata is not None:
        metadata = {**doc.metadata, event.stage: event.metadata}
    return msgspec.structs.replace(
        doc, stages=stages, metadata=metadata, stage=event.stage, status=derive_status(stages)
    )
