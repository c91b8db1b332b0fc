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


# Two Crockford characters for every 10-bit value: eight lookups encode the random part.
_PAIRS = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_time_prefix: tuple[int, str] = (-1, "")


def _encode_time(ms: int) -> str:
    chars = []
    for _ in range(10):
        chars.append(_CROCKFORD[ms & 31])
        ms >>= 5
    return "".join(reversed(chars))


def new_ulid(now_ms: int | None = None) -> str:
    """A new ULID: 48-bit millisecond time then 80 random bits, 26 Crockford base32 characters.

    ULIDs sort by creation time as plain strings and use only characters that are legal
    in NATS keys, so they double as operation ids and event ids.
    """
    global _time_prefix
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if _time_prefix[0] != ms:
        _time_prefix = (ms, _encode_time(ms))
    rnd = int.from_bytes(os.urandom(10), "big")
    pairs = _PAIRS
    return (
        _time_prefix[1]
        + pairs[(rnd >> 70) & 1023]
        + pairs[(rnd >> 60) & 1023]
        + pairs[(rnd >> 50) & 1023]
        + pairs[(rnd >> 40) & 1023]
        + pairs[(rnd >> 30) & 1023]
        + pairs[(rnd >> 20) & 1023]
        + pairs[(rnd >> 10) & 1023]
        + pairs[rnd & 1023]
    )


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
