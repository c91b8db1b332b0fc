"""The demo's work queue: one JetStream stream with WorkQueue retention, one durable
pull consumer per stage. The only demo module that touches nats-py's JetStream API.

A message is a ``WorkItem``: run ``attempt`` of ``stage`` for operation ``op``, not
before ``not_before`` (epoch seconds, for retry back-off). Its ``Nats-Msg-Id`` is
``op.stage.attempt``, so publishing the same work twice within the stream's duplicate
window stores it once. The worker derives its kvstate event ids from the message's
stream sequence (``WorkMessage.event_id``): a redelivery of the same message repeats
them (its updates come back ``duplicate``), while another message for work that already
happened carries new ids and meets the state machine's attempt checks (``stale``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

import kvstate
from demo.errors import QueueError
from kvstate import KvstateError, Settings

__all__ = ["WorkConsumer", "WorkItem", "WorkMessage", "WorkQueue", "close", "connect", "now"]

log = logging.getLogger("demo.queue")

ACK_WAIT = 30.0
"""Seconds a delivered message may go without an ack or in-progress signal before redelivery."""
DUPLICATE_WINDOW = 120.0
MAX_MESSAGES = 100_000


class WorkItem(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One unit of work: an attempt of a stage of an operation."""

    op: str
    stage: str
    attempt: int = 1
    not_before: float | None = None

    @property
    def key(self) -> str:
        """``op.stage.attempt``: the message id that deduplicates publishing the same work."""
        return f"{self.op}.{self.stage}.{self.attempt}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkItem)


@dataclass(slots=True)
class WorkMessage:
    """A delivered work item, where it sits in the stream, and the acknowledgement calls of its message."""

    item: WorkItem
    msg: Msg
    sequence: int
    delivered: int

    def event_id(self, kind: str) -> str:
        """The kvstate event id of this message's ``kind`` of update (start, done, fail, ...).

        The same on every delivery of this message, different for any other message;
        unique within one operation, which is where kvstate compares event ids.
        """
        return f"{self.item.stage}.{self.item.attempt}.{self.sequence}.{kind}"

    async def ack(self) -> None:
        """Done with it: remove it from the work queue."""
        with _quiet("ack"):
            await self.msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        """Hand it back for redelivery, after ``delay`` seconds."""
        with _quiet("nak"):
            await self.msg.nak(delay=delay)

    async def term(self) -> None:
        """Refuse it for good: never redelivered (JetStream counts it as terminated, not acknowledged)."""
        with _quiet("term"):
            await self.msg.term()

    async def in_progress(self) -> None:
        """Still working: reset the ack timer."""
        with _quiet("in_progress"):
            await self.msg.in_progress()


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Acknowledgements are best effort: a lost ack only means a redelivery (a duplicate)."""
    try:
        yield
    except nats.errors.Error as exc:
        log.debug("%s failed: %s", what, exc)


class WorkConsumer:
    """The pull consumer of one stage."""

    def __init__(self, sub: JetStreamContext.PullSubscription, stage: str) -> None:
        self._sub = sub
        self.stage = stage

    async def fetch(self, batch: int, timeout: float) -> list[WorkMessage]:
        """Up to ``batch`` messages, waiting at most ``timeout`` seconds; [] when none came.

        A message that is not a WorkItem is terminated (it would fail on every delivery).
        """
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.Error as exc:
            raise QueueError(f"fetching {self.stage} work failed: {exc!r}") from exc
        found = []
        for msg in msgs:
            try:
                item = _decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                log.warning("dropping a malformed %s message: %s", self.stage, exc)
                with _quiet("term"):
                    await msg.term()
                continue
            found.append(WorkMessage(item, msg, msg.metadata.sequence.stream, msg.metadata.num_delivered))
        return found

    async def close(self) -> None:
        """Stop pulling (the durable consumer stays, with its pending messages)."""
        with _quiet("unsubscribe"):
            await self._sub.unsubscribe()


class WorkQueue:
    """The stream of all stages' work, and its consumers."""

    def __init__(self, js: JetStreamContext, stream: str, prefix: str) -> None:
        self._js = js
        self.stream = stream
        self.prefix = prefix

    @classmethod
    async def open(cls, nc: NATS, stream: str, prefix: str, *, timeout: float = 5.0, replicas: int = 1) -> WorkQueue:
        """Create the stream when missing (work-queue retention, file storage, bounded,
        ``replicas`` copies: the bucket's, so the demo survives what the bucket survives)."""
        js = nc.jetstream(timeout=timeout)
        config = api.StreamConfig(
            name=stream,
            subjects=[f"{prefix}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            max_msgs=MAX_MESSAGES,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW,
            num_replicas=replicas,
            description="kvstate demo: work for the simulated services",
        )
        try:
            try:
                await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise QueueError(f"cannot open the work stream {stream!r}: {exc}") from exc
        return cls(js, stream, prefix)

    def subject(self, stage: str) -> str:
        """The subject carrying ``stage``'s work."""
        return f"{self.prefix}.{stage}"

    async def publish(self, item: WorkItem, *, msg_id: str | None = None) -> bool:
        """Queue ``item``; False when the stream already had this message id (a duplicate)."""
        headers = {"Nats-Msg-Id": msg_id or item.key}
        try:
            ack = await self._js.publish(
                self.subject(item.stage), _encoder.encode(item), stream=self.stream, headers=headers
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise QueueError(f"cannot queue {item.key}: {exc}") from exc
        return not ack.duplicate

    async def consumer(self, stage: str, *, max_ack_pending: int) -> WorkConsumer:
        """The durable pull consumer of ``stage`` (created when missing)."""
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
            description=f"kvstate demo: the {stage} service",
        )
        try:
            sub = await self._js.pull_subscribe(
                self.subject(stage), durable=f"demo-{stage}", stream=self.stream, config=config
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise QueueError(f"cannot open the {stage} consumer: {exc}") from exc
        return WorkConsumer(sub, stage)

    async def pending(self) -> int:
        """Messages waiting in the stream (work not yet done)."""
        try:
            info = await self._js.stream_info(self.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise QueueError(f"cannot read the work stream: {exc}") from exc
        return int(info.state.messages)


def now() -> float:
    """Epoch seconds (``WorkItem.not_before`` is compared across processes)."""
    return time.time()


async def connect(settings: Settings, name: str) -> NATS:
    """The demo's own NATS connection (its work queue shares it with the kvstate client), opened
    by ``kvstate.connect``: the same credentials and TLS as every kvstate process, reconnecting
    forever once up. QueueError when the first connect fails."""

    async def on_error(exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    try:
        return await kvstate.connect(settings, name=name, error_cb=on_error)
    except KvstateError as exc:
        raise QueueError(str(exc)) from exc


async def close(nc: NATS) -> None:
    """Drain the connection (flush pending publishes and acks), or close it if draining fails."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except (nats.errors.Error, TimeoutError):
        await nc.close()
