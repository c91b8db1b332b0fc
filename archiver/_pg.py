"""PostgreSQL set-up shared by the writer and the reader: the json and jsonb codecs, and error translation.

Both codecs travel in binary form (jsonb: a version byte then the JSON text; json: the
text). Writes accept JSON already encoded by msgspec (bytes) or any value msgspec can
encode; reads return the raw JSON bytes, which the caller decodes into the type it
expects. What a lost, restarting or refusing PostgreSQL raises (``DATABASE_ERRORS``,
caught by class) leaves the archiver as ``ArchiveUnavailable`` with PostgreSQL's detail
and hint, the original chained.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import msgspec

from archiver.errors import ArchiveUnavailable

__all__ = ["DATABASE_ERRORS", "database_error", "database_errors", "init_connection"]

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a query on a connection whose backend just went away, found here
)
"""What a lost, restarting or refusing PostgreSQL raises (caught by class, never by text)."""


def database_error(exc: BaseException, what: str) -> ArchiveUnavailable:
    """``exc`` (one of DATABASE_ERRORS) as an ArchiveUnavailable carrying PostgreSQL's detail and hint."""
    return ArchiveUnavailable(
        f"{what}: {type(exc).__name__}: {exc}",
        detail=getattr(exc, "detail", None),
        hint=getattr(exc, "hint", None),
    )


@contextmanager
def database_errors(what: str) -> Iterator[None]:
    """Re-raise DATABASE_ERRORS raised inside the block as ArchiveUnavailable (``what`` failed), cause chained."""
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise database_error(exc, what) from exc


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
