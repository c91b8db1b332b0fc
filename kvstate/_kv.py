"""The thin layer over nats-py's JetStream API: the one place that catches nats errors.

Every write here is revision-checked except ``create`` (which expects "no value yet").
Reads are direct gets (any replica may answer); ``leader=True`` routes a read through
the stream leader, which the update loop uses after repeated conflicts.

Once the bucket is open, "no responders" means no stream leader is subscribed right now:
on a replicated bucket that is a leader election (4-9 s after the leader died), not a
missing bucket. Nothing received such a message, so a publish is sent again, and a read
asked again, with backoff until the store's ``deadline``; only past it does the call
raise ConnectionLostError. BucketError stays for a bucket missing when it is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TypeGuard, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kvstate._connection import SubjectDenied, TLSNotOffered, violations
from kvstate.backoff import Backoff
from kvstate.errors import (
    AuthenticationFailed,
    BucketError,
    BucketNotFound,
    ConflictError,
    ConnectionLostError,
    KvstateError,
    PermissionDenied,
    ValueTooLarge,
)

__all__ = ["BucketConfig", "KvEntry", "KvStore", "is_removal_marker", "nats_errors"]

KV_OPERATION = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"
CONFLICT_CODES = frozenset({10071, 10164})
_SCAN_IDLE = 0.5
"""Seconds without a message after which a scan asks its consumer whether it is done."""
_SCAN_RESTARTS = 5
_PIPELINE_WINDOW = 1024
"""``remove_many``: removals sent before waiting for their acks (the next window waits for these)."""
_STATUS = "Status"
_UNANSWERED_BACKOFF = Backoff(first=0.05, cap=1.0)
"""between two tries of a request nobody answered (a stream electing its leader takes seconds)"""

T = TypeVar("T")

log = logging.getLogger("kvstate.kv")
_MESSAGE_TOO_LARGE = 10054
_STREAM_NOT_FOUND = 10059


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int | None = None
    description: str = ""


class _PubAck(msgspec.Struct, frozen=True):
    seq: int = 0
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One stored revision of a key: a value, or a delete/purge marker (``value`` None)."""

    key: str
    revision: int
    value: bytes | None
    operation: str | None = None
    created: datetime | None = None

    @property
    def deleted(self) -> bool:
        """True for a delete or purge marker."""
        return self.value is None


@dataclass(frozen=True, slots=True)
class BucketConfig:
    """How kvstate creates its bucket (docs/state-format.md#bucket).

    File storage; ``history`` revisions kept per key; values up to ``max_value_size``
    bytes; direct get on (reads served by any replica); per-message TTL allowed so that
    delete markers expire.
    """

    name: str = "operations"
    replicas: int = 1
    history: int = 1
    max_value_size: int = 262144
    description: str = "kvstate: live state of pipeline operations"

    @property
    def stream(self) -> str:
        """The JetStream stream behind the bucket."""
        return f"KV_{self.name}"


@contextmanager
def nats_errors(key: str = "", last: int | None = None, *, bucket_known: bool = False) -> Iterator[None]:
    """Re-raise nats errors raised inside the block as kvstate errors, the original as cause.

    With ``bucket_known`` (the bucket was open), "no responders" is a ConnectionLostError:
    a stream without a leader for a while, not a missing bucket. A subject the server's
    permissions refuse is a PermissionDenied (``kvstate._connection`` raises it as soon as
    the server says so, instead of the timeout the dropped request would end in).
    """
    try:
        yield
    except SubjectDenied as exc:
        raise PermissionDenied(exc.subject, exc.action, exc.hint or (f"for {key!r}" if key else "")) from exc
    except nats.errors.AuthorizationError as exc:
        raise AuthenticationFailed(f"the server refused the credentials: {exc}") from exc
    except TLSNotOffered as exc:
        raise ConnectionLostError(str(exc)) from exc
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise ConflictError(key, last, 1) from exc
    except nats.js.errors.APIError as exc:
        raise _api_error(exc, key, last) from exc
    except nats.js.errors.NoStreamResponseError as exc:
        if bucket_known:
            raise ConnectionLostError(f"no stream leader answered for {key!r} (a leader election?)") from exc
        raise BucketError("no stream answered for the bucket; run `kvstate bucket init`") from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise ConnectionLostError(f"NATS did not answer in time (key {key!r})") from exc
    except nats.errors.NoRespondersError as exc:
        if bucket_known:
            raise ConnectionLostError(
                f"no responders for {key!r}: no stream leader right now (a leader election?)"
            ) from exc
        raise BucketError(f"no responders for {key!r}: the bucket is missing or JetStream is off") from exc
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.StaleConnectionError,
    ) as exc:
        raise ConnectionLostError(f"NATS connection unavailable: {exc}") from exc
    except nats.errors.MaxPayloadError as exc:
        raise ValueTooLarge(key, -1, -1, "the server (its max_payload)") from exc
    except nats.errors.Error as exc:  # anything else nats-py raises still leaves as a kvstate error
        raise KvstateError(f"NATS error on {key!r}: {exc}") from exc


def _api_error(exc: nats.js.errors.APIError, key: str, last: int | None) -> KvstateError:
    """The kvstate error a JetStream API error stands for (``nats_errors``)."""
    if exc.err_code in CONFLICT_CODES:
        return ConflictError(key, last, 1)
    if exc.err_code == _MESSAGE_TOO_LARGE:
        return ValueTooLarge(key, -1, -1, "the stream (its max message size)")
    if exc.err_code == _STREAM_NOT_FOUND:
        return BucketError(f"the bucket's stream is missing ({exc.description}); run `kvstate bucket init`")
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return ConnectionLostError(f"JetStream unavailable: {exc.description}")
    return KvstateError(f"JetStream error {exc.err_code}: {exc.description}")


class KvStore:
    """Revision-checked access to one bucket."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        config: BucketConfig,
        direct: bool,
        timeout: float = 5.0,
        kept_revisions: int | None = None,
        deadline: float = 30.0,
    ) -> None:
        self.nc = nc
        self.js = js
        self.config = config
        self.direct = direct
        self.timeout = timeout
        self.deadline = deadline
        """seconds one call keeps retrying a request no stream leader answered (a leader election)"""
        self.kept_revisions = config.history if kept_revisions is None else kept_revisions
        """revisions the bucket keeps per key (its stream's max_msgs_per_subject)"""
        self._prefix = f"$KV.{config.name}."

    @classmethod
    async def open(
        cls, nc: NATS, config: BucketConfig, *, create: bool, timeout: float, deadline: float = 30.0
    ) -> KvStore:
        """Open the bucket; with ``create``, create it when missing. Verifies its configuration."""
        js = nc.jetstream(timeout=timeout)
        try:
            with nats_errors(config.name):
                info = await js.stream_info(config.stream)
        except BucketError:
            if not create:
                raise BucketNotFound(
                    f"bucket {config.name!r} does not exist; create it with `kvstate bucket init`"
                ) from None
            kv_config = api.KeyValueConfig(
                bucket=config.name,
                description=config.description,
                history=config.history,
                max_value_size=config.max_value_size,
                storage=api.StorageType.FILE,
                replicas=config.replicas,
                direct=True,
            )
            try:
                with nats_errors(config.name):
                    await js.create_key_value(kv_config)
            except KvstateError as exc:
                # A concurrent creator may have won; the verification below decides.
                if "already in use" not in str(exc):
                    raise
            with nats_errors(config.name):
                info = await js.stream_info(config.stream)
        problems = bucket_problems(info.config)
        if problems:
            raise BucketError(f"bucket {config.name!r} is not usable by kvstate: " + "; ".join(problems))
        return cls(
            nc,
            js,
            config,
            direct=bool(info.config.allow_direct),
            timeout=timeout,
            kept_revisions=info.config.max_msgs_per_subject or config.history,
            deadline=deadline,
        )

    def subject(self, key: str) -> str:
        """The stream subject of ``key``."""
        return self._prefix + key

    async def get(self, key: str, *, leader: bool = False) -> KvEntry | None:
        """The latest revision of ``key``; None when missing or deleted."""
        entry = await self._last_message(key, direct=self.direct and not leader)
        return None if entry is None or entry.deleted else entry

    async def last_revision(self, pattern: str) -> int:
        """The stream sequence of the latest message on keys matching ``pattern`` (markers too); 0 if none.

        A leader-routed read: a replica's direct get could answer with an older one.
        """
        entry = await self._last_message(pattern, direct=False)
        return 0 if entry is None else entry.revision

    async def get_revision(self, key: str, revision: int) -> KvEntry | None:
        """Revision ``revision`` of ``key``; None when it is gone or belongs to another key."""

        async def read() -> api.RawStreamMsg | None:
            with nats_errors(key, bucket_known=True):
                try:
                    return await self.js.get_msg(self.config.stream, seq=revision, direct=self.direct)
                except nats.js.errors.NotFoundError:
                    return None

        msg = await self._until_deadline(read)
        if msg is None:
            return None
        if msg.subject != self._prefix + key:
            return None
        return _entry(key, revision, msg.data, msg.headers)

    async def create(self, key: str, value: bytes) -> int:
        """Store ``value`` only if ``key`` holds nothing (or a delete marker); ConflictError otherwise."""
        try:
            return await self._publish(key, value, {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}, 0)
        except ConflictError:
            current = await self._last_message(key, direct=False)
            if current is None or not current.deleted:
                raise
            return await self.update(key, value, current.revision)

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Store ``value`` only if the latest revision of ``key`` is ``last``; ConflictError otherwise."""
        return await self._publish(key, value, {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}, last)

    async def remove(self, key: str, last: int, marker_ttl: float | None) -> int:
        """Remove ``key`` only if its latest revision is ``last``; returns the marker's revision.

        Leaves one marker (so watchers see the removal) that expires after ``marker_ttl``
        seconds when given, so markers never pile up. With a history of 1 the marker is a
        delete: it takes the place of the value, the one revision kept. With a longer
        history it is a purge (``Nats-Rollup: sub``) that also drops the older revisions.
        A purge that drops more than one message makes nats-server recount the pending
        messages of every consumer on the bucket over all its keys, and any purge copies
        each such consumer's unacknowledged set: the delete does neither
        (docs/state-format.md#history).
        """
        return await self._publish(key, b"", self._removal_headers(last, marker_ttl), last)

    async def remove_many(self, items: Sequence[tuple[str, int]], marker_ttl: float | None) -> list[int | KvstateError]:
        """``remove`` of many ``(key, last)`` pairs, pipelined: one result per pair, in order.

        Each result is the marker's revision, or the error of that removal (ConflictError
        when the key moved past ``last``). The markers are published back to back with
        their acks routed to one reply subscription, ``_PIPELINE_WINDOW`` at a time, and
        every window shares one timeout: a removal whose ack does not come in time gets
        a ConnectionLostError (it may still have happened; a removal is safe to retry).
        About a quarter of the client CPU of one ``remove`` call per key.
        """
        results: list[int | KvstateError] = []
        for start in range(0, len(items), _PIPELINE_WINDOW):
            results.extend(await self._remove_window(items[start : start + _PIPELINE_WINDOW], marker_ttl))
        return results

    async def _remove_window(
        self, items: Sequence[tuple[str, int]], marker_ttl: float | None
    ) -> list[int | KvstateError]:
        inbox = self.nc.new_inbox()
        results: list[int | KvstateError | None] = [None] * len(items)
        waiting = len(items)
        all_answered = asyncio.Event()

        async def on_ack(msg: Msg) -> None:
            nonlocal waiting
            index = int(msg.subject[len(inbox) + 1 :])
            if results[index] is None:
                key, last = items[index]
                results[index] = _ack_result(key, last, msg)
                waiting -= 1
                if not waiting:
                    all_answered.set()

        def on_denied(denied: SubjectDenied) -> None:
            # The server drops a removal it refuses: no ack will come, fail it now.
            nonlocal waiting
            for index in positions.get(denied.subject, ()):
                if results[index] is None:
                    results[index] = _translated(denied, items[index][0])
                    waiting -= 1
            if not waiting:
                all_answered.set()

        with nats_errors("remove", bucket_known=True):
            sub = await self.nc.subscribe(inbox + ".*", cb=on_ack)
        positions: dict[str, list[int]] = {}
        tracked = violations(self.nc)
        unwatch: Callable[[], None] | None = None
        if tracked is not None:
            for index, (key, _) in enumerate(items):
                positions.setdefault((self._prefix + key).lower(), []).append(index)
            unwatch = tracked.watch_prefix(self._prefix, on_denied)
        unanswered: KvstateError = ConnectionLostError(f"NATS did not acknowledge a removal within {self.timeout:g}s")
        try:
            publish, prefix = self.nc.publish, self._prefix
            try:
                for index, (key, last) in enumerate(items):
                    await publish(
                        prefix + key, b"", reply=f"{inbox}.{index}", headers=self._removal_headers(last, marker_ttl)
                    )
            except Exception as exc:  # noqa: BLE001 - translated below; what is not a nats error is re-raised
                unanswered = _translated(exc, "remove")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await all_answered.wait()
        finally:
            if unwatch is not None:
                unwatch()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return [unanswered if result is None else result for result in results]

    def _removal_headers(self, last: int, marker_ttl: float | None) -> dict[str, str]:
        headers: dict[str, str] = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
        if self.kept_revisions == 1:
            headers[KV_OPERATION] = "DEL"
        else:
            headers[KV_OPERATION] = "PURGE"
            headers[api.Header.ROLLUP] = "sub"
        if marker_ttl is not None:
            headers[api.Header.MSG_TTL] = f"{max(1, int(marker_ttl))}s"
        return headers

    async def history(self, key: str) -> list[KvEntry]:
        """Every stored revision of ``key``, oldest first (markers included)."""
        return [entry async for entry in self.scan(key, history=True)]

    async def scan(
        self, pattern: str = ">", *, history: bool = False, headers_only: bool = False
    ) -> AsyncIterator[KvEntry]:
        """The latest entry (or with ``history`` every entry) of keys matching ``pattern``, then stop.

        Deleted keys are skipped unless ``history`` is set. Values written after the scan
        started may or may not be included. The scan's consumer is deleted when it ends,
        so it costs the server nothing afterwards.

        nats-server can leave a last-per-subject consumer that was created while keys were
        being purged with messages pending and nothing delivered. A scan that sees its
        consumer make no progress starts again with a fresh one (at most
        ``_SCAN_RESTARTS`` times), skipping what it already yielded.
        """
        last_seq = 0
        yielded: set[str] = set()
        for _ in range(_SCAN_RESTARTS):
            start = last_seq + 1 if history and last_seq else None
            finished = True
            async for entry in self._scan_once(pattern, history, headers_only, start):
                if entry is None:
                    finished = False  # stalled: scan again
                    break
                last_seq = max(last_seq, entry.revision)
                if not history:
                    if entry.key in yielded:
                        continue
                    yielded.add(entry.key)
                yield entry
            if finished:
                return
            log.warning("scan of %r stalled on the server; starting again with a new consumer", pattern)
        raise ConnectionLostError(f"scan of {pattern!r} made no progress after {_SCAN_RESTARTS} attempts")

    async def _scan_once(
        self, pattern: str, history: bool, headers_only: bool, start: int | None
    ) -> AsyncIterator[KvEntry | None]:
        """One consumer's pass; yields None (and stops) when the consumer stalls."""
        queue: asyncio.Queue[KvEntry | None] = asyncio.Queue()
        processed = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal processed
            processed += 1
            entry = self.decode_message(msg)
            if history or not entry.deleted:
                queue.put_nowait(entry)
            if msg.metadata.num_pending == 0:
                queue.put_nowait(None)

        if start is not None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        else:
            policy = api.DeliverPolicy.ALL if history else api.DeliverPolicy.LAST_PER_SUBJECT
            config = api.ConsumerConfig(deliver_policy=policy)
        with nats_errors(pattern, bucket_known=True):
            sub = await self.js.subscribe(
                self._prefix + pattern,
                stream=self.config.stream,
                cb=on_msg,
                ordered_consumer=True,
                config=config,
                headers_only=headers_only,
                inactive_threshold=30.0,
            )
        consumer: str | None = None
        try:
            with nats_errors(pattern, bucket_known=True):
                info = await sub.consumer_info()
            consumer = info.name
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                queue.put_nowait(None)  # nothing matches: no message will come to say so
            progress = -1
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), _SCAN_IDLE)
                except TimeoutError:
                    # The message that would have said "nothing pending" may have been purged
                    # while we scanned: ask the consumer instead of waiting for it forever.
                    with nats_errors(pattern, bucket_known=True):
                        info = await sub.consumer_info()
                    delivered = info.delivered.consumer_seq if info.delivered is not None else 0
                    if info.num_pending == 0 and processed >= delivered and queue.empty():
                        return  # the server has nothing more, and we handled all it sent
                    if delivered == progress and processed >= delivered:
                        yield None  # pending messages, and nothing delivered for two checks
                        return
                    progress = delivered
                    continue
                if item is None:
                    return
                yield item
        finally:
            with contextlib.suppress(Exception):  # closing anyway; the consumer expires by itself
                await sub.unsubscribe()
                if consumer is not None:
                    await self.js.delete_consumer(self.config.stream, consumer)

    async def subscribe(
        self,
        pattern: str,
        cb: Callable[[Msg], Awaitable[None]],
        *,
        start_sequence: int | None,
        timeout: float | None = None,
    ) -> JetStreamContext.PushSubscription:
        """An ordered push consumer on ``pattern``: from ``start_sequence``, or each key's latest value.

        ``timeout``: seconds to wait for the consumer's creation (the store's timeout when None).
        """
        js = self.js if timeout is None else self.nc.jetstream(timeout=timeout)
        if start_sequence is None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        else:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_sequence
            )
        with nats_errors(pattern, bucket_known=True):
            return await js.subscribe(
                self._prefix + pattern,
                stream=self.config.stream,
                cb=cb,
                ordered_consumer=True,
                config=config,
                idle_heartbeat=2.0,
                inactive_threshold=60.0,
            )

    async def consumer_alive(self, sub: JetStreamContext.PushSubscription, timeout: float) -> api.ConsumerInfo:
        """The server's info on ``sub``'s current consumer, within ``timeout`` (kvstate errors otherwise)."""
        name = getattr(sub, "_consumer", None)
        with nats_errors(self.config.stream, bucket_known=True):
            if not name:
                return await sub.consumer_info()
            info: api.ConsumerInfo = await self.js.consumer_info(self.config.stream, name, timeout=timeout)
            return info

    async def release_consumer(self, sub: JetStreamContext.PushSubscription, timeout: float = 2.0) -> None:
        """Unsubscribe ``sub`` and delete its consumer on the server (gone already, or the server
        unreachable: nothing to do; the consumer then expires after its inactivity threshold)."""
        name = getattr(sub, "_consumer", None)  # nats-py keeps the current name as an ordered consumer resets
        with contextlib.suppress(Exception):  # the subscription may already be gone
            await sub.unsubscribe()
        if not name or self.nc.is_closed:
            return
        with contextlib.suppress(Exception):  # best effort: the inactivity threshold is the fallback
            await asyncio.wait_for(self.js.delete_consumer(self.config.stream, name), timeout)

    def decode_message(self, msg: Msg) -> KvEntry:
        """A watch message as an entry."""
        meta = msg.metadata
        return _entry(msg.subject[len(self._prefix) :], meta.sequence.stream, msg.data, msg.headers, meta.timestamp)

    async def info(self) -> api.StreamInfo:
        """The stream info of the bucket (configuration and message counts)."""
        with nats_errors(self.config.name, bucket_known=True):
            return await self.js.stream_info(self.config.stream)

    async def _publish(self, key: str, value: bytes, headers: dict[str, str], last: int) -> int:
        # A JetStream publish is a request whose reply is the stream's ack. Sent with
        # nc.request and the ack decoded by msgspec, it costs a fraction of the client CPU
        # of js.publish (which parses the ack with json and a dataclass): this is the path
        # every update takes.
        subject = self._prefix + key
        give_up: float | None = None
        tries = 0
        while True:
            try:
                reply = await self.nc.request(subject, value, timeout=self.timeout, headers=headers)
                break
            except nats.errors.NoRespondersError as exc:
                # No stream leader subscribed: nothing stored this message, so sending it
                # again is safe, revision check included.
                now = time.monotonic()
                give_up = now + self.deadline if give_up is None else give_up
                if now >= give_up:
                    raise ConnectionLostError(
                        f"no stream leader answered a write of {key!r} within {self.deadline:g}s "
                        "(KVSTATE_DEADLINE): a leader election that has not ended, or the bucket was deleted"
                    ) from exc
                tries += 1
                await asyncio.sleep(min(_UNANSWERED_BACKOFF.delay(tries), give_up - now))
            except Exception:
                with nats_errors(key, last, bucket_known=True):  # a try block costs nothing until something is raised
                    raise
        result = _ack_result(key, last, reply)
        if isinstance(result, KvstateError):
            raise result
        return result

    async def _last_message(self, key: str, *, direct: bool) -> KvEntry | None:
        async def read() -> api.RawStreamMsg | None:
            with nats_errors(key, bucket_known=True):
                try:
                    return await self.js.get_msg(self.config.stream, subject=self._prefix + key, direct=direct)
                except nats.js.errors.NotFoundError:
                    return None

        msg = await self._until_deadline(read)
        return None if msg is None else _entry(key, msg.seq or 0, msg.data, msg.headers)

    async def _until_deadline(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, asked again with backoff while NATS cannot answer it (ConnectionLostError),
        until ``deadline`` seconds have passed: a read changes nothing, so retrying is safe."""
        give_up = time.monotonic() + self.deadline
        tries = 0
        while True:
            try:
                return await read()
            except ConnectionLostError:
                now = time.monotonic()
                if now >= give_up or self.nc.is_closed:
                    raise
                tries += 1
                await asyncio.sleep(min(_UNANSWERED_BACKOFF.delay(tries), give_up - now))


def _translated(exc: Exception, key: str, last: int | None = None) -> KvstateError:
    """The kvstate error ``nats_errors`` turns ``exc`` into; ``exc`` itself is re-raised when it is not a nats error."""
    try:
        with nats_errors(key, last, bucket_known=True):
            raise exc
    except KvstateError as translated:
        return translated


def _ack_result(key: str, last: int, reply: Msg) -> int | KvstateError:
    """The stream sequence a publish ack carries, or the kvstate error it (or a status reply) stands for."""
    status = reply.headers.get(_STATUS) if reply.headers else None
    if status == "503":
        return ConnectionLostError(f"no stream leader answered for {key!r} (a leader election, or the bucket is gone)")
    if status is not None:
        return KvstateError(f"unexpected status {status} publishing to {key!r}")
    try:
        ack = _ack_decoder.decode(reply.data)
    except msgspec.DecodeError:
        return KvstateError(f"unreadable publish ack for {key!r}: {reply.data[:200]!r}")
    if ack.error is None:
        return ack.seq
    error = nats.js.errors.APIError(code=ack.error.code, err_code=ack.error.err_code, description=ack.error.description)
    return _translated(error, key, last)


def is_removal_marker(headers: dict[str, str] | None) -> TypeGuard[dict[str, str]]:
    """True for the headers of a delete or purge marker (KV-Operation DEL/PURGE, or a server marker)."""
    if not headers:
        return False
    operation = headers.get(KV_OPERATION)
    if operation is None:
        return headers.get(MARKER_REASON) is not None
    return operation in ("DEL", "PURGE")


def _entry(
    key: str, revision: int, data: bytes | None, headers: dict[str, str] | None, created: datetime | None = None
) -> KvEntry:
    if is_removal_marker(headers):
        return KvEntry(key, revision, None, headers.get(KV_OPERATION) or "PURGE", created)
    return KvEntry(key, revision, data or b"", "PUT", created)


def bucket_problems(config: api.StreamConfig) -> list[str]:
    """Why a stream configuration does not suit kvstate (empty when it does)."""
    problems = []
    if config.storage != api.StorageType.FILE:
        problems.append("storage must be file")
    if not config.allow_direct:
        problems.append("direct get must be enabled")
    if not config.allow_rollup_hdrs:
        problems.append("rollup headers must be allowed (revision-checked purge)")
    if not config.allow_msg_ttl:
        problems.append("per-message TTL must be allowed (expiring delete markers)")
    if getattr(config, "persist_mode", None) == "async":
        problems.append("persist_mode must not be async (it acknowledges writes before they are on disk)")
    return problems
