"""The durable JetStream consumer the archiver pulls from: the one place it touches nats errors.

A durable pull consumer on the bucket's stream, filtered to ``$KV.<bucket>.op.>``,
explicit acks, unlimited redeliveries. Every archiver instance binds to the same
durable name, so they share the work and a restarted one resumes where it stopped.
Errors are translated by ``kvstate._kv.nats_errors`` into kvstate's tree.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kvstate._kv import KvStore, nats_errors
from kvstate.keys import OPERATION_PREFIX, operation_id_from_key

_SWEEP_FETCH = 1000

__all__ = ["ArchiveConsumer", "ConsumerState", "live_revisions"]


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """How far behind the consumer is: messages not yet delivered, and delivered but not acknowledged."""

    pending: int
    ack_pending: int


class ArchiveConsumer:
    """Pull batches of operation-key messages from the durable consumer ``name``."""

    def __init__(self, store: KvStore, name: str, *, ack_wait: float, max_ack_pending: int) -> None:
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
        self._sub: JetStreamContext.PullSubscription | None = None

    async def open(self) -> None:
        """Create the consumer, or update its editable settings (ack wait), and bind to it."""
        stream = self._store.config.stream
        with nats_errors(self.name):
            await self._store.js.add_consumer(stream, config=self._config)
            self._sub = await self._store.js.pull_subscribe_bind(durable=self.name, stream=stream)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages: those ready now, else the first to arrive within ``timeout`` (else none).

        ConnectionLostError / KvstateError when NATS fails in a way waiting cannot fix.
        """
        sub = self._subscription()
        try:
            return await sub.fetch(batch, timeout=timeout)
        except TimeoutError:  # nats.errors.TimeoutError included: nothing arrived in time
            return []
        except Exception:
            with nats_errors(self.name):
                raise

    async def state(self) -> ConsumerState:
        """Messages pending for the consumer and messages awaiting acknowledgement."""
        with nats_errors(self.name):
            info = await self._store.js.consumer_info(self._store.config.stream, self.name)
        return ConsumerState(int(info.num_pending or 0), int(info.num_ack_pending or 0))

    async def close(self) -> None:
        """Stop pulling (the durable consumer stays on the server)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                with nats_errors(self.name):
                    await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be gone; nothing to release then
                return

    def _subscription(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            raise RuntimeError("ArchiveConsumer.open() was not called")
        return self._sub


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
    with nats_errors(name):
        info = await store.js.add_consumer(stream, config=config)
        try:
            remaining = int(info.num_pending or 0)
            sub = await store.js.pull_subscribe_bind(durable=name, stream=stream)
            try:
                while remaining > 0:
                    try:
                        messages = await sub.fetch(min(remaining, _SWEEP_FETCH), timeout=2.0)
                    except TimeoutError:
                        break  # nothing more delivered: the keys seen so far are the listing
                    for msg in messages:
                        entry = store.decode_message(msg)
                        op_id = operation_id_from_key(entry.key)
                        if op_id is not None and entry.value is not None:
                            revisions[op_id] = entry.revision
                    remaining = int(messages[-1].metadata.num_pending)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:
            await store.js.delete_consumer(stream, name)
    return revisions
