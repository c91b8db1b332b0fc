"""Clock and identifier helpers: UTC timestamps and time-ordered ids (ULID)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

__all__ = ["new_ulid", "utcnow"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_ulid(now_ms: int | None = None) -> str:
    """A new ULID: 48-bit millisecond time then 80 random bits, 26 Crockford base32 characters.

    ULIDs sort by creation time as plain strings and use only characters that are legal
    in NATS keys, so they double as operation ids and event ids.
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid_time(ulid: str) -> datetime | None:
    """The creation time encoded in a ULID, or None when the string is not a ULID."""
    if len(ulid) != 26:
        return None
    value = 0
    for char in ulid[:10].upper():
        index = _CROCKFORD.find(char)
        if index < 0:
            return None
        value = value * 32 + index
    return datetime.fromtimestamp(value / 1000, UTC)
