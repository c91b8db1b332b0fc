"""Sorting the feed's messages: which need a row, which only an acknowledgement.

- removal markers and operations not finished yet need nothing written: they are
  acknowledged at once, without decoding the operation (``peek_status`` reads the
  top-level ``"status"`` member when the value starts exactly as the codec writes it:
  ``schema``, ``id`` and ``pipeline`` first; any other value is decoded);
- finished operations become rows, and values that do not decode dead letters
  (``archiver.batch.WriteBatch``).
"""

from __future__ import annotations

import enum
import re
from typing import TypeGuard

__all__ = ["Kind", "needs_decoding", "peek_status"]

_PEEK_LIMIT = 1024
_NOT_FINISHED = frozenset({b"pending", b"running"})
_PREFIX = re.compile(
    rb'\{"schema":(?:0|[1-9][0-9]{0,9}),'
    rb'"id":"(?:[^"\\\x00-\x1f]|\\.)*",'
    rb'"pipeline":"(?:[^"\\\x00-\x1f]|\\.)*",'
    rb'"status":"([a-z]{1,16})"[,}]'
)
"""the codec's own prefix: schema (an int), id and pipeline (JSON strings), then the status"""


class Kind(enum.Enum):
    """What a message is, for the archiver."""

    MARKER = "marker"
    RUNNING = "running"
    FINISHED = "finished"
    CORRUPT = "corrupt"


def peek_status(value: bytes) -> bytes | None:
    """The status of an encoded operation read without decoding it, or None when not sure.

    Trusted only for a value that starts exactly in the codec's order: ``schema`` (an
    int), ``id`` and ``pipeline`` (JSON strings, parsed strictly, escapes included),
    then ``status``. Any other layout (another client's key order, a nested object
    holding a ``"status"`` key first) gives None, and the caller decodes the value.
    """
    match = _PREFIX.match(value, 0, _PEEK_LIMIT)
    return match.group(1) if match is not None else None


def needs_decoding(value: bytes | None) -> TypeGuard[bytes]:
    """False for markers (``None``) and for values whose peeked status says the operation is not finished."""
    if value is None:
        return False
    return peek_status(value) not in _NOT_FINISHED
