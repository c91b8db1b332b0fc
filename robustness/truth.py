"""What the bucket stored, read back after healing, in the shape the checker takes.

Every message of the bucket's stream, oldest first, through one ordered consumer (the
stream keeps up to 64 revisions per key during the suite, so each key's chain is whole):
``hot.*`` values become compare-and-set links, ``op.*`` values the event ids the
operation holds. ``persist_problems`` is the suite's own guard that no bucket it creates
runs with ``persist_mode: async``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import msgspec
from nats.js import api

from kvstate import Client, CorruptValue, Operation
from kvstate.codec import decode_operation
from kvstate.keys import OPERATION_PREFIX
from robustness.checker import Stored
from robustness.workload import HOT_PREFIX, HotValue

__all__ = ["StoredState", "persist_problems", "read_stored", "repeated_transitions"]

_hot_decoder = msgspec.json.Decoder(HotValue)


@dataclass
class StoredState:
    """The stored chains, key by key, and the last state of every operation."""

    chains: dict[str, list[Stored]] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    unreadable: int = 0
    last_seq: int = 0

    def revisions(self, prefix: str) -> list[tuple[str, int]]:
        """Every stored (key, revision) of keys starting with ``prefix``, in stream order."""
        found = [(key, s.revision) for key, chain in self.chains.items() if key.startswith(prefix) for s in chain]
        return sorted(found, key=lambda pair: pair[1])


def repeated_transitions(op: Operation) -> int:
    """Transitions recorded more than once for one event (same event id, stage and target status)."""
    counts = Counter((t.event, t.stage, t.to, t.attempt) for t in op.history if t.event is not None)
    return sum(n - 1 for n in counts.values() if n > 1)


async def read_stored(client: Client) -> StoredState:
    """Read every message of the client's bucket into StoredState."""
    state = StoredState()
    chains: dict[str, list[Stored]] = defaultdict(list)
    async for entry in client._open_store().scan(">", history=True):
        state.last_seq = max(state.last_seq, entry.revision)
        if entry.value is None:
            continue
        if entry.key.startswith(HOT_PREFIX):
            try:
                value = _hot_decoder.decode(entry.value)
            except msgspec.DecodeError:
                state.unreadable += 1
                continue
            chains[entry.key].append(Stored(entry.revision, (value.t,), prev=value.p))
        elif entry.key.startswith(OPERATION_PREFIX):
            try:
                op = decode_operation(entry.key, entry.revision, entry.value)
            except CorruptValue:
                state.unreadable += 1
                continue
            chains[entry.key].append(Stored(entry.revision, tuple(op.events)))
            state.operations[entry.key] = op
    state.chains = dict(chains)
    return state


def persist_problems(config: api.StreamConfig) -> list[str]:
    """Why a stream's configuration breaks the suite's durability rule (empty when it does not)."""
    mode = config.persist_mode
    value = getattr(mode, "value", mode)
    if value is not None and str(value).lower() == "async":
        return [f"stream {config.name} uses persist_mode: async (acknowledged before it is written)"]
    return []
