"""kvstate's NATS connection parses message headers exactly as nats-py does, only faster."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from kvstate._connection import Connection

_PIECES = st.sampled_from(
    [
        b"Nats-Expected-Last-Subject-Sequence",
        b"KV-Operation",
        b"Nats-TTL",
        b"a",
        b"x y",
        b"\t",
        b" ",
        b":",
        b"\x1c",
        b"\xc3\xa9",
        b"\xff",
        b"\x0b",
        b"DEL",
        b"300s",
        b"",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xe2\x80\x83",
    ]
)


@given(st.lists(st.lists(_PIECES | st.binary(max_size=6), max_size=6).map(b"".join), max_size=8))
def test_header_lines_parse_like_nats_py(lines: list[bytes]) -> None:
    raw = b"\r\n".join(lines)
    assert Connection._parse_header_lines(raw) == NATS._parse_header_lines(raw)


def test_the_headers_kvstate_writes() -> None:
    raw = b"KV-Operation: DEL\r\nNats-Expected-Last-Subject-Sequence: 41\r\nNats-TTL: 300s\r\n\r\n"
    parsed = Connection._parse_header_lines(raw)
    assert parsed == {"KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": "41", "Nats-TTL": "300s"}
    assert parsed == NATS._parse_header_lines(raw)


def test_odd_names_are_skipped_as_nats_py_does() -> None:
    raw = b"bad name: 1\r\n\xc3\xa9t\xc3\xa9: 2\r\nno colon\r\n: empty name\r\nok:\tspaced \r\n"
    assert Connection._parse_header_lines(raw) == NATS._parse_header_lines(raw) == {"": "empty name", "ok": "spaced"}
