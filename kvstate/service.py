"""The write service: any NATS client, in any language, reports through the state machine.

``kvstate serve`` runs one; run several, they share the work as a queue group. A service
that cannot use the Python client sends a request and gets the result, with the same
protection as the client gives: the state machine, event ids, compare-and-set, group
commit (docs/state-format.md#writing-from-any-language has the wire format):

    request  kvstate.<bucket>.apply.<operation id>   body: one event, the tagged JSON of kvstate.events
                                                     header If-Match: <revision> (optional)
    request  kvstate.<bucket>.create.<pipeline>      body: {"op_id"?, "metadata"?, "event_id"?, "traceparent"?}
    reply    {"outcome": "applied"|"duplicate"|"stale", "reason": ..., "revision": N, "operation": {...}}
             or {"error": {"code": "INVALID_ARGUMENT"|..., "type": "UnknownStage", "message": "..."}}

Every reply carries the header ``Kvstate-Status`` with the code (``OK`` on success), so a
caller can branch without parsing the body. Nothing raises out of a request: bad input
gets an error reply and the service goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kvstate.client import Client
from kvstate.errors import (
    BucketError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    InvalidTransition,
    KvstateError,
    OperationExists,
    OperationNotFound,
    PermissionDenied,
    RevisionMismatch,
    ValidationError,
    ValueTooLarge,
    WaitTimeout,
)
from kvstate.events import Event
from kvstate.keys import validate_id
from kvstate.model import JSONObject, Operation, UpdateResult

__all__ = ["MAX_REQUEST_BYTES", "QUEUE_GROUP", "WriteService", "error_code", "subject_prefix"]

log = logging.getLogger("kvstate.service")

QUEUE_GROUP = "kvstate-writers"
"""Every write service instance joins this queue group: each request reaches one of them."""

MAX_REQUEST_BYTES = 65536
"""Largest request body accepted (an event is small; metadata belongs in bounded patches)."""

STATUS_HEADER = "Kvstate-Status"

_CODES: tuple[tuple[type[KvstateError], str], ...] = (
    (ValueTooLarge, "INVALID_ARGUMENT"),
    (ValidationError, "INVALID_ARGUMENT"),
    (OperationNotFound, "NOT_FOUND"),
    (OperationExists, "ALREADY_EXISTS"),
    (RevisionMismatch, "FAILED_PRECONDITION"),
    (InvalidTransition, "FAILED_PRECONDITION"),
    (ConflictError, "ABORTED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (ConnectionLostError, "UNAVAILABLE"),
    (BucketError, "UNAVAILABLE"),
    (WaitTimeout, "DEADLINE_EXCEEDED"),
    (CorruptValue, "DATA_LOSS"),
)


def error_code(exc: KvstateError) -> str:
    """The google.rpc code name a kvstate error stands for (AIP-193), ``INTERNAL`` for the rest."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return "INTERNAL"


def subject_prefix(bucket: str) -> str:
    """The subject prefix of the write service of ``bucket``: ``kvstate.<bucket>``."""
    return f"kvstate.{bucket}"


class CreateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of a create request."""

    op_id: str | None = None
    metadata: JSONObject | None = None
    event_id: str | None = None
    traceparent: str | None = None


class _Error(msgspec.Struct, kw_only=True):
    code: str
    type: str
    message: str


class _ErrorReply(msgspec.Struct, kw_only=True):
    error: _Error


class _Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    outcome: str
    revision: int
    operation: Operation
    reason: str | None = None


_event_decoder = msgspec.json.Decoder(Event)
_create_decoder = msgspec.json.Decoder(CreateRequest)
_encoder = msgspec.json.Encoder()


class WriteService:
    """Answers write requests for the bucket of ``client``; use as ``async with WriteService(client):``."""

    def __init__(self, client: Client, *, queue: str = QUEUE_GROUP) -> None:
        self._client = client
        self._queue = queue
        self._prefix = subject_prefix(client.settings.bucket)
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.replies: dict[str, int] = {}
        """replies sent, by code (``OK`` for successes)"""

    @property
    def subjects(self) -> tuple[str, str]:
        """The subjects this service listens on."""
        return (f"{self._prefix}.apply.*", f"{self._prefix}.create.*")

    async def __aenter__(self) -> WriteService:
        nc = self._client._open_store().nc
        apply_subject, create_subject = self.subjects
        self._subs = [
            await nc.subscribe(apply_subject, queue=self._queue, cb=self._on_apply),
            await nc.subscribe(create_subject, queue=self._queue, cb=self._on_create),
        ]
        await nc.flush()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for sub in self._subs:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]  # finish the requests already received
            except Exception as exc:  # noqa: BLE001 - the connection may already be gone
                log.debug("draining the write service subscription failed: %s", exc)
        self._subs = []
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # Each request runs in a task of its own, so a slow compare-and-set on one operation
    # does not hold up requests for others (a subscription callback runs one at a time).
    async def _on_apply(self, msg: Msg) -> None:
        self._spawn(self._apply(msg))

    async def _on_create(self, msg: Msg) -> None:
        self._spawn(self._create(msg))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, msg: Msg) -> None:
        try:
            op_id = validate_id(msg.subject.rsplit(".", 1)[-1])
            event = _event_decoder.decode(_checked_body(msg))
            expected = _if_match(msg.headers)
            result = await self._client.apply(op_id, event, expected_revision=expected)
        except KvstateError as exc:
            await self._fail(msg, exc)
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._fail(msg, ValidationError(f"not a kvstate event: {exc}"))
            return
        await self._succeed(msg, result)

    async def _create(self, msg: Msg) -> None:
        try:
            pipeline = validate_id(msg.subject.rsplit(".", 1)[-1], "pipeline name")
            body = _checked_body(msg)
            request = _create_decoder.decode(body) if body.strip() else CreateRequest()
            op = await self._client.create(
                pipeline,
                op_id=request.op_id,
                metadata=request.metadata,
                event_id=request.event_id,
                traceparent=request.traceparent or (msg.headers or {}).get("traceparent"),
            )
        except KvstateError as exc:
            await self._fail(msg, exc)
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._fail(msg, ValidationError(f"not a create request: {exc}"))
            return
        await self._reply(msg, _encoder.encode(_Reply(outcome="applied", revision=op.revision, operation=op)), "OK")

    async def _succeed(self, msg: Msg, result: UpdateResult) -> None:
        reply = _Reply(
            outcome=result.outcome.value, revision=result.revision, operation=result.operation, reason=result.reason
        )
        await self._reply(msg, _encoder.encode(reply), "OK")

    async def _fail(self, msg: Msg, exc: KvstateError) -> None:
        code = error_code(exc)
        if code in ("INTERNAL", "UNAVAILABLE", "DATA_LOSS"):
            log.warning("write request on %s failed: %s", msg.subject, exc)
        body = _encoder.encode(_ErrorReply(error=_Error(code=code, type=type(exc).__name__, message=str(exc))))
        await self._reply(msg, body, code)

    async def _reply(self, msg: Msg, body: bytes, code: str) -> None:
        self.replies[code] = self.replies.get(code, 0) + 1
        if not msg.reply:
            return  # a plain publish: nobody to answer
        try:
            await self._client._open_store().nc.publish(msg.reply, body, headers={STATUS_HEADER: code})
        except Exception as exc:  # noqa: BLE001 - the caller sees a timeout and retries with the same event id
            log.warning("cannot answer the write request on %s: %s", msg.subject, exc)


def _checked_body(msg: Msg) -> bytes:
    if len(msg.data) > MAX_REQUEST_BYTES:
        raise ValidationError(f"request body of {len(msg.data)} bytes is over the limit of {MAX_REQUEST_BYTES}")
    return msg.data


def _if_match(headers: Mapping[str, str] | None) -> int | None:
    raw = (headers or {}).get("If-Match")
    if raw is None or not raw.strip():
        return None
    text = raw.strip().strip('"')
    if not text.isdigit():
        raise ValidationError(f"If-Match must be a revision number, not {raw!r}")
    return int(text)
