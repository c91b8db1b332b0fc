"""Sorting consumer messages, and the batch of work for one PostgreSQL transaction.

The archiver's fetch loop sorts every message as it arrives (``classify``):

- removal markers and operations not finished yet need nothing written: they are
  acknowledged at once, without decoding the operation (``peek_status`` reads the
  top-level ``"status"`` member when the value starts exactly as the codec writes it:
  ``schema``, ``id`` and ``pipeline`` first; any other value is decoded);
- finished operations become rows, and values that do not decode become dead letters,
  in a ``WriteBatch``; its messages are acknowledged only after its transaction commits.

A batch is handed to the writer when it holds ``max_size`` rows, when its oldest
message waited ``max_wait`` seconds, or (burst mode) when nothing more is pending.
One batch is written while the next one fills.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeGuard

from nats.aio.msg import Msg

from archiver.rows import ArchiveRow, row_for
from archiver.store import DeadLetter
from kvstate.codec import decode_operation
from kvstate.errors import CorruptValue

__all__ = ["Kind", "WriteBatch", "needs_decoding", "peek_status"]

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


@dataclass
class WriteBatch:
    """Rows and dead letters for one transaction, and the messages to acknowledge after it."""

    opened: float
    """loop time of the first message"""
    source: int = 0
    """the bucket incarnation the messages came from (``ArchiveStore.register_source``)"""
    messages: list[Msg] = field(default_factory=list)
    rows: list[ArchiveRow] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    finished: list[tuple[str, int, float]] = field(default_factory=list)
    """(operation id, revision, finished_at as a timestamp) of each row"""

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, msg: Msg, key: str, revision: int, value: bytes, archived_at: datetime) -> Kind:
        """Decode ``value`` (stored at ``key``/``revision``, maybe a finished operation) into a row or a dead letter.

        RUNNING when it turns out not to be finished (then nothing is kept).
        """
        try:
            op = decode_operation(key, revision, value)
        except CorruptValue as exc:
            self.messages.append(msg)
            self.letters.append(DeadLetter(key, revision, value, exc.detail))
            return Kind.CORRUPT
        if not op.done:
            return Kind.RUNNING
        self.messages.append(msg)
        self.rows.append(row_for(op, archived_at, self.source))
        self.finished.append((op.id, op.revision, (op.finished_at or op.updated_at).timestamp()))
        return Kind.FINISHED


def needs_decoding(value: bytes | None) -> TypeGuard[bytes]:
    """False for markers (``None``) and for values whose peeked status says the operation is not finished."""
    if value is None:
        return False
    return peek_status(value) not in _NOT_FINISHED
