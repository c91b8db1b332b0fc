"""The published contract for foreign writers (docs/contract/): generated from the code, checked in, consistent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import msgspec
import pytest

from kvstate import new_operation
from kvstate.codec import decode_operation, encode_operation
from kvstate.contract import Vector, build_vectors, contract_files, replay
from tests.conftest import PIPELINE

CONTRACT = Path("docs/contract")


@pytest.mark.parametrize("name", sorted(contract_files()))
def test_the_checked_in_contract_is_what_the_code_generates(name: str) -> None:
    """A change of the value format or of the state machine must come with a reviewed change
    of the contract: regenerate it with `python -m kvstate.contract docs/contract`."""
    assert (CONTRACT / name).read_bytes() == contract_files()[name], f"docs/contract/{name} is out of date"


def test_the_vectors_replay_to_the_same_outcomes_and_values() -> None:
    published = json.loads((CONTRACT / "vectors.json").read_text())
    vectors = msgspec.convert(published["vectors"], list[Vector])
    assert [v.name for v in vectors] == [v.name for v in build_vectors()]
    for vector in vectors:
        again = replay(vector)
        assert [(s.outcome, s.error, s.revision_after) for s in again.steps] == [
            (s.outcome, s.error, s.revision_after) for s in vector.steps
        ], vector.name
        assert again.final == vector.final, vector.name
    outcomes = {s.outcome or s.error for v in vectors for s in v.steps}
    assert {"applied", "duplicate", "stale", "InvalidTransition", "UnknownStage"} <= outcomes
    assert {v.final.status.value for v in vectors} >= {"succeeded", "failed", "cancelled", "running"}


def test_every_value_and_event_of_the_vectors_conforms_to_the_published_schemas() -> None:
    operation_schema = json.loads((CONTRACT / "operation.schema.json").read_text())
    event_schema = json.loads((CONTRACT / "event.schema.json").read_text())
    published = json.loads((CONTRACT / "vectors.json").read_text())
    for vector in published["vectors"]:
        jsonschema.validate(vector["final"], operation_schema)
        for step in vector["steps"]:
            jsonschema.validate(step["event"], event_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**published["vectors"][0]["final"], "status": "exploded"}, operation_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "start"}, event_schema)  # no stage


def test_a_stored_value_written_by_the_client_conforms_to_the_schema() -> None:
    schema = json.loads((CONTRACT / "operation.schema.json").read_text())
    op = new_operation("op1", PIPELINE, datetime(2026, 1, 1, tzinfo=UTC), {"a": [1, {"b": None}]}, "e1")
    stored = json.loads(encode_operation(op))
    jsonschema.validate(stored, schema)
    assert "revision" not in stored and "revision" not in schema["$defs"]["Operation"]["properties"]
    assert decode_operation("op.op1", 5, encode_operation(op)).revision == 5
