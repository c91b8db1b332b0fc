"""Sorting messages without decoding them: the status peek agrees with the codec, and anything odd is
decoded; the stage an archived failure is filed under."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from archiver_support import ROWS_PIPELINE
from hypothesis import given
from hypothesis import strategies as st

from archiver.classify import needs_decoding, peek_status
from kvstate import FailStage, OpStatus, StartStage, SucceedStage, apply_event, failed_stage, new_operation
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


_FINISHED = [s for s in OpStatus if s.terminal]


def _finished_members(status: OpStatus) -> dict[str, object]:
    op = new_operation("op-1", ROWS_PIPELINE, datetime.now(UTC), {"status": "running"})
    value = encode_operation(msgspec.structs.replace(op, status=status, finished_at=op.created_at))
    members: dict[str, object] = msgspec.json.decode(value)
    return members


@given(
    status=st.sampled_from(_FINISHED),
    order=st.permutations(list(_finished_members(OpStatus.SUCCEEDED))),
    nested=st.sampled_from(["pending", "running"]),
    nest_in=st.sampled_from([None, "metadata", "stages", "extra"]),
)
def test_a_finished_operation_in_any_key_order_is_never_peeked_as_unfinished(
    status: OpStatus, order: list[str], nested: str, nest_in: str | None
) -> None:
    members = _finished_members(status)
    if nest_in == "extra":  # an unknown member another client added, ignored by the decoder
        members["extra"] = {"status": nested}
        order = ["extra", *order]
    elif nest_in is not None:
        inner = members[nest_in]
        assert isinstance(inner, dict)
        members[nest_in] = {"status": {"status": nested}} | inner if nest_in == "stages" else {"status": nested} | inner
    value = msgspec.json.encode({key: members[key] for key in order})
    assert peek_status(value) not in (b"pending", b"running")
    assert needs_decoding(value)


@pytest.mark.parametrize(
    "value",
    [
        b'{"schema":1,"metadata":{"status":"running"},"status":"succeeded"}',
        b'{"schema":1,"stages":{"a":{"status":"running"}},"id":"a","pipeline":"p","status":"failed"}',
        b'{"schema":1,"id":"a","pipeline":{"status":"running"},"status":"cancelled"}',
        b'{"schema":1, "id":"a","pipeline":"p","status":"running"}',  # not the codec's spacing
    ],
)
def test_a_value_not_in_the_codecs_order_is_not_trusted_by_the_peek(value: bytes) -> None:
    assert peek_status(value) is None
    assert needs_decoding(value)


def test_the_peek_reads_ids_with_escapes_in_the_codecs_order() -> None:
    op = new_operation('a"b\\c', ROWS_PIPELINE, datetime.now(UTC))
    assert peek_status(encode_operation(op)) == b"pending"
    tricky = b'{"schema":1,"id":"a\\",\\"status\\":\\"running","pipeline":"p","status":"succeeded"}'
    assert peek_status(tricky) == b"succeeded"  # the escaped quotes belong to the id
