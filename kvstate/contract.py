"""The published contract for writers in other languages: JSON Schemas and conformance vectors.

``docs/contract/`` holds what this module generates (``python -m kvstate.contract
docs/contract`` writes it again; a test fails when the checked-in files differ from what
the code generates, so a change of the format or of the state machine shows up as a
reviewed diff):

- ``operation.schema.json``: a stored operation value (``op.<id>``), JSON Schema 2020-12;
- ``event.schema.json``: one event, as the write service (``kvstate serve``) takes it;
- ``pipeline.schema.json``: a pipeline definition (``pipeline.<name>``);
- ``job.schema.json``: a bulk job record (``job.<id>``, kvstate.jobs);
- ``vectors.json``: event sequences applied to an operation of a fixed pipeline, with the
  outcome of each step (applied, duplicate, stale, or the error it raises) and the operation
  after it. An implementation of the state machine in another language passes when it
  produces the same outcomes and the same final values.

Every step happens at a fixed time (``T0`` plus one second per step), so the values are
exact and the file is the same on every run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from kvstate.errors import KvstateError
from kvstate.events import (
    Cancel,
    Event,
    FailStage,
    Heartbeat,
    MergeMetadata,
    Reopen,
    SkipStage,
    StartStage,
    SucceedStage,
)
from kvstate.jobs import Job
from kvstate.machine import apply_event, new_operation
from kvstate.model import Operation
from kvstate.pipeline import Pipeline, StageSpec

__all__ = ["T0", "VECTOR_PIPELINE", "Step", "Vector", "build_vectors", "replay", "schemas", "write_contract"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)
"""The time of the creation in every vector; step ``n`` happens ``n`` seconds later."""

VECTOR_PIPELINE = Pipeline(
    name="orders",
    heartbeat_timeout=30.0,
    stages=(
        StageSpec(name="ingest"),
        StageSpec(name="validate", after=("ingest",), max_attempts=3),
        StageSpec(name="geo", after=("validate",)),
        StageSpec(name="fraud", after=("validate",)),
        StageSpec(name="profile", after=("validate",), optional=True),
        StageSpec(name="merge", after=("geo", "fraud", "profile")),
    ),
)
"""The pipeline every vector runs on: a chain, three parallel stages (one optional), a join."""


class Step(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event of a vector and what it must do."""

    event: Event
    outcome: str | None = None
    """applied, duplicate or stale; None when the event is refused"""
    error: str | None = None
    """the kvstate error class the event is refused with (nothing changes)"""
    revision_after: int = 0
    """the revision the operation is at after the step (writes count from 1 at the creation)"""


class Vector(msgspec.Struct, kw_only=True):
    """A named event sequence, its expected outcomes and the operation it ends with."""

    name: str
    description: str
    steps: list[Step]
    final: Operation


def _run(name: str, description: str, events: Sequence[Event]) -> Vector:
    op = new_operation(f"vector-{name}", VECTOR_PIPELINE, T0, {"input": name}, f"{name}-create")
    op = msgspec.structs.replace(op, revision=1)
    steps: list[Step] = []
    for i, event in enumerate(events, start=1):
        try:
            decision = apply_event(op, VECTOR_PIPELINE, event, T0 + timedelta(seconds=i))
        except KvstateError as exc:
            steps.append(Step(event=event, error=type(exc).__name__, revision_after=op.revision))
            continue
        if decision.outcome.value == "applied":
            op = msgspec.structs.replace(decision.operation, revision=op.revision + 1)
        steps.append(Step(event=event, outcome=decision.outcome.value, revision_after=op.revision))
    return Vector(name=name, description=description, steps=steps, final=msgspec.structs.replace(op, revision=0))


def _stage(name: str, *, key: str) -> list[Event]:
    return [
        StartStage(stage=name, event_id=f"{key}-{name}-start"),
        SucceedStage(stage=name, event_id=f"{key}-{name}-ok"),
    ]


def build_vectors() -> list[Vector]:
    """The conformance vectors, generated from the state machine."""
    happy: list[Event] = [
        *_stage("ingest", key="h"),
        *_stage("validate", key="h"),
        StartStage(stage="geo", worker="geo-1", event_id="h-geo-start"),
        StartStage(stage="fraud", worker="fraud-1", event_id="h-fraud-start"),
        SkipStage(stage="profile", reason="anonymous", event_id="h-profile-skip"),
        SucceedStage(stage="fraud", metadata={"score": 3}, event_id="h-fraud-ok"),
        Heartbeat(stage="geo", event_id="h-geo-beat"),
        SucceedStage(stage="geo", metadata={"country": "NL"}, event_id="h-geo-ok"),
        *_stage("merge", key="h"),
    ]
    duplicates: list[Event] = [
        *_stage("ingest", key="d"),
        SucceedStage(stage="ingest", event_id="d-ingest-ok"),
        StartStage(stage="ingest", attempt=1, event_id="d-late-start"),
        MergeMetadata(patch={"a": 1, "b": {"c": 2}}, event_id="d-meta"),
        MergeMetadata(patch={"a": 1, "b": {"c": 2}}, event_id="d-meta"),
        MergeMetadata(patch={"b": {"c": None}}, event_id="d-meta-2"),
    ]
    retries: list[Event] = [
        *_stage("ingest", key="r"),
        StartStage(stage="validate", event_id="r-v1"),
        FailStage(stage="validate", error="timeout", retryable=True, code="E_TIMEOUT", event_id="r-v1-fail"),
        StartStage(stage="validate", event_id="r-v2"),
        FailStage(stage="validate", error="timeout", retryable=True, event_id="r-v2-fail"),
        StartStage(stage="validate", event_id="r-v3"),
        FailStage(stage="validate", error="timeout", retryable=True, event_id="r-v3-fail"),
        StartStage(stage="validate", event_id="r-v4"),
    ]
    failure: list[Event] = [
        *_stage("ingest", key="f"),
        *_stage("validate", key="f"),
        StartStage(stage="geo", event_id="f-geo"),
        StartStage(stage="fraud", event_id="f-fraud"),
        StartStage(stage="profile", event_id="f-profile"),
        FailStage(stage="profile", error="optional down", retryable=False, event_id="f-profile-fail"),
        FailStage(stage="fraud", error="card blocked", retryable=False, code="E_CARD", event_id="f-fraud-fail"),
        SucceedStage(stage="geo", event_id="f-geo-late"),
        Reopen(stages=("fraud",), event_id="f-reopen"),
        StartStage(stage="fraud", event_id="f-fraud-2"),
        SucceedStage(stage="fraud", event_id="f-fraud-2-ok"),
    ]
    metadata: list[Event] = [
        StartStage(stage="ingest", event_id="m-a1"),
        MergeMetadata(patch={"rows": 1}, stage="ingest", attempt=1, event_id="m-a1-rows"),
        FailStage(stage="ingest", error="disk full", retryable=True, event_id="m-a1-fail"),
        StartStage(stage="ingest", event_id="m-a2"),
        MergeMetadata(patch={"rows": 2}, stage="ingest", attempt=2, event_id="m-a2-rows"),
        MergeMetadata(patch={"rows": 99}, stage="ingest", attempt=1, event_id="m-a1-late"),
        MergeMetadata(patch={"rows": 3}, stage="ingest", attempt=3, event_id="m-a3-early"),
        MergeMetadata(patch={"owner": "geo"}, expect={"owner": None}, event_id="m-claim-geo"),
        MergeMetadata(patch={"owner": "fraud"}, expect={"owner": None}, event_id="m-claim-fraud"),
        MergeMetadata(patch={"owner": None}, expect={"owner": "geo"}, event_id="m-release-geo"),
    ]
    actions: list[Event] = [
        *_stage("ingest", key="a"),
        StartStage(stage="validate", event_id="a-v1"),
        FailStage(stage="validate", error="bad row", retryable=False, event_id="a-v1-fail"),
        Reopen(stages=("validate",), worker="alice", reason="row fixed upstream", event_id="a-retry"),
        Reopen(stages=("validate",), worker="alice", reason="row fixed upstream", event_id="a-retry"),
        StartStage(stage="validate", event_id="a-v2"),
        Cancel(reason="customer withdrew", worker="support", event_id="a-cancel"),
        Reopen(stages=("ingest",), worker="bob", reason="customer came back", event_id="a-resume"),
        Cancel(reason="customer withdrew", worker="support", event_id="a-cancel"),
    ]
    refused: list[Event] = [
        StartStage(stage="merge", event_id="x-merge-early"),
        StartStage(stage="nope", event_id="x-unknown"),
        SkipStage(stage="ingest", event_id="x-skip-required"),
        MergeMetadata(patch={"fine": True}, event_id="x-meta"),
        Cancel(reason="customer asked", worker="support", event_id="x-cancel"),
        StartStage(stage="ingest", event_id="x-after-cancel"),
        Cancel(reason="again", event_id="x-cancel-2"),
    ]
    return [
        _run("happy", "every stage in order, three of them in parallel, the optional one skipped", happy),
        _run("duplicates", "a redelivered event is a duplicate; a late start is stale; merge patches", duplicates),
        _run("retries", "a stage failing until max_attempts is used up: the operation fails", retries),
        _run(
            "failure-reopen",
            "an optional failure does not fail the operation, a required one does and cancels what runs; "
            "late events are stale; reopen runs the failed stage again",
            failure,
        ),
        _run(
            "metadata",
            "a stage patch from an older attempt is stale, from one not started refused; expect makes a "
            "shared patch a test-and-set",
            metadata,
        ),
        _run(
            "actions",
            "cancels and reopens are recorded in actions (who, why, event id; kept after they leave the event "
            "window, for duplicate detection); a redelivered one is a duplicate; reopen clears a cancellation",
            actions,
        ),
        _run(
            "refused",
            "illegal transitions and unknown stages are refused; a cancelled operation takes no stage",
            refused,
        ),
    ]


def replay(vector: Vector) -> Vector:
    """The vector as this state machine produces it from the vector's events (for conformance checks)."""
    return _run(vector.name, vector.description, [step.event for step in vector.steps])


def schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas of a stored operation, an event and a pipeline definition, by file name."""

    def schema(tp: object, title: str) -> dict[str, Any]:
        found: dict[str, Any] = msgspec.json.schema(tp, schema_hook=_any_json)
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **found}

    operation = schema(Operation, "kvstate operation value (op.<id>)")
    # The revision is the key's KV revision, never part of the stored value.
    operation["$defs"]["Operation"]["properties"].pop("revision")
    job = schema(Job, "kvstate bulk job (job.<id>)")
    job["$defs"]["Job"]["properties"].pop("revision")
    return {
        "operation.schema.json": operation,
        "event.schema.json": schema(Event, "kvstate event (write service request body)"),
        "pipeline.schema.json": schema(Pipeline, "kvstate pipeline definition (pipeline.<name>)"),
        "job.schema.json": job,
    }


def contract_files() -> dict[str, bytes]:
    """Every file of docs/contract/, by name, as this code generates it."""
    files = {name: _pretty(value) for name, value in schemas().items()}
    vectors = msgspec.to_builtins(build_vectors())
    files["vectors.json"] = _pretty({"pipeline": msgspec.to_builtins(VECTOR_PIPELINE), "vectors": vectors})
    return files


def write_contract(directory: Path) -> list[Path]:
    """Write the contract files into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in contract_files().items():
        path = directory / name
        path.write_bytes(data)
        written.append(path)
    return written


def _any_json(tp: type) -> dict[str, Any]:
    """msgspec's ``schema_hook``: metadata values are any JSON (``object`` in the model).

    Raising NotImplementedError is the hook's protocol for "not mine": msgspec then reports
    the type as unsupported, so a new custom type in the model fails loudly here.
    """
    if tp is object:
        return {"description": "any JSON value"}
    raise NotImplementedError(f"no JSON Schema for {tp!r}")


def _pretty(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode()


if __name__ == "__main__":  # python -m kvstate.contract DIRECTORY
    for path in write_contract(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/contract")):
        print(path)
