"""The durable JetStream consumer the archiver pulls from: the one place it touches nats errors.

A durable pull consumer on the bucket's stream, filtered to ``$KV.<bucket>.op.>``,
explicit acks, unlimited redeliveries. Every archiver instance binds to the same
durable name, so they share the work and a restarted one resumes where it stopped.
Errors are translated by ``kvstate._kv.nats_errors`` into kvstate's tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kvstate._kv import KvStore, nats_errors
from kvstate.keys import OPERATION_PREFIX

__all__ = ["ArchiveConsumer", "ConsumerState"]


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
