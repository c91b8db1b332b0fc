"""Group commit: concurrent mutations of one operation share one read-modify-write.

Within a process, the first caller to touch a key leads: it reads the state (from the
revision cache when it can), applies every mutation queued for that key so far, in
arrival order, and writes the result with one compare-and-set. Callers that arrive while
a write is in flight queue up and go out together in the next write. So 32 tasks
updating one operation cost a handful of writes instead of 32 fighting each other.

On a conflict the batch is re-read and re-applied (the mutations are pure), with
jittered exponential backoff, up to ``max_attempts`` times. A transient failure (NATS
unreachable, a timeout whose write may or may not have landed, a stream electing its
leader) is retried the same way, re-read first, until ``deadline`` seconds after the batch
began; only then does its callers get the ConnectionLostError. A batch that writes nothing
because an event came out stale or was refused (InvalidTransition) is checked once more
against a fresh read from the stream leader when its state came from the cache or from a
direct get (which any replica may answer): another process may have moved the operation
on (finished a dependency, reopened a stage), and a stale read must cost a retry, never a
wrong answer. Likewise an event naming a stage the cached pipeline lacks is tried once
more with the pipeline read again from the bucket (``kvstate pipeline set`` may have added
it since).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from kvstate._kv import KvStore
from kvstate.backoff import Backoff
from kvstate.codec import decode_operation, encode_operation
from kvstate.errors import (
    ClientClosedError,
    ConflictError,
    ConnectionLostError,
    InvalidTransition,
    KvstateError,
    OperationNotFound,
    RevisionMismatch,
    UnknownStage,
)
from kvstate.keys import operation_id_from_key
from kvstate.machine import Decision
from kvstate.model import Operation, Outcome, UpdateResult
from kvstate.pipeline import Pipeline

__all__ = ["GroupCommitter", "Mutation", "RevisionCache"]

Mutation = Callable[[Operation, Pipeline], Decision]
"""A pure function from the current state to a decision; it may run more than once."""

PipelineResolver = Callable[[str], Awaitable[Pipeline]]
PipelineCache = dict[str, Pipeline]

_CONFLICT_BACKOFF = Backoff(first=0.002, cap=0.1, jitter=1.0)
"""after a conflict: the other writer is done in a millisecond or two"""
_TRANSIENT_BACKOFF = Backoff(first=0.04, cap=1.0)
"""after a timeout, a lost connection or a stream without a leader (elections take seconds)"""
_LANDED = "applied by this call's earlier write, whose acknowledgement was lost"


class RevisionCache:
    """The last operation (with its revision) this process saw per key, bounded, oldest evicted first.

    Only operations still in flight are kept: a finished one is dropped as soon as it is seen.

    Updates start from the cached state instead of reading first; a stale entry costs one
    conflict and a re-read, never a lost update. Operations are immutable values (frozen
    Structs whose dicts are never mutated in place), so caching the decoded value is safe.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, Operation] = {}

    def get(self, key: str) -> Operation | None:
        return self._entries.get(key)

    def remember(self, key: str, op: Operation) -> None:
        entries = self._entries
        entries.pop(key, None)
        if op.done:
            # A finished operation takes no more stage events (a late one is stale, and a
            # stale answer from the cache is checked with the leader anyway): keeping it
            # would only hold memory, about 3.5 KB per operation, until it is evicted.
            return
        entries[key] = op
        if len(entries) > self.max_entries:
            del entries[next(iter(entries))]

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class _Item:
    mutation: Mutation
    future: asyncio.Future[UpdateResult] | None = None
    alone: bool = False
    """a conditional mutation: it must see the stored revision, so no earlier change may share its write"""
    deferred: bool = False
    maybe_landed: bool = False
    """applied in a write whose acknowledgement never came: a duplicate on the re-read is this call's own write"""
    result: UpdateResult | None = None
    error: BaseException | None = None
    decision: Decision | Exception | None = field(default=None)

    def resolve(self, result: UpdateResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        if self.future is not None and not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]


class GroupCommitter:
    """Runs mutations against the bucket, batching those that target the same key."""

    def __init__(
        self,
        store: KvStore,
        cache: RevisionCache,
        resolve_pipeline: PipelineResolver,
        pipelines: PipelineCache,
        *,
        max_attempts: int,
        max_value_size: int,
        deadline: float = 30.0,
    ) -> None:
        self._store = store
        self._deadline = deadline
        self._cache = cache
        self._resolve_pipeline = resolve_pipeline
        self._pipelines = pipelines
        self._max_attempts = max_attempts
        self._max_value_size = max_value_size
        self._queues: dict[str, list[_Item]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = 0
        self.conflicts = 0
        self.transient_retries = 0

    async def submit(self, key: str, mutation: Mutation, *, alone: bool = False) -> UpdateResult:
        """Apply ``mutation`` to ``key`` with compare-and-set; batched with concurrent callers.

        ``alone``: the mutation checks the stored revision (a conditional write), so it goes
        first in its write and never after another change of the same batch.
        """
        pending = self._queues.get(key)
        if pending is not None:
            future: asyncio.Future[UpdateResult] = asyncio.get_running_loop().create_future()
            pending.append(_Item(mutation, future, alone=alone))
            return await future
        self._queues[key] = pending = []
        me = _Item(mutation, alone=alone)
        batch = [me]
        try:
            await self._run(key, batch, pending)
        finally:
            # Whatever is still queued (or was in flight when we were cancelled) goes on
            # in a task of its own, so this caller returns as soon as its own write lands.
            leftover = [item for item in batch if item is not me and item.result is None and item.error is None]
            pending[:0] = leftover
            if pending:
                task = asyncio.get_running_loop().create_task(self._drain(key, pending))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self._queues[key]
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    async def wait_idle(self) -> None:
        """Wait until every queued mutation has been written or failed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _drain(self, key: str, pending: list[_Item]) -> None:
        try:
            while pending:
                batch = pending[:]
                pending.clear()
                try:
                    await self._run(key, batch, pending)
                    pending[:0] = [item for item in batch if item.result is None and item.error is None]
                except BaseException as exc:
                    # Nobody else would ever answer these callers: hand them the failure.
                    error = exc if isinstance(exc, Exception) else ClientClosedError(f"the update of {key!r} stopped")
                    for item in batch:
                        if item.result is None and item.error is None:
                            item.resolve(None, error)
                    raise
        finally:
            for item in pending:
                item.resolve(None, ClientClosedError(f"the update of {key!r} was not written: the client is closing"))
            del self._queues[key]

    async def _run(self, key: str, batch: list[_Item], pending: list[_Item]) -> None:
        """Read, decide and write ``batch`` (and what queues up meanwhile) until every item has its answer."""
        run = _Run(give_up=time.monotonic() + self._deadline)
        while True:
            run.attempt += 1
            batch.extend(pending)
            pending.clear()
            try:
                read = await self._read(key, run)
            except ConnectionLostError as exc:
                if not await self._pause_or_give_up(batch, exc, run):
                    return
                run.attempt -= 1  # a read nobody answered is no compare-and-set attempt
                continue
            except KvstateError as exc:  # OperationNotFound, CorruptValue, UnknownPipeline
                for item in batch:
                    item.resolve(None, exc)
                return
            current, pipeline, from_leader = read
            state = _decide(batch, current, pipeline)
            if not run.pipeline_reloaded and any(isinstance(item.decision, UnknownStage) for item in batch):
                # The pipeline may have gained the stage since this process cached it.
                run.pipeline_reloaded = True
                self._pipelines.pop(current.pipeline, None)
                continue
            if state is current:  # nothing to write
                if not from_leader and not run.checked_with_leader and _may_be_out_of_date(batch):
                    run.checked_with_leader = True
                    self._cache.discard(key)
                    continue
                self._finish(batch, current)
                return
            if await self._write(key, batch, state, current, run):
                return

    async def _read(self, key: str, run: _Run) -> tuple[Operation, Pipeline, bool]:
        """The state to decide on (the cache's on a first attempt), its pipeline, and whether the leader answered."""
        cached = self._cache.get(key) if run.attempt == 1 else None
        from_leader = False
        if cached is None:
            from_leader = run.checked_with_leader or run.attempt > 2
            entry = await self._store.get(key, leader=from_leader)
            if entry is None or entry.value is None:
                raise OperationNotFound(operation_id_from_key(key) or key)
            cached = decode_operation(key, entry.revision, entry.value)
            self._cache.remember(key, cached)
        pipeline = self._pipelines.get(cached.pipeline) or await self._resolve_pipeline(cached.pipeline)
        return cached, pipeline, from_leader

    async def _write(self, key: str, batch: list[_Item], state: Operation, current: Operation, run: _Run) -> bool:
        """Compare-and-set ``state`` over ``current``; True once every item is answered, False to go again."""
        try:
            data = encode_operation(state, self._max_value_size)
            revision = await self._store.update(key, data, current.revision)
        except ConnectionLostError as exc:
            # The write may or may not have landed. Re-reading and re-applying is safe:
            # an applied event is then recognised as a duplicate, which for these
            # callers means their own write landed.
            self._cache.discard(key)
            for item in batch:
                if isinstance(item.decision, Decision) and item.decision.outcome is Outcome.APPLIED:
                    item.maybe_landed = True
            if not await self._pause_or_give_up(batch, exc, run):
                return True
            run.attempt -= 1
            return False
        except ConflictError as exc:
            self._cache.discard(key)
            self.conflicts += 1
            if run.attempt >= self._max_attempts:
                error = ConflictError(key, current.revision, run.attempt)
                error.__cause__ = exc.__cause__
                for item in batch:
                    item.resolve(None, error)
                return True
            await asyncio.sleep(_CONFLICT_BACKOFF.delay(run.attempt))
            return False
        except KvstateError as exc:  # ValueTooLarge, InvalidMetadata: the batch as written is refused
            for item in batch:
                if item.deferred:
                    continue
                if isinstance(item.decision, Decision) and item.decision.outcome is Outcome.APPLIED:
                    item.resolve(None, exc)
                elif item.decision is None:
                    item.decision = exc
            self._finish([i for i in batch if i.error is None], current)
            return True
        self.writes += 1
        written = msgspec.structs.replace(state, revision=revision)
        self._cache.remember(key, written)
        self._finish(batch, written)
        return True

    async def _pause_or_give_up(self, batch: list[_Item], exc: ConnectionLostError, run: _Run) -> bool:
        """Past the deadline: answer the batch with ``exc`` (False). Before it: back off, then True (retry)."""
        if time.monotonic() >= run.give_up:
            for item in batch:
                item.resolve(None, exc)
            return False
        run.transient += 1
        await self._transient_pause(run.transient, run.give_up)
        return True

    async def _transient_pause(self, transient: int, give_up: float) -> None:
        """Jittered exponential backoff before retrying a transient failure, never past ``give_up``."""
        self.transient_retries += 1
        wait = _TRANSIENT_BACKOFF.delay(transient)
        await asyncio.sleep(max(0.0, min(wait, give_up - time.monotonic())))

    @staticmethod
    def _finish(batch: list[_Item], state: Operation) -> None:
        for item in batch:
            decision = item.decision
            if isinstance(decision, Exception):
                item.resolve(None, decision)
            elif decision is not None:
                item.resolve(UpdateResult(decision.outcome, state, decision.reason), None)


@dataclass(slots=True)
class _Run:
    """Where one batch's read-decide-write loop stands."""

    give_up: float
    """monotonic time past which a transient failure is answered instead of retried"""
    attempt: int = 0
    """compare-and-set attempts (conflicts count, transient failures do not)"""
    transient: int = 0
    checked_with_leader: bool = False
    pipeline_reloaded: bool = False


def _decide(batch: list[_Item], current: Operation, pipeline: Pipeline) -> Operation:
    """Apply every item's mutation in arrival order, each on the state the previous ones left;
    record each decision on its item; return the state to write (``current`` when nothing applied).

    A conditional item (``alone``) behind an applied change waits for the next write.
    """
    state = current
    for item in batch:
        item.deferred = item.alone and state is not current
        if item.deferred:
            item.decision = None  # goes first in the next write, on the revision this one stores
            continue
        try:
            decision = item.mutation(state, pipeline)
        except Exception as exc:  # noqa: BLE001 - typed refusals, or anything a caller's update(fn) raises
            item.decision = exc
            continue
        if item.maybe_landed and decision.outcome is Outcome.DUPLICATE:
            # Our own earlier write landed; only its acknowledgement was lost.
            decision = Decision(Outcome.APPLIED, decision.operation, _LANDED)
        item.decision = decision
        if decision.outcome is Outcome.APPLIED:
            state = decision.operation
    return state


def _may_be_out_of_date(batch: list[_Item]) -> bool:
    """True when a newer state could change the answer: an event came out stale (it may
    have been reopened meanwhile) or was refused as a transition (a dependency may have
    finished meanwhile). Duplicates stay duplicates on any newer state."""
    for item in batch:
        decision = item.decision
        if isinstance(decision, InvalidTransition | RevisionMismatch):
            return True  # RevisionMismatch: the revision read may have been a replica's or the cache's
        if isinstance(decision, Decision) and decision.outcome is Outcome.STALE:
            return True
    return False
