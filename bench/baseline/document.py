"""The Operation document of the baseline service and the update rule its clients apply.

This is the design as such services are usually written: a row holds the operation's
status, the stage that reported last, the per-stage statuses (they do not fit in one
``stage`` column once stages run in parallel) and a JSON metadata blob: each stage's
namespace under the stage's name, shared members beside them. A service reports a stage
event by setting that stage's status and attempt, merging its metadata into its own key
and recomputing the operation status. The rule is blind: it applies whatever arrives, in
arrival order, because nothing in the row says which report is the newer one. The naive
variant runs it on the client between a GET and a PUT; the careful variant runs it on the
server under ``SELECT ... FOR UPDATE``.

Metadata patches (``MetadataPatch``) are merged the way ``jsonb ||`` merges: the patch's
top-level members replace the target's. The naive service runs that merge blindly in one
UPDATE; the careful one applies ``guard_metadata_patch`` under the row lock first, the
check a careful team writes with only the row to go by: a stage patch from an attempt
older than the stage's attempt in the row is stale, and so is a patch whose ``expect``
members do not hold.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "CreateOperation",
    "EventKind",
    "MetadataPatch",
    "MetadataResult",
    "OperationDocument",
    "StageEvent",
    "StageRow",
    "WriteResult",
    "apply_stage_event",
    "derive_status",
    "guard_metadata_patch",
    "merge_metadata_patch",
    "new_document",
    "shared_metadata",
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


class MetadataPatch(msgspec.Struct, kw_only=True, frozen=True):
    """PATCH / POST /operations/{id}/metadata: merge ``patch`` into ``stage``'s namespace or the shared metadata.

    ``attempt`` and ``expect`` are read only by the careful service (POST).
    """

    patch: dict[str, object]
    stage: str | None = None
    attempt: int | None = None
    expect: dict[str, object] | None = None


class MetadataResult(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to a metadata patch: whether it was written, why not, and the document after it."""

    applied: bool
    document: OperationDocument
    reason: str | None = None


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
        metadata = _merged_into(doc.metadata, event.stage, event.metadata)
    return msgspec.structs.replace(
        doc, stages=stages, metadata=metadata, stage=event.stage, status=derive_status(stages)
    )


def _namespace(metadata: dict[str, object], stage: str) -> dict[str, object]:
    found = metadata.get(stage)
    return found if isinstance(found, dict) else {}


def _merged_into(metadata: dict[str, object], stage: str | None, patch: dict[str, object]) -> dict[str, object]:
    if stage is None:
        return {**metadata, **patch}
    return {**metadata, stage: {**_namespace(metadata, stage), **patch}}


def shared_metadata(doc: OperationDocument) -> dict[str, object]:
    """The shared members of the metadata blob (everything but the stages' namespaces)."""
    return {name: value for name, value in doc.metadata.items() if name not in doc.stages}


def merge_metadata_patch(doc: OperationDocument, patch: MetadataPatch) -> OperationDocument:
    """The document with ``patch`` merged in as ``jsonb ||`` does (top-level members replaced), unchecked.

    Raises KeyError for a stage the operation does not have.
    """
    if patch.stage is not None and patch.stage not in doc.stages:
        raise KeyError(patch.stage)
    return msgspec.structs.replace(doc, metadata=_merged_into(doc.metadata, patch.stage, patch.patch))


def guard_metadata_patch(doc: OperationDocument, patch: MetadataPatch) -> str | None:
    """Why ``patch`` is stale against ``doc``, or None when it may apply (the careful service's check).

    Raises KeyError for a stage the operation does not have.
    """
    target = shared_metadata(doc)
    if patch.stage is not None:
        row = doc.stages[patch.stage]
        if patch.attempt is not None and patch.attempt < row.attempt:
            return f"metadata of attempt {patch.attempt}; stage {patch.stage} is at attempt {row.attempt}"
        target = _namespace(doc.metadata, patch.stage)
    for name, wanted in (patch.expect or {}).items():
        if target.get(name) != wanted:
            return f"metadata {name!r} is {target.get(name)!r}, the patch expected {wanted!r}"
    return None
