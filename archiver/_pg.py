"""PostgreSQL set-up shared by the writer and the reader: the json and jsonb codecs, and error translation.

Both codecs travel in binary form (jsonb: a version byte then the JSON text; json: the
text). Writes accept JSON already encoded by msgspec (bytes) or any value msgspec can
encode; reads return the raw JSON bytes, which the caller decodes into the type it
expects. What a lost, restarting or refusing PostgreSQL raises (``DATABASE_ERRORS``,
caught by class) leaves the archiver as ``ArchiveUnavailable`` with PostgreSQL's detail
and hint, the original chained; a refused login or a missing privilege as its subclass
``ArchiveAccessDenied``.

Connection URLs go to asyncpg as given, so libpq's TLS parameters (``sslmode``,
``sslrootcert``, ``sslcert``, ``sslkey``, ...) reach the connection unchanged;
``dsn_problem`` rejects what asyncpg could only refuse later, at every connection attempt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec

from archiver.errors import ArchiveAccessDenied, ArchiveUnavailable

__all__ = [
    "DATABASE_ERRORS",
    "SSL_MODES",
    "database_error",
    "database_errors",
    "dsn_problem",
    "init_connection",
]

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a query on a connection whose backend just went away, found here
)
"""What a lost, restarting or refusing PostgreSQL raises (caught by class, never by text)."""


_ACCESS_DENIED = (
    asyncpg.InvalidAuthorizationSpecificationError,  # 28000 no such role, 28P01 wrong password
    asyncpg.InsufficientPrivilegeError,  # 42501 permission denied
)

_SSL_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's sslmode values (asyncpg's default is prefer: TLS when the server offers it)"""


def dsn_problem(dsn: str) -> str | None:
    """Why ``dsn`` cannot be a PostgreSQL URL of the archive (None when it can)."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        return "must be a postgresql:// URL"
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        return f"not a URL ({exc})"
    query = parse_qs(parts.query)
    for mode in query.get("sslmode", []):
        if mode not in SSL_MODES:
            return f"sslmode={mode} is not one of {', '.join(SSL_MODES)}"
    for parameter in _SSL_FILES:
        for path in query.get(parameter, []):
            if not os.path.isfile(path):
                return f"{parameter}={path}: no such file"
    return None


def database_error(exc: BaseException, what: str) -> ArchiveUnavailable:
    """``exc`` (one of DATABASE_ERRORS) as an ArchiveUnavailable carrying PostgreSQL's detail and hint
    (ArchiveAccessDenied when PostgreSQL refused the role)."""
    error_type = ArchiveAccessDenied if isinstance(exc, _ACCESS_DENIED) else ArchiveUnavailable
    return error_type(
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
