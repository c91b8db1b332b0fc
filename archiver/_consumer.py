"""The durable JetStream consumer the archiver pulls from: the one place it touches nats errors.

A durable pull consumer on the bucket's stream, filtered to ``$KV.<bucket>.op.>``,
explicit acks, unlimited redeliveries. Every archiver instance binds to the same
durable name, so they share the work and a restarted one resumes where it stopped.
Errors are translated by ``kvstate._kv.nats_errors`` into kvstate's tree.

A stall guard: nats-server 2.15.1 can leave a consumer with messages pending that it
never delivers (docs/archive.md, "Stalls"). When fetches delivered nothing for
``stall_after`` seconds while the consumer reports messages pending (and fewer
awaiting acknowledgement than it may hand out), the pull is restarted (a new inbox and
request); if the next check finds it stalled still, the durable consumer is deleted and
created again (it then delivers the stream from the start: the archive absorbs the
replay as duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from kvstate._kv import KvStore, is_removal_marker, nats_errors
from kvstate.errors import KvstateError
from kvstate.keys import OPERATION_PREFIX

_SWEEP_FETCH = 1000
_ACK_PREFIX = "$JS.ACK."
_PULL_EXPIRES = 2.0
"""seconds a pull request waits on the server for messages before it expires (a 408 ends it)"""
_PULL_GRACE = 1.0
"""seconds past its expiry after which a request with no answer counts as lost (server restart)"""
_PENDING_LIMIT = 1_000_000
_PENDING_BYTES_LIMIT = 1 << 30
"""deliveries are bounded by max_ack_pending; these only keep nats-py from dropping any"""

__all__ = ["ArchiveConsumer", "ConsumerState", "delivery_sequence", "live_revisions"]

log = logging.getLogger("archiver")


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """How far behind the consumer is: messages not yet delivered, and delivered but not acknowledged."""

    pending: int
    ack_pending: int


class _PullBuffer:
    """Deliveries of one pull consumer, buffered as they arrive.

    One pull request is outstanding at a time, for the batch size ``take`` asks for; it
    is sent when the buffer holds less than that, so at most about two batches are
    delivered ahead of what was taken. Deliveries land in the buffer from a subscription
    callback and ``take`` hands out what is buffered: a fraction of the client CPU of
    nats-py's ``fetch``, which awaits every message separately. A request that ends
    (expired, interrupted by a leader change, refused) is replaced by the next ``take``;
    one that got lost with a server restart is replaced once it is overdue.
    """

    def __init__(self, store: KvStore, consumer: str) -> None:
        self._store = store
        self._consumer = consumer
        self._next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{store.config.stream}.{consumer}"
        self._sub: Subscription | None = None
        self._inbox = ""
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._request = 0
        """number of the outstanding pull request (0: none)"""
        self._owed = 0
        """messages the outstanding request may still deliver"""
        self._overdue = 0.0
        """loop time after which the outstanding request counts as lost"""
        self.problem: str | None = None
        """why the consumer cannot deliver (deleted, missing), when the server said so"""

    async def start(self) -> None:
        """Subscribe for deliveries (once) and forget any request in flight."""
        if self._sub is None:
            nc = self._store.nc
            self._inbox = nc.new_inbox()
            with nats_errors(self._consumer):
                self._sub = await nc.subscribe(
                    self._inbox + ".*",
                    cb=self._deliver,
                    pending_msgs_limit=_PENDING_LIMIT,
                    pending_bytes_limit=_PENDING_BYTES_LIMIT,
                )
        self._request, self._owed, self.problem = 0, 0, None

    async def take(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages: those buffered now, else the first to arrive within ``timeout`` (else none)."""
        await self._pull(batch)
        if not self._buffer:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            if not self._buffer:
                return []
        buffer = self._buffer
        taken = [buffer.popleft() for _ in range(min(batch, len(buffer)))]
        await self._pull(batch)
        return taken

    async def stop(self) -> None:
        """Unsubscribe; what is still buffered is dropped (JetStream delivers unacknowledged messages again)."""
        sub, self._sub = self._sub, None
        self._buffer.clear()
        if sub is not None:
            try:
                with nats_errors(self._consumer):
                    await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be gone; nothing to release then
                return

    async def _pull(self, batch: int) -> None:
        """Send a pull request for ``batch`` messages unless one is outstanding or enough are buffered."""
        now = asyncio.get_running_loop().time()
        if self._request and now < self._overdue:
            return
        if len(self._buffer) >= batch:
            return
        self._request += 1
        self._owed = batch
        self._overdue = now + _PULL_EXPIRES + _PULL_GRACE
        request = msgspec.json.encode({"batch": batch, "expires": int(_PULL_EXPIRES * 1e9)})
        with nats_errors(self._consumer):
            await self._store.nc.publish(self._next_subject, request, reply=f"{self._inbox}.{self._request}")

    async def _deliver(self, msg: Msg) -> None:
        if msg.reply.startswith(_ACK_PREFIX):
            self._buffer.append(msg)
            self._arrived.set()
            if self._owed > 0:
                self._owed -= 1
                if not self._owed:
                    self._request = 0  # fully delivered: the next take asks again
            return
        # A status message ending a pull request: 408 expired, 409 leader change, max
        # waiting and the like (the next take sends another request), or a consumer
        # that is gone.
        if msg.subject != f"{self._inbox}.{self._request}":
            return  # about a request already replaced
        self._request = 0
        headers = msg.headers or {}
        status, description = headers.get("Status", ""), headers.get("Description", "")
        if status == "503" or (status == "409" and "Consumer Deleted" in description):
            self.problem = f"the server answered {status} {description or 'no responders'}".strip()
        self._arrived.set()


class ArchiveConsumer:
    """Pull messages from the durable consumer ``name`` (through a ``_PullBuffer``), with a stall guard.

    ``on_stall(action)`` is called with "restart_pull" or "recreate_consumer" each time the
    guard acts; ``generation`` counts the times the consumer was created or re-created
    (the stream may be a new one then: the bucket was deleted and created again).
    """

    def __init__(
        self,
        store: KvStore,
        name: str,
        *,
        ack_wait: float,
        max_ack_pending: int,
        stall_after: float = 20.0,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self.name = name
        self.subject = store.subject(OPERATION_PREFIX + ">")
        self._config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description="kvstate archiver: snapshots finished operations into PostgreSQL",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            filter_subject=self.subject,
            max_ack_pending=max_ack_pending,
            replay_policy=api.ReplayPolicy.INSTANT,
        )
        self._max_ack_pending = max_ack_pending
        self._stall_after = stall_after
        self._on_stall = on_stall
        self._buffer: _PullBuffer | None = None
        self._quiet_since = 0.0
        """loop time since which fetches delivered nothing (while they were being called)"""
        self._last_call = 0.0
        self._stalled_checks = 0
        """consecutive stall checks that found the consumer stalled"""
        self.generation = 0

    async def open(self) -> None:
        """Create the consumer, or update its editable settings (ack wait), and subscribe for deliveries."""
        with nats_errors(self.name):
            await self._store.js.add_consumer(self._store.config.stream, config=self._config)
        self.generation += 1
        if self._buffer is None:
            self._buffer = _PullBuffer(self._store, self.name)
        await self._buffer.start()
        self._quiet_since = self._last_call = asyncio.get_running_loop().time()

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages: those buffered now, else the first to arrive within ``timeout`` (else none).

        ConnectionLostError / KvstateError when NATS fails in a way waiting cannot fix
        (after the consumer was deleted, this call re-creates it and raises).
        """
        if not self.generation:
            raise RuntimeError("ArchiveConsumer.open() was not called")
        if self._buffer is None:  # a stall guard's restart failed half-way
            await self.open()
        assert self._buffer is not None
        problem = self._buffer.problem
        if problem is not None:
            await self.open()
            raise KvstateError(f"consumer {self.name!r}: {problem}; it was created again")
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_call > timeout + _PULL_GRACE:
            self._quiet_since = loop.time()  # nobody asked in between: that was no stall
        messages = await self._buffer.take(batch, timeout)
        now = self._last_call = loop.time()
        if messages:
            self._quiet_since = now
            self._stalled_checks = 0
        elif now - self._quiet_since >= self._stall_after:
            self._quiet_since = now  # the next check comes one more period later
            await self._guard()
        return messages

    async def _guard(self) -> None:
        """Nothing delivered for ``stall_after``: restart the pull, then the consumer, while messages stay pending."""
        state = await self.state()
        if state.pending == 0 or state.ack_pending >= self._max_ack_pending:
            self._stalled_checks = 0  # nothing to deliver, or the server may not hand out more
            return
        self._stalled_checks += 1
        action = "restart_pull" if self._stalled_checks == 1 else "recreate_consumer"
        log.warning(
            "consumer %s stalled: %d messages pending, none delivered for %.1fs; %s",
            self.name,
            state.pending,
            self._stall_after,
            action.replace("_", " "),
        )
        if self._on_stall is not None:
            self._on_stall(action)
        await self.close()
        if action == "recreate_consumer":
            self._stalled_checks = 0
            with contextlib.suppress(KvstateError), nats_errors(self.name):  # gone already: open() creates it
                await self._store.js.delete_consumer(self._store.config.stream, self.name)
        await self.open()

    async def state(self) -> ConsumerState:
        """Messages pending for the consumer and messages awaiting acknowledgement."""
        with nats_errors(self.name):
            info = await self._store.js.consumer_info(self._store.config.stream, self.name)
        return ConsumerState(int(info.num_pending or 0), int(info.num_ack_pending or 0))

    async def close(self) -> None:
        """Stop pulling (the durable consumer stays on the server; buffered messages are delivered again)."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            await buffer.stop()


def delivery_sequence(msg: Msg) -> tuple[int, int]:
    """(stream sequence, messages still pending for the consumer) of a delivered message.

    Read from the ack subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
    seq>.<time>.<pending>``, or its newer form with a domain and an account hash after
    ``ACK`` (and a random token at the end): the same fields ``msg.metadata`` parses,
    without building its objects.
    """
    tokens = msg.reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 3]), int(tokens[base + 6])


async def live_revisions(store: KvStore, owner: str) -> dict[str, int]:
    """The current revision of every operation in the bucket (removed ones left out), without reading values.

    A short-lived pull consumer (deliver last per subject, headers only, no acks) that
    is deleted as soon as the listing is done. Not ``KvStore.scan``: its ordered consumer
    stays on the server until its inactivity threshold, and while a last-per-subject
    consumer exists nats-server recounts its pending messages over every key on each
    purge, which made the archiver's own removals about 10x as costly for the server.
    """
    stream = store.config.stream
    name = f"{owner}-sweep-{secrets.token_hex(4)}"
    config = api.ConsumerConfig(
        name=name,
        description="kvstate archiver sweep: current revisions of the operation keys",
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=store.subject(OPERATION_PREFIX + ">"),
        headers_only=True,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    revisions: dict[str, int] = {}
    id_start = len(store.subject(OPERATION_PREFIX))
    with nats_errors(name):
        info = await store.js.add_consumer(stream, config=config)
    try:
        remaining = int(info.num_pending or 0)
        buffer = _PullBuffer(store, name)
        await buffer.start()
        try:
            while remaining > 0:
                messages = await buffer.take(min(remaining, _SWEEP_FETCH), timeout=2.0)
                if not messages:
                    break  # nothing more delivered: the keys seen so far are the listing
                for msg in messages:
                    revision, remaining = delivery_sequence(msg)
                    if not is_removal_marker(msg.headers):
                        revisions[msg.subject[id_start:]] = revision
        finally:
            await buffer.stop()
    finally:
        with nats_errors(name):
            await store.js.delete_consumer(stream, name)
    return revisions
