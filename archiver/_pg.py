"""PostgreSQL connection set-up shared by the writer and the reader: the json and jsonb codecs.

Both travel in binary form (jsonb: a version byte then the JSON text; json: the text).
Writes accept JSON already encoded by msgspec (bytes) or any value msgspec can encode;
reads return the raw JSON bytes, which the caller decodes into the type it expects.
"""

from __future__ import annotations

import asyncpg
import msgspec

__all__ = ["init_connection"]

_encoder = msgspec.json.Encoder()
_JSONB_VERSION = b"\x01"


def _encode_jsonb(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return _JSONB_VERSION + bytes(value)
    return _JSONB_VERSION + _encoder.encode(value)


def _decode_jsonb(data: bytes) -> bytes:
    return bytes(data[1:])


def _encode_json(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return _encoder.encode(value)


def _decode_json(data: bytes) -> bytes:
    return bytes(data)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Set the json and jsonb codecs on a new connection (``init=`` of the pool)."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=_decode_jsonb, format="binary"
    )
    await conn.set_type_codec("json", schema="pg_catalog", encoder=_encode_json, decoder=_decode_json, format="binary")
