"""Sorting messages without decoding them: the status peek agrees with the codec, and anything odd is decoded."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from archiver_support import ROWS_PIPELINE

from archiver.batch import needs_decoding, peek_status
from kvstate import OpStatus, new_operation
from kvstate._kv import KvEntry
from kvstate.codec import encode_operation


@pytest.mark.parametrize("status", list(OpStatus))
def test_the_peeked_status_is_the_encoded_one(status: OpStatus) -> None:
    op = new_operation("op-1", ROWS_PIPELINE, datetime.now(UTC), {"status": "running", '"status":"x"': 1})
    value = encode_operation(msgspec.structs.replace(op, status=status))
    assert peek_status(value) == status.value.encode()
    entry = KvEntry("op.op-1", 3, value)
    assert needs_decoding(entry) is status.terminal


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
    assert needs_decoding(KvEntry("op.a", 1, value))


def test_markers_need_no_decoding() -> None:
    assert not needs_decoding(KvEntry("op.a", 9, None, "PURGE"))
