"""A change feed: a durable, shared pull consumer of the operation keys, with explicit acks.

    async with client.feed("archiver", ack_wait=30.0, max_ack_pending=2000) as feed:
        for message in await feed.fetch(1000, timeout=1.0):
            ...                      # write it somewhere durable first
            await message.ack()      # then acknowledge: unacknowledged messages come back

Unlike ``client.watch()`` (an ordered push consumer that forgets its place), a feed is
a durable JetStream consumer on ``$KV.<bucket>.op.>``: deliver all, explicit acks,
unlimited redeliveries after ``ack_wait``. Every process that opens a feed of the same
name shares its work, and one that restarts resumes where the group stopped.
Acknowledging only after the work is durable is the caller's job; that is what makes
the feed at-least-once.

Deliveries are buffered from one subscription callback, with one pull request
outstanding (``PullBuffer``): a fraction of the client CPU of nats-py's ``fetch``.
The revision and the pending count of a message are read from its ack subject.

A stall guard: nats-server 2.15.1 can leave a consumer with messages pending that it
never delivers. When fetches delivered nothing for ``stall_after`` seconds while the
consumer reports messages pending (and fewer awaiting acknowledgement than it may hand
out), the pull is restarted (a new inbox and request); if the next check finds it
stalled still, the durable consumer is deleted and created again (it then delivers the
stream from the start: the caller must absorb the replay as duplicates).

End of replay: ``replayed`` is set once every message that was in the stream when the
feed first opened has been acknowledged (or terminated), by this process or another one
sharing the feed: what was pending then is applied, not merely delivered.

NATS errors are translated by ``kvstate._kv.nats_errors`` (ConnectionLostError and the
rest of kvstate's tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from nats.aio.msg import Msg
from nats.js import api

from kvstate._kv import KvStore, is_removal_marker, nats_errors
from kvstate._pull import PULL_GRACE, PullBuffer, ack_tokens
from kvstate.errors import ClientClosedError, KvstateError
from kvstate.keys import OPERATION_PREFIX

__all__ = ["ChangeFeed", "FeedMessage", "FeedState"]

log = logging.getLogger("kvstate.feed")

_LISTING_FETCH = 1000
_VERIFY_INTERVAL = 30.0
"""seconds between two checks that the durable consumer still has the feed's settings"""
_REPLAY_CHECK = 0.25
"""seconds between two reads of the consumer's ack floor while the replay is not applied yet"""


@dataclass(frozen=True, slots=True)
class FeedState:
    """How far behind a feed is: messages not delivered yet, and delivered but not acknowledged."""

    pending: int
    ack_pending: int


class FeedMessage:
    """One delivered change of an operation key: acknowledge it once it is applied."""

    __slots__ = ("_id_start", "_msg")

    def __init__(self, msg: Msg, id_start: int) -> None:
        self._msg = msg
        self._id_start = id_start

    @property
    def key(self) -> str:
        """The key, ``op.<id>``."""
        return self._msg.subject[self._id_start - len(OPERATION_PREFIX) :]

    @property
    def op_id(self) -> str:
        """The operation id."""
        return self._msg.subject[self._id_start :]

    @property
    def value(self) -> bytes | None:
        """The stored bytes; None for a removal (delete or purge marker)."""
        msg = self._msg
        data = msg.data
        if not data and is_removal_marker(msg.headers):
            return None
        return data

    @property
    def removed(self) -> bool:
        """True for a removal marker."""
        return self.value is None

    @property
    def revision(self) -> int:
        """The stream sequence of this change: the key's revision."""
        tokens, base = ack_tokens(self._msg.reply)
        return int(tokens[base + 3])

    @property
    def pending(self) -> int:
        """Messages still pending for the feed when this one was delivered."""
        tokens, base = ack_tokens(self._msg.reply)
        return int(tokens[base + 6])

    @property
    def deliveries(self) -> int:
        """How many times this message was delivered (1 the first time)."""
        tokens, base = ack_tokens(self._msg.reply)
        return int(tokens[base + 2])

    async def ack(self) -> None:
        """Acknowledge: the change is applied and is not delivered again."""
        try:
            await self._msg.ack()
        except Exception:
            with nats_errors(self.key, bucket_known=True):  # a try block costs nothing until something is raised
                raise

    async def nak(self, delay: float | None = None) -> None:
        """Ask for a redelivery, after ``delay`` seconds when given."""
        try:
            await self._msg.nak(delay=delay)
        except Exception:
            with nats_errors(self.key, bucket_known=True):
                raise

    async def term(self) -> None:
        """Never deliver this message again (it counts as handled)."""
        try:
            await self._msg.term()
        except Exception:
            with nats_errors(self.key, bucket_known=True):
                raise

    def __repr__(self) -> str:
        return f"FeedMessage(key={self.key!r}, revision={self.revision})"


class ChangeFeed:
    """The changes of every operation key, from the durable consumer ``name`` (``client.feed(name)``).

    Open it with ``async with`` (or ``open()`` / ``close()``). ``on_stall(action)`` is
    called with "restart_pull" or "recreate_consumer" each time the stall guard acts
    (``pull_restarts`` and ``recreations`` count them); ``generation`` counts the times
    the consumer was created, or created again after it was deleted or stalled (the
    stream may be a new one then: the bucket was deleted and created again). Closing stops pulling; the durable consumer
    stays on the server, and what was delivered and not acknowledged comes back.

    Every ``_VERIFY_INTERVAL`` seconds a fetch checks that the consumer still has the feed's
    settings and puts them back if someone else changed them (``restorations`` counts it);
    processes sharing a feed must therefore open it with the same settings.
    """

    def __init__(
        self,
        store: KvStore,
        name: str,
        *,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        stall_after: float = 20.0,
        on_stall: Callable[[str], None] | None = None,
        description: str = "kvstate change feed",
    ) -> None:
        self._store = store
        self.name = name
        self._id_start = len(store.subject(OPERATION_PREFIX))
        self._config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            filter_subject=store.subject(OPERATION_PREFIX + ">"),
            max_ack_pending=max_ack_pending,
            replay_policy=api.ReplayPolicy.INSTANT,
        )
        self._max_ack_pending = max_ack_pending
        self._stall_after = stall_after
        self._on_stall = on_stall
        self._buffer: PullBuffer | None = None
        self._quiet_since = 0.0
        """loop time since which fetches delivered nothing (while they were being called)"""
        self._last_call = 0.0
        self._stalled_checks = 0
        """consecutive stall checks that found the consumer stalled"""
        self._replayed = asyncio.Event()
        self._replay_through: int | None = None
        """the last stream sequence of an operation key when the feed first opened"""
        self._replay_watch: asyncio.Task[None] | None = None
        self._verified_at = 0.0
        """loop time of the last check of the consumer's settings"""
        self.generation = 0
        self.pull_restarts = 0
        self.recreations = 0
        self.restorations = 0
        """times the consumer's settings were found changed by someone else and put back"""

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the consumer (or update its editable settings, such as ack wait) and start pulling."""
        if self._replay_through is None:
            self._replay_through = await self._store.last_revision(OPERATION_PREFIX + ">")
        with nats_errors(self.name, bucket_known=True):
            await self._store.js.add_consumer(self._store.config.stream, config=self._config)
        self._verified_at = asyncio.get_running_loop().time()
        self.generation += 1
        await self._start_pulling()
        if not self._replayed.is_set() and self._replay_watch is None:
            self._replay_watch = asyncio.create_task(self._watch_replay(), name=f"feed-{self.name}-replay")

    async def _start_pulling(self) -> None:
        if self._buffer is None:
            self._buffer = PullBuffer(self._store, self.name)
        await self._buffer.start()
        self._quiet_since = self._last_call = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Stop pulling (the durable consumer stays; buffered messages are delivered again)."""
        watch, self._replay_watch = self._replay_watch, None
        if watch is not None:
            watch.cancel()  # nats-py's requests use wait_for, which can swallow a cancel: the loop checks too
            await asyncio.wait((watch,), timeout=_REPLAY_CHECK + 1.0)
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            await buffer.stop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ reading

    async def fetch(self, batch: int, timeout: float) -> list[FeedMessage]:
        """Up to ``batch`` messages: those buffered now, else the first to arrive within ``timeout`` (else none).

        ConnectionLostError / KvstateError when NATS fails in a way waiting cannot fix
        (after the consumer was deleted, this call creates it again and raises).
        """
        if not self.generation:
            raise ClientClosedError(f"feed {self.name!r} delivers inside `async with client.feed(...)`")
        if self._buffer is None:  # a stall guard's restart failed half-way
            await self.open()
        assert self._buffer is not None
        denied, self._buffer.denied = self._buffer.denied, None
        if denied is not None:  # raised once per refusal: the next fetch asks again
            with nats_errors(self.name, bucket_known=True):
                raise denied
        problem = self._buffer.problem
        if problem is not None:
            await self.open()
            raise KvstateError(f"consumer {self.name!r}: {problem}; it was created again")
        loop = asyncio.get_running_loop()
        if loop.time() - self._verified_at >= _VERIFY_INTERVAL:
            await self._verify()
        if loop.time() - self._last_call > timeout + PULL_GRACE:
            self._quiet_since = loop.time()  # nobody asked in between: that was no stall
        taken = await self._buffer.take(batch, timeout)
        now = self._last_call = loop.time()
        if taken:
            self._quiet_since = now
            self._stalled_checks = 0
            id_start = self._id_start
            return [FeedMessage(msg, id_start) for msg in taken]
        if now - self._quiet_since >= self._stall_after:
            self._quiet_since = now  # the next check comes one more period later
            await self._guard()
        return []

    async def state(self) -> FeedState:
        """Messages pending for the feed and messages awaiting acknowledgement (open or not)."""
        info = await self._info()
        return FeedState(int(info.num_pending or 0), int(info.num_ack_pending or 0))

    @property
    def replayed(self) -> asyncio.Event:
        """Set once everything in the stream when the feed first opened has been acknowledged (or terminated)."""
        return self._replayed

    async def stream_created(self) -> datetime | None:
        """When the bucket's stream was created: unchanged by server restarts, new when the bucket is created again."""
        return (await self._store.info()).created

    async def live_revisions(self) -> dict[str, int]:
        """The current revision of every operation in the bucket (removed ones left out), without reading values.

        Works whether the feed is open or not. A short-lived pull consumer (deliver last
        per subject, headers only, no acks) that is deleted as soon as the listing is done.
        Not ``client.scan()``: its ordered consumer stays on the server until its
        inactivity threshold, and while a last-per-subject consumer exists nats-server
        recounts its pending messages over every key on each purge.
        """
        store = self._store
        stream = store.config.stream
        name = f"{self.name}-sweep-{secrets.token_hex(4)}"
        config = api.ConsumerConfig(
            name=name,
            description="kvstate feed listing: current revisions of the operation keys",
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=store.subject(OPERATION_PREFIX + ">"),
            headers_only=True,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        revisions: dict[str, int] = {}
        id_start = self._id_start
        with nats_errors(name, bucket_known=True):
            info = await store.js.add_consumer(stream, config=config)
        try:
            remaining = int(info.num_pending or 0)
            buffer = PullBuffer(store, name)
            await buffer.start()
            try:
                while remaining > 0:
                    messages = await buffer.take(min(remaining, _LISTING_FETCH), timeout=2.0)
                    if not messages:
                        break  # nothing more delivered: the keys seen so far are the listing
                    for msg in messages:
                        tokens, base = ack_tokens(msg.reply)
                        remaining = int(tokens[base + 6])
                        if not is_removal_marker(msg.headers):
                            revisions[msg.subject[id_start:]] = int(tokens[base + 3])
            finally:
                await buffer.stop()
        finally:
            with nats_errors(name, bucket_known=True):
                await store.js.delete_consumer(stream, name)
        return revisions

    # ------------------------------------------------------------------ internals

    async def _info(self) -> api.ConsumerInfo:
        with nats_errors(self.name, bucket_known=True):
            info: api.ConsumerInfo = await self._store.js.consumer_info(self._store.config.stream, self.name)
        return info

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
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            await buffer.stop()
        if action == "restart_pull":
            self.pull_restarts += 1
            await self._start_pulling()  # the same consumer: a new inbox and pull request
            return
        self._stalled_checks = 0
        self.recreations += 1
        with contextlib.suppress(KvstateError), nats_errors(self.name):  # gone already: open() creates it
            await self._store.js.delete_consumer(self._store.config.stream, self.name)
        await self.open()

    async def _verify(self) -> None:
        """Put the consumer's settings back if someone else changed them; create it again if that is not enough.

        A user allowed to create ephemeral consumers on the stream (any role that watches)
        can update any consumer by naming it in the body of the legacy create request,
        which its subject cannot show: measured on nats-server 2.15.1, such a request
        changed this feed's filter, ack wait and inactivity threshold and made it
        ephemeral (docs/security.md#nats-threat-model). An update restores most; what it
        cannot (an inactivity threshold, which would delete the consumer while its
        archivers are down) takes a new consumer, whose replay the caller absorbs.
        """
        self._verified_at = asyncio.get_running_loop().time()
        try:
            changed = _changed_settings(self._config, (await self._info()).config)
            if not changed:
                return
            log.warning("consumer %s was changed by someone else (%s); restoring it", self.name, "; ".join(changed))
            self.restorations += 1
            with nats_errors(self.name, bucket_known=True):
                await self._store.js.add_consumer(self._store.config.stream, config=self._config)
            still = _changed_settings(self._config, (await self._info()).config)
            if still:
                log.warning("consumer %s: %s after the update; creating it again", self.name, "; ".join(still))
                with contextlib.suppress(KvstateError), nats_errors(self.name):
                    await self._store.js.delete_consumer(self._store.config.stream, self.name)
                self.recreations += 1
                buffer, self._buffer = self._buffer, None
                if buffer is not None:
                    await buffer.stop()
                await self.open()
        except KvstateError as exc:  # NATS away for now: the next fetch asks again
            log.debug("feed %s: cannot check the consumer's settings yet: %s", self.name, exc)

    async def _check_replayed(self) -> None:
        """Set ``replayed`` when the consumer's ack floor passed what the stream held at the first open."""
        through = self._replay_through or 0
        info = await self._info()
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        if floor >= through or (not info.num_pending and not info.num_ack_pending):
            self._replayed.set()

    async def _watch_replay(self) -> None:
        """Read the ack floor now and every ``_REPLAY_CHECK`` seconds until the replay is applied or the feed closes."""
        while self._replay_watch is asyncio.current_task():
            try:
                await self._check_replayed()
            except KvstateError as exc:  # NATS away for now: the next check asks again
                log.debug("feed %s: cannot read the ack floor yet: %s", self.name, exc)
            if self._replayed.is_set():
                return
            await asyncio.sleep(_REPLAY_CHECK)


def _changed_settings(wanted: api.ConsumerConfig, actual: api.ConsumerConfig) -> list[str]:
    """What differs in ``actual`` from the settings the feed created its consumer with."""
    pairs = {
        "durable_name": (wanted.durable_name, actual.durable_name),
        "filter_subject": (wanted.filter_subject, actual.filter_subject),
        "filter_subjects": (wanted.filter_subjects or None, actual.filter_subjects or None),
        "ack_wait": (wanted.ack_wait, actual.ack_wait),
        "max_deliver": (wanted.max_deliver, actual.max_deliver),
        "max_ack_pending": (wanted.max_ack_pending, actual.max_ack_pending),
        "headers_only": (bool(wanted.headers_only), bool(actual.headers_only)),
        "inactive_threshold": (wanted.inactive_threshold or None, actual.inactive_threshold or None),
        "pause_until": (None, actual.pause_until),
    }
    return [f"{name} {got!r}, not {want!r}" for name, (want, got) in pairs.items() if want != got]
