"""The recorder: every client call a scenario makes, with what it was asked and what came back.

One ``Call`` per write attempt (a retry is a call of its own): client name, key, operation
(``cas``, ``create``, ``start``, ``succeed`` ...), the revision it expected where known, its
event id or write token, invoke and return times (``time.monotonic``), and the outcome:

- ``ok``: acknowledged, with the revision (and for kvstate updates applied/duplicate/stale);
- ``conflict``: the compare-and-set was refused (ConflictError; the raw code 10071/10164
  from the exception's ``__cause__`` chain is kept);
- ``unknown``: timed out or the connection failed: it may or may not have happened;
- ``error``: any other failure, with the exception's type name (a BucketError reaching a
  caller is one).

Each worker process appends JSON lines to its own file; ``load_calls`` reads them back.
Watchers record ``Seen`` lines: what a watcher delivered, in delivery order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import msgspec
import nats.js.errors

from kvstate import ClientClosedError, ConflictError, ConnectionLostError

__all__ = ["Call", "CallRecorder", "History", "Outcome", "Seen", "classify", "conflict_code", "load_calls", "load_seen"]

Outcome = Literal["ok", "conflict", "unknown", "error"]


class Call(msgspec.Struct, frozen=True, omit_defaults=True):
    """One recorded client call."""

    client: str
    key: str
    op: str
    invoke: float
    ret: float
    outcome: Outcome
    expected: int | None = None
    """the revision a compare-and-set expected (0: the key must not exist); None when unknown"""
    revision: int | None = None
    """the revision the call was acknowledged with (outcome ok)"""
    token: str | None = None
    """the unique write token or event id this call wrote"""
    result: str | None = None
    """kvstate's UpdateResult outcome: applied, duplicate or stale"""
    error: str | None = None
    """the exception's type name (outcomes other than ok)"""
    code: int | None = None
    """the raw JetStream error code behind a conflict (10071, 10164), when found"""


class Seen(msgspec.Struct, frozen=True, omit_defaults=True):
    """One change a watcher delivered."""

    watcher: str
    key: str
    revision: int
    at: float


def conflict_code(exc: BaseException) -> int | None:
    """The JetStream error code on ``exc``'s cause chain (10071 or 10164 for conflicts)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, nats.js.errors.KeyWrongLastSequenceError):
            code = getattr(current, "err_code", None)
            return int(code) if code else 10071
        if isinstance(current, nats.js.errors.APIError) and current.err_code:
            return int(current.err_code)
        current = current.__cause__ or current.__context__
    return None


def classify(exc: BaseException) -> tuple[Outcome, str, int | None]:
    """How a failed call is recorded: its outcome, the exception's type name and any error code."""
    name = type(exc).__name__
    if isinstance(exc, ConflictError):
        return "conflict", name, conflict_code(exc)
    if isinstance(exc, ConnectionLostError | TimeoutError | ClientClosedError):
        return "unknown", name, None
    return "error", name, None


class CallRecorder:
    """``async with history.call(...) as call:`` records one call; ``call.ok(...)`` inside on success.

    An exception leaving the block is classified (``classify``), recorded and re-raised.
    """

    def __init__(
        self, history: History, client: str, key: str, op: str, expected: int | None, token: str | None
    ) -> None:
        self._history = history
        self.client, self.key, self.op, self.expected, self.token = client, key, op, expected, token
        self._invoke = 0.0
        self._revision: int | None = None
        self._result: str | None = None
        self._done = False

    def ok(self, revision: int | None, result: str | None = None) -> None:
        """The call was acknowledged with ``revision`` (and kvstate's outcome ``result``)."""
        self._revision, self._result, self._done = revision, result, True

    async def __aenter__(self) -> Self:
        self._invoke = time.monotonic()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        now = time.monotonic()
        if exc is None:
            if self._done:
                self._history.add(self._call(now, "ok", revision=self._revision, result=self._result))
            return
        outcome, name, code = classify(exc)
        self._history.add(self._call(now, outcome, error=name, code=code))

    def _call(
        self,
        now: float,
        outcome: Outcome,
        *,
        revision: int | None = None,
        result: str | None = None,
        error: str | None = None,
        code: int | None = None,
    ) -> Call:
        return Call(
            client=self.client,
            key=self.key,
            op=self.op,
            invoke=self._invoke,
            ret=now,
            outcome=outcome,
            expected=self.expected,
            revision=revision,
            token=self.token,
            result=result,
            error=error,
            code=code,
        )


class History:
    """Calls recorded by one process, kept in memory and appended to ``path`` as JSON lines."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.calls: list[Call] = []
        self.seen: list[Seen] = []
        self._file: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab")

    def call(
        self, client: str, key: str, op: str, *, expected: int | None = None, token: str | None = None
    ) -> CallRecorder:
        """A recorder for one call (see CallRecorder)."""
        return CallRecorder(self, client, key, op, expected, token)

    def add(self, record: Call | Seen) -> None:
        """Keep one record (and append it to the file)."""
        if isinstance(record, Call):
            self.calls.append(record)
        else:
            self.seen.append(record)
        if self._file is not None:
            kind = b"C" if isinstance(record, Call) else b"S"
            self._file.write(kind + self._encoder.encode(record) + b"\n")

    def close(self) -> None:
        """Flush and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_call_decoder = msgspec.json.Decoder(Call)
_seen_decoder = msgspec.json.Decoder(Seen)


def _lines(paths: Iterable[Path], kind: bytes) -> Iterator[bytes]:
    for path in paths:
        if not path.exists():
            continue
        with path.open("rb") as file:
            for line in file:
                if line.startswith(kind) and line.endswith(b"\n"):  # a torn last line is skipped
                    yield line[1:]


def load_calls(paths: Iterable[Path]) -> list[Call]:
    """Every call recorded in ``paths``."""
    return [_call_decoder.decode(line) for line in _lines(paths, b"C")]


def load_seen(paths: Iterable[Path]) -> list[Seen]:
    """Every watcher delivery recorded in ``paths``, in file order."""
    return [_seen_decoder.decode(line) for line in _lines(paths, b"S")]
