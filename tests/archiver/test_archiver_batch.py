"""Sorting messages without decoding them: the status peek agrees with the codec, and anything odd is
decoded; the stage an archived failure is filed under."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from archiver_support import ROWS_PIPELINE

from archiver.batch import needs_decoding, peek_status
from archiver.rows import failed_stage
from kvstate import FailStage, OpStatus, StartStage, SucceedStage, apply_event, new_operation
from kvstate._kv import is_removal_marker
from kvstate.codec import encode_operation


@pytest.mark.parametrize("status", list(OpStatus))
def test_the_peeked_status_is_the_encoded_one(status: OpStatus) -> None:
    op = new_operation("op-1", ROWS_PIPELINE, datetime.now(UTC), {"status": "running", '"status":"x"': 1})
    value = encode_operation(msgspec.structs.replace(op, status=status))
    assert peek_status(value) == status.value.encode()
    assert needs_decoding(value) is status.terminal


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\x01 not json at all",
        b'{"status":"running"}',  # not the codec's layout: decoded (and dead-lettered) instead
        b'{"schema":1,"id":"a","pipeline":"p"}',
        b'{"schema":1,"id":"a","pipeline":"p","status":"runningggggggggggggggggggggggg"}',
        b'{"schema":1,"id":"a","pipeline":"p","status":"succeeded"',
        b"",
    ],
)
def test_values_that_do_not_peek_as_unfinished_are_decoded(value: bytes) -> None:
    assert needs_decoding(value)


def test_markers_need_no_decoding() -> None:
    assert not needs_decoding(None)


@pytest.mark.parametrize(
    ("headers", "marker"),
    [
        ({"KV-Operation": "DEL", "Nats-TTL": "300s"}, True),
        ({"KV-Operation": "PURGE", "Nats-Rollup": "sub"}, True),
        ({"Nats-Marker-Reason": "MaxAge"}, True),
        ({"Nats-Expected-Last-Subject-Sequence": "4"}, False),
        ({"KV-Operation": "PUT"}, False),
        ({}, False),
        (None, False),
    ],
)
def test_removal_markers_are_told_by_their_headers(headers: dict[str, str] | None, marker: bool) -> None:
    assert is_removal_marker(headers) is marker


def test_the_failed_stage_is_the_one_that_failed_the_operation() -> None:
    from tests.conftest import PIPELINE  # profile is optional and comes before merge

    now = datetime.now(UTC)
    op = new_operation("op-1", PIPELINE, now)
    events = [
        *(e for stage in ("ingest", "validate", "geo", "fraud") for e in (StartStage(stage), SucceedStage(stage))),
        StartStage("profile"),
        FailStage("profile", error="no profile", retryable=False),
        StartStage("merge"),
        FailStage("merge", error="conflict", retryable=False),
    ]
    for event in events:
        op = apply_event(op, PIPELINE, event, now).operation
    assert op.status is OpStatus.FAILED
    assert failed_stage(op) == "merge"
    # with the deciding event gone from the bounded history, the first failed stage stands in
    assert failed_stage(msgspec.structs.replace(op, history=[])) == "profile"
