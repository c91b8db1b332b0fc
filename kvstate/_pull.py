"""Pulling from a JetStream consumer cheaply: deliveries buffered from one subscription callback.

What ``kvstate.feed`` builds on: ``PullBuffer`` keeps one pull request outstanding and
hands out what arrived; ``ack_tokens`` reads a delivery's fields from its ack subject.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from kvstate._connection import SubjectDenied, violations
from kvstate._kv import KvStore, nats_errors

__all__ = ["PULL_GRACE", "PullBuffer", "ack_tokens"]

_ACK_PREFIX = "$JS.ACK."
_PULL_EXPIRES = 2.0
"""seconds a pull request waits on the server for messages before it expires (a 408 ends it)"""
PULL_GRACE = 1.0
"""seconds past its expiry after which a request with no answer counts as lost (server restart)"""
_PENDING_LIMIT = 1_000_000
_PENDING_BYTES_LIMIT = 1 << 30
"""deliveries are bounded by max_ack_pending; these only keep nats-py from dropping any"""


def ack_tokens(reply: str) -> tuple[list[str], int]:
    """The tokens of an ack subject and where its fields start.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or the newer form with a domain and an account hash after ``ACK`` (and a random token at
    the end): the fields ``Msg.metadata`` parses, without building its objects.
    """
    tokens = reply.split(".")
    return tokens, 2 if len(tokens) == 9 else 4


class PullBuffer:
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
        self.denied: SubjectDenied | None = None
        """a pull request or an acknowledgement of this consumer the server's permissions refused"""
        self._unwatch: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Subscribe for deliveries (once) and forget any request in flight."""
        if self._sub is None:
            nc = self._store.nc
            self._inbox = nc.new_inbox()
            with nats_errors(self._consumer, bucket_known=True):
                self._sub = await nc.subscribe(
                    self._inbox + ".*",
                    cb=self._deliver,
                    pending_msgs_limit=_PENDING_LIMIT,
                    pending_bytes_limit=_PENDING_BYTES_LIMIT,
                )
            tracked = violations(nc)
            if tracked is not None:
                self._unwatch = [
                    tracked.watch(self._next_subject, self._refused),
                    tracked.watch_prefix(_ACK_PREFIX, self._refused_ack),
                ]
        self._request, self._owed, self.problem = 0, 0, None

    def _refused(self, denied: SubjectDenied) -> None:
        # The server dropped the pull request: nothing will be delivered for it.
        self.denied = denied
        self._request = 0
        self._arrived.set()

    def _refused_ack(self, denied: SubjectDenied) -> None:
        tokens, base = ack_tokens(denied.subject)
        stream, consumer = self._store.config.stream.lower(), self._consumer.lower()
        if len(tokens) > base + 1 and (tokens[base], tokens[base + 1]) == (stream, consumer):
            self.denied = denied  # acks dropped: every message would come back after ack_wait
            self._arrived.set()

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
        unwatch, self._unwatch = self._unwatch, []
        for stop_watching in unwatch:
            stop_watching()
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
        self._overdue = now + _PULL_EXPIRES + PULL_GRACE
        request = msgspec.json.encode({"batch": batch, "expires": int(_PULL_EXPIRES * 1e9)})
        with nats_errors(self._consumer, bucket_known=True):
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
