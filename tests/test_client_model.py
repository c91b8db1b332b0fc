"""The client against a model: a hypothesis state machine over the public API on a real nats-server.

Each example gets a bucket of its own and two clients on it, ``main`` and ``other``, each with
its own NATS connection and revision cache, like two service processes. Rules create operations
(with and without ids and event ids, retried, colliding), report stage events, heartbeats and
metadata patches, cancel and reopen, redeliver events already sent, hold events back and deliver
them after newer ones, write from a cache another client has made stale (``update`` with a
function, and events), batch concurrent patches through the group committer, and archive: remove
a finished operation at its revision, or try to at an older one.

The model keeps, per operation, the value the server must hold. A stage event's expected value
is ``kvstate.machine.apply_event`` applied to the model's own copy, at the time the client
stamped into the result, so what is checked is the I/O shell: compare-and-set, group commit,
caching, duplicate detection, encoding round trip. On top of that, checks written from
docs/state-model.md alone, without the machine: which event ids an operation has applied, what
a duplicate or a late event must come out as, which stage status an applied event leaves and
which stages it may touch, the derived operation status.

After every step, every operation is read fresh from the stream leader (no cache) and must equal
the model; revisions only grow on applied writes; a terminal operation has no stage in flight;
no event is applied twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from devstack.servers import NatsServer
from kvstate import (
    Cancel,
    Client,
    ConflictError,
    Decision,
    FailStage,
    Heartbeat,
    KvstateError,
    MergeMetadata,
    Operation,
    OperationExists,
    OperationNotFound,
    OpStatus,
    Outcome,
    Reopen,
    Settings,
    SkipStage,
    StageStatus,
    StartStage,
    SucceedStage,
    UpdateResult,
    apply_event,
    new_operation,
    ready_stages,
)
from kvstate.codec import decode_operation
from kvstate.events import Event
from kvstate.keys import operation_key
from tests.conftest import PIPELINE

STAGES = PIPELINE.stage_names
NAMED_IDS = ("a", "b", "c")
MAX_LIVE = 3
MAX_HELD = 4
CLOCK_SLACK = timedelta(seconds=2)

_ACTIVE = (StageStatus.RUNNING, StageStatus.RETRYING)
_STAGE_EVENTS = (StartStage, SucceedStage, FailStage, SkipStage)

# A stage is named outright or picked from the operation's state when the step runs, so that
# random runs make progress through the pipeline instead of bouncing off its dependencies.
READY, ACTIVE, FINISHED = "<ready>", "<active>", "<finished>"
stage_picks = st.sampled_from([READY, READY, READY, ACTIVE, FINISHED, *STAGES, "nope"])
running_picks = st.sampled_from([ACTIVE, ACTIVE, ACTIVE, READY, *STAGES])
attempts = st.none() | st.integers(min_value=1, max_value=4)
clients = st.sampled_from(["main", "other"])
picks = st.integers(min_value=0, max_value=7)
json_leaf = st.integers(-3, 3) | st.sampled_from(["", "x", "ü"]) | st.booleans()
patches = st.dictionaries(
    st.sampled_from("xyz"),
    st.none() | json_leaf | st.dictionaries(st.sampled_from("pq"), st.none() | json_leaf, max_size=2),
    max_size=2,
)
initial_metadata = st.dictionaries(st.sampled_from("xyz"), json_leaf, max_size=2)


# ----------------------------------------------------------------- the reference, from the docs


def _dependents(name: str) -> set[str]:
    """Stages after ``name``, directly or through others (from the pipeline's ``after`` lists)."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for spec in PIPELINE.stages:
            if spec.name not in found and (name in spec.after or found & set(spec.after)):
                found.add(spec.name)
                changed = True
    return found


def _merged(target: object, patch: object) -> object:
    """RFC 7386, written out again here rather than imported."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _reference_status(op: Operation) -> OpStatus:
    """The operation status table of docs/state-model.md."""
    if op.cancel is not None:
        return OpStatus.CANCELLED
    status = {spec.name: op.stage(spec.name).status for spec in PIPELINE.stages}
    if any(not spec.optional and status[spec.name] is StageStatus.FAILED for spec in PIPELINE.stages):
        return OpStatus.FAILED
    finished_optional = (StageStatus.SUCCEEDED, StageStatus.FAILED, StageStatus.SKIPPED)
    if all(
        status[spec.name] in finished_optional if spec.optional else status[spec.name] is StageStatus.SUCCEEDED
        for spec in PIPELINE.stages
    ):
        return OpStatus.SUCCEEDED
    if all(s is StageStatus.WAITING for s in status.values()):
        return OpStatus.PENDING
    return OpStatus.RUNNING


def _documented_outcome(before: Operation, event: Event) -> Outcome | None:
    """Duplicate or stale, when docs/state-model.md says ``event`` must come out so on ``before``."""
    stage = getattr(event, "stage", None)
    if stage is not None and stage not in STAGES:
        return None  # UnknownStage
    if isinstance(event, Reopen) and not set(event.stages) <= set(STAGES):
        return None
    if not isinstance(event, Heartbeat) and event.event_id in before.events:
        return Outcome.DUPLICATE
    if isinstance(event, Reopen):
        return None
    if before.status.terminal:
        return Outcome.STALE
    if stage is None or isinstance(event, MergeMetadata):
        return None
    old = before.stage(stage)
    attempt = getattr(event, "attempt", None)
    if isinstance(event, Heartbeat):
        late = old.status is not StageStatus.RUNNING or (attempt is not None and attempt != old.attempt)
    elif old.status.terminal:
        late = True
    elif isinstance(event, StartStage):
        late = (attempt is None and old.status is StageStatus.RUNNING) or (
            attempt is not None and attempt <= old.attempt
        )
    elif isinstance(event, SucceedStage | FailStage):
        late = attempt is not None and (
            attempt < old.attempt or (attempt == old.attempt and old.status is StageStatus.RETRYING)
        )
    else:
        late = False
    return Outcome.STALE if late else None


def _check_applied(before: Operation, event: Event, after: Operation) -> None:
    """What docs/state-model.md says an applied ``event`` does to ``before``, independent of the machine."""
    try:
        _check_applied_rules(before, event, after)
    except AssertionError as exc:
        exc.add_note(f"applied {event!r}\n{_diff(after, before)}")
        raise


def _check_applied_rules(before: Operation, event: Event, after: Operation) -> None:
    stage = getattr(event, "stage", None)
    old = before.stage(stage) if stage in STAGES else None
    attempt = getattr(event, "attempt", None)
    remembered = not isinstance(event, Heartbeat)
    assert after.status is _reference_status(after), (after.status, after.stages)
    if remembered:
        assert after.events[-1] == event.event_id
        assert event.event_id not in before.events
    ending = after.status in (OpStatus.FAILED, OpStatus.CANCELLED) and after.status is not before.status
    touched: set[str] = set()
    if isinstance(event, Reopen):
        touched = set(event.stages) | {s for name in event.stages for s in _dependents(name)}
        for name in STAGES:
            if before.stage(name).status is StageStatus.CANCELLED:
                touched |= {name, *_dependents(name)}
        for name in touched:
            assert after.stage(name).status is StageStatus.WAITING, (name, after.stage(name))
            assert after.stage(name).attempt == 0
            assert after.stage(name).metadata == before.stage(name).metadata
        assert after.cancel is None
        assert after.status in (OpStatus.PENDING, OpStatus.RUNNING)
    elif isinstance(event, Cancel):
        assert after.status is OpStatus.CANCELLED and after.cancel is not None
    elif isinstance(event, MergeMetadata):
        if event.stage is None:
            assert after.metadata == _merged(before.metadata, event.patch)
        else:
            assert after.stage(event.stage).metadata == _merged(before.stage(event.stage).metadata, event.patch)
            touched = {event.stage}  # its status stays, only its namespace changes
            assert after.stage(event.stage).status is before.stage(event.stage).status
    else:
        assert old is not None and stage is not None
        new = after.stage(stage)
        touched = {stage}
        assert not before.status.terminal, "a terminal operation accepted a stage event"
        if isinstance(event, Heartbeat):
            assert old.status is new.status is StageStatus.RUNNING and new.attempt == old.attempt
            assert after.history == before.history and after.events == before.events
        elif isinstance(event, StartStage):
            assert new.status is StageStatus.RUNNING
            assert new.attempt == (old.attempt + 1 if attempt is None else attempt) and new.attempt > old.attempt
        elif isinstance(event, SucceedStage | FailStage):
            expected_attempt = attempt if attempt is not None else old.attempt + (old.status is not StageStatus.RUNNING)
            assert new.attempt == expected_attempt, (old, new)
            if isinstance(event, SucceedStage):
                assert new.status is StageStatus.SUCCEEDED
            else:
                retry = event.retryable and new.attempt < PIPELINE.stage(stage).max_attempts
                assert new.status is (StageStatus.RETRYING if retry else StageStatus.FAILED), (event, new)
                assert new.error is not None and new.error.message == event.error
        elif isinstance(event, SkipStage):
            assert PIPELINE.stage(stage).optional and old.status is not StageStatus.RUNNING
            assert new.status is StageStatus.SKIPPED
        patch = getattr(event, "metadata", None)
        assert new.metadata == (old.metadata if patch is None else _merged(old.metadata, patch))
    for name in STAGES:
        if name in touched:
            continue
        was, now = before.stage(name), after.stage(name)
        if ending and was.status in _ACTIVE:
            assert now.status is StageStatus.CANCELLED, (name, was, now)
        else:
            assert now.status is was.status, f"{type(event).__name__} moved stage {name}: {was} -> {now}"
        assert now.attempt == was.attempt


def _diff(got: object, want: object) -> str:
    """Where two operations differ, field by field (stages one by one), instead of two reprs."""
    if not isinstance(got, Operation) or not isinstance(want, Operation):
        return f"got {got!r}, want {want!r}"
    lines = []
    for name in Operation.__struct_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if name == "stages" and isinstance(a, dict) and isinstance(b, dict):
            lines += [f"  stages[{k}]: {a.get(k)} != {b.get(k)}" for k in {*a, *b} if a.get(k) != b.get(k)]
        elif a != b:
            lines.append(f"  {name}: {a!r} != {b!r}")
    return f"operation {want.id} differs (got != want):\n" + "\n".join(lines)


def _check_operation(op: Operation) -> None:
    """Invariants of any stored operation."""
    assert op.status is _reference_status(op), (op.status, op.stages)
    assert (op.finished_at is not None) == op.status.terminal
    if op.status.terminal:
        in_flight = [name for name, s in op.stages.items() if s.status in _ACTIVE]
        assert not in_flight, f"{op.status} operation {op.id} has stages in flight: {in_flight}"
    assert len(op.events) == len(set(op.events)), f"an event id is remembered twice: {op.events}"
    seen: set[tuple[str | None, str | None]] = set()
    for entry in op.history:
        if entry.event is None:
            continue
        pair = (entry.event, entry.stage)
        assert pair not in seen, f"event {entry.event} changed {entry.stage or 'the status'} twice: {op.history}"
        seen.add(pair)


# ----------------------------------------------------------------- the state machine


@dataclass
class Tracked:
    """What the model knows of one live operation."""

    op: Operation
    """the value (and revision) the server must hold"""
    sent: list[Event] = field(default_factory=list)
    """events applied with a known id, for redelivery"""
    applied: set[str] = field(default_factory=set)


def _send(client: Client, op_id: str, event: Event, explicit: bool) -> Coroutine[Any, Any, UpdateResult]:
    """The client call that reports ``event`` (with its id, or letting the client make one)."""
    eid = {"event_id": event.event_id} if explicit else {}
    worker = event.worker
    if isinstance(event, StartStage):
        return client.start(op_id, event.stage, worker=worker, attempt=event.attempt, metadata=event.metadata, **eid)
    if isinstance(event, SucceedStage):
        return client.succeed(op_id, event.stage, worker=worker, attempt=event.attempt, metadata=event.metadata, **eid)
    if isinstance(event, FailStage):
        return client.fail(
            op_id, event.stage, event.error, retryable=event.retryable, attempt=event.attempt, worker=worker, **eid
        )
    if isinstance(event, SkipStage):
        return client.skip(op_id, event.stage, reason=event.reason, worker=worker, **eid)
    if isinstance(event, Heartbeat):
        return client.heartbeat(op_id, event.stage, worker=worker, attempt=event.attempt)
    if isinstance(event, MergeMetadata):
        return client.merge_metadata(op_id, event.patch, stage=event.stage, worker=worker, **eid)
    if isinstance(event, Cancel):
        return client.cancel(op_id, reason=event.reason, by=worker, **eid)
    assert isinstance(event, Reopen)
    return client.reopen(op_id, list(event.stages), **eid)


def _machine(op: Operation, event: Event) -> Decision | KvstateError:
    """The machine's answer to ``event`` on ``op``: a decision, or the typed refusal it raises."""
    try:
        return apply_event(op, PIPELINE, event, datetime.now(UTC))
    except KvstateError as exc:
        return exc


def _add_key(key: str, value: int) -> Callable[[Operation], Operation]:
    def fn(op: Operation) -> Operation:
        return msgspec.structs.replace(op, metadata={**op.metadata, key: value})

    return fn


class ClientModel(RuleBasedStateMachine):
    nats_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.bucket = "model" + uuid.uuid4().hex[:12]
        config = Settings(nats_url=self.nats_url, bucket=self.bucket)
        self.main = Client(config, create_bucket=True, name="model-main")
        self.other = Client(config, name="model-other")
        self.opened: list[Client] = []
        try:
            self.run(self.main.__aenter__())
            self.opened.append(self.main)
            self.run(self.main.set_pipeline(PIPELINE))
            self.run(self.other.__aenter__())
            self.opened.append(self.other)
        except BaseException:
            self.teardown()
            raise
        self.clients = {"main": self.main, "other": self.other}
        self.live: dict[str, Tracked] = {}
        self.removed: dict[str, int] = {}  # op id -> revision of its removal marker
        self.states: dict[tuple[str, int], Operation] = {}  # every value the key held, by revision
        self.held: list[tuple[str, Event]] = []
        self.counter = 0
        self.cache_duplicates = 0
        self.reapplied = 0

    def teardown(self) -> None:
        try:
            if self.opened:
                self.run(self._close())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _close(self) -> None:
        try:
            await self.main._open_store().js.delete_key_value(self.bucket)
        finally:
            for client in reversed(self.opened):
                await client.close()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, KvstateError | None, datetime, datetime]:
        before = datetime.now(UTC)
        try:
            result, error = self.run(coro), None
        except KvstateError as exc:
            result, error = None, exc
        return result, error, before - CLOCK_SLACK, datetime.now(UTC) + CLOCK_SLACK

    def fresh_id(self) -> str:
        self.counter += 1
        return f"msg-{self.counter}"

    # ------------------------------------------------------------- picking

    def pick_live(self, pick: int) -> str:
        ids = sorted(self.live)
        return ids[pick % len(ids)]

    def resolve_stage(self, op: Operation, pick: str) -> str:
        active = [name for name in STAGES if op.stage(name).status in _ACTIVE]
        finished = [name for name in STAGES if op.stage(name).status.terminal]
        ready = ready_stages(op, PIPELINE)
        choice = {READY: ready + active, ACTIVE: active + ready, FINISHED: finished + ready}.get(pick)
        if choice is None:
            return pick
        return choice[0] if choice else STAGES[0]

    def remember(self, op_id: str, op: Operation) -> None:
        self.states[(op_id, op.revision)] = op
        self.live[op_id].op = op

    # ------------------------------------------------------------- one event, checked

    def deliver(self, who: str, op_id: str, event: Event, explicit: bool) -> Outcome | None:
        """Report ``event`` through client ``who`` and check the answer against the model."""
        result, error, t0, t1 = self.call(_send(self.clients[who], op_id, event, explicit))
        tracked = self.live.get(op_id)
        if tracked is None:  # removed: nothing to update
            if error is None:
                self.check_cached_duplicate(op_id, event, explicit, result)
                return result.outcome
            assert isinstance(error, OperationNotFound), f"{event!r} on a removed operation raised {error!r}"
            return None
        before = tracked.op
        documented = _documented_outcome(before, event)
        if documented is not None:
            assert error is None, f"{event!r} must come out {documented}, the client raised {error!r}"
            assert result.outcome in (documented, Outcome.DUPLICATE), f"{event!r} must be {documented}: {result}"
        expected = _machine(before, event)
        if isinstance(expected, KvstateError):
            assert error is not None, f"the machine refuses {event!r} with {expected!r}, the client said {result}"
            assert type(error) is type(expected), f"{event!r}: the machine raises {expected!r}, the client {error!r}"
            return None
        assert error is None, f"{event!r}: the machine says {expected.outcome}, the client raised {error!r}"
        assert isinstance(result, UpdateResult)
        if result.outcome is Outcome.DUPLICATE:
            # Possibly answered from this client's cache, from an older state that remembers the event.
            self.check_cached_duplicate(op_id, event, explicit, result)
            if expected.outcome is not Outcome.DUPLICATE:
                self.cache_duplicates += 1
            return result.outcome
        assert result.outcome is expected.outcome, f"{event!r}: machine {expected.outcome}, client {result}"
        if result.outcome is Outcome.STALE:
            # A stale answer is confirmed against the leader, so it carries the current state.
            assert result.operation == before, f"stale {event!r}: {_diff(result.operation, before)}"
            return result.outcome
        if explicit or isinstance(event, Heartbeat):
            event_id = event.event_id
        else:  # the client made the id: it is the one the operation now remembers last
            event_id = result.operation.events[-1]
            assert event_id not in before.events and event_id != event.event_id
        event = msgspec.structs.replace(event, event_id=event_id)
        stamped = result.operation.updated_at
        assert t0 <= stamped <= t1, f"update stamped {stamped}, called between {t0} and {t1}"
        decision = apply_event(before, PIPELINE, event, stamped)
        want = msgspec.structs.replace(decision.operation, revision=result.revision)
        assert result.revision > before.revision, f"applied at revision {result.revision} <= {before.revision}"
        assert result.operation == want, f"{event!r}\n{_diff(result.operation, want)}"
        _check_applied(before, event, want)
        self.note_applied(tracked, event)
        self.remember(op_id, want)
        return result.outcome

    def note_applied(self, tracked: Tracked, event: Event) -> None:
        if isinstance(event, Heartbeat):
            return
        if event.event_id in tracked.applied:
            # Documented: an id that left the window of the last 32 is not recognised any more.
            assert event.event_id not in tracked.op.events, f"event {event.event_id} applied twice"
            self.reapplied += 1
        tracked.applied.add(event.event_id)
        tracked.sent.append(event)

    def check_cached_duplicate(self, op_id: str, event: Event, explicit: bool, result: UpdateResult) -> None:
        """A duplicate carries a state the key really held that remembers the event.

        It may be an older one: a duplicate stays a duplicate on any newer state, so the
        committer answers it from the client's cache without a read.
        """
        assert result.outcome is Outcome.DUPLICATE, result
        assert explicit and not isinstance(event, Heartbeat), f"a fresh event id came out duplicate: {event!r}"
        genuine = self.states.get((op_id, result.revision))
        assert genuine is not None, f"duplicate answered with revision {result.revision}, never stored"
        assert result.operation == genuine, f"duplicate {event!r}: {_diff(result.operation, genuine)}"
        assert event.event_id in genuine.events

    def stage_event(self, who: str, pick: int, stage: str, make: Callable[[str, str], Event], explicit: bool) -> None:
        op_id = self.pick_live(pick)
        name = self.resolve_stage(self.live[op_id].op, stage)
        self.deliver(who, op_id, make(name, self.fresh_id()), explicit)

    # ------------------------------------------------------------- creation

    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(who=clients, named=st.booleans(), explicit=st.booleans(), metadata=initial_metadata)
    def create(self, who: str, named: bool, explicit: bool, metadata: dict[str, object]) -> None:
        free = [name for name in NAMED_IDS if name not in self.live]
        op_id = free[0] if named and free else None
        event_id = self.fresh_id() if explicit else None
        op, error, t0, t1 = self.call(
            self.clients[who].create("orders", op_id=op_id, metadata=metadata, event_id=event_id)
        )
        assert error is None, f"create raised {error!r}"
        assert isinstance(op, Operation)
        if op_id is not None:
            assert op.id == op_id
        else:
            assert op.id not in self.live and op.id not in self.removed
        if event_id is not None:
            assert op.origin == event_id
        assert op.origin is not None and t0 <= op.created_at <= t1
        floor = self.removed.pop(op.id, 0)
        assert op.revision > floor
        want = new_operation(op.id, PIPELINE, op.created_at, metadata, op.origin)
        want = msgspec.structs.replace(want, revision=op.revision)
        assert op == want, f"create: {_diff(op, want)}"
        self.live[op.id] = Tracked(want)
        self.remember(op.id, want)

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, same_event=st.booleans(), explicit=st.booleans())
    def create_again(self, who: str, pick: int, same_event: bool, explicit: bool) -> None:
        """A retried create returns the operation as it is now; any other create of the id is refused."""
        op_id = self.pick_live(pick)
        current = self.live[op_id].op
        event_id = current.origin if same_event else self.fresh_id() if explicit else None
        got, error, _, _ = self.call(self.clients[who].create("orders", op_id=op_id, event_id=event_id))
        if same_event:
            assert error is None, f"a retried create raised {error!r}"
            assert got == current, f"a retried create: {_diff(got, current)}"
        else:
            assert isinstance(error, OperationExists), f"a second create of {op_id} gave {got!r} / {error!r}"
            assert error.op_id == op_id and error.revision == current.revision

    # ------------------------------------------------------------- stage events

    @precondition(lambda self: self.live)
    @rule(
        who=clients,
        pick=picks,
        stage=stage_picks,
        attempt=attempts,
        metadata=st.none() | patches,
        explicit=st.booleans(),
    )
    def start(self, who: str, pick: int, stage: str, attempt: int | None, metadata: Any, explicit: bool) -> None:
        self.stage_event(
            who,
            pick,
            stage,
            lambda name, eid: StartStage(stage=name, attempt=attempt, metadata=metadata, worker=who, event_id=eid),
            explicit,
        )

    @precondition(lambda self: self.live)
    @rule(
        who=clients,
        pick=picks,
        stage=stage_picks,
        attempt=attempts,
        metadata=st.none() | patches,
        explicit=st.booleans(),
    )
    def succeed(self, who: str, pick: int, stage: str, attempt: int | None, metadata: Any, explicit: bool) -> None:
        self.stage_event(
            who,
            pick,
            stage,
            lambda name, eid: SucceedStage(stage=name, attempt=attempt, metadata=metadata, worker=who, event_id=eid),
            explicit,
        )

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stage=stage_picks, attempt=attempts, retryable=st.booleans(), explicit=st.booleans())
    def fail(self, who: str, pick: int, stage: str, attempt: int | None, retryable: bool, explicit: bool) -> None:
        self.stage_event(
            who,
            pick,
            stage,
            lambda name, eid: FailStage(
                stage=name, error="boom", retryable=retryable, attempt=attempt, worker=who, event_id=eid
            ),
            explicit,
        )

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stages=st.integers(1, len(STAGES)), explicit=st.booleans())
    def work_through(self, who: str, pick: int, stages: int, explicit: bool) -> None:
        """A run of services each finishing the next ready stage (so operations get to succeed)."""
        op_id = self.pick_live(pick)
        for _ in range(stages):
            ready = ready_stages(self.live[op_id].op, PIPELINE)
            if not ready or self.live[op_id].op.status.terminal:
                return
            self.deliver(who, op_id, SucceedStage(stage=ready[0], worker=who, event_id=self.fresh_id()), explicit)

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stage=stage_picks, explicit=st.booleans())
    def skip(self, who: str, pick: int, stage: str, explicit: bool) -> None:
        self.stage_event(
            who, pick, stage, lambda name, eid: SkipStage(stage=name, reason="n/a", worker=who, event_id=eid), explicit
        )

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stage=running_picks, attempt=attempts)
    def heartbeat(self, who: str, pick: int, stage: str, attempt: int | None) -> None:
        self.stage_event(
            who, pick, stage, lambda name, eid: Heartbeat(stage=name, attempt=attempt, worker=who, event_id=eid), False
        )

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stage=st.none() | stage_picks, patch=patches, explicit=st.booleans())
    def merge_metadata(self, who: str, pick: int, stage: str | None, patch: Any, explicit: bool) -> None:
        op_id = self.pick_live(pick)
        name = None if stage is None else self.resolve_stage(self.live[op_id].op, stage)
        self.deliver(who, op_id, MergeMetadata(patch=patch, stage=name, worker=who, event_id=self.fresh_id()), explicit)

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, explicit=st.booleans())
    def cancel(self, who: str, pick: int, explicit: bool) -> None:
        op_id = self.pick_live(pick)
        self.deliver(who, op_id, Cancel(reason="stop", worker=who, event_id=self.fresh_id()), explicit)

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, stages=st.lists(stage_picks, min_size=1, max_size=2), explicit=st.booleans())
    def reopen(self, who: str, pick: int, stages: list[str], explicit: bool) -> None:
        op_id = self.pick_live(pick)
        names = tuple(dict.fromkeys(self.resolve_stage(self.live[op_id].op, s) for s in stages))
        self.deliver(who, op_id, Reopen(stages=names, event_id=self.fresh_id()), explicit)

    # ------------------------------------------------------------- duplicates and late events

    @precondition(lambda self: any(t.sent for t in self.live.values()))
    @rule(who=clients, pick=picks, which=picks)
    def redeliver(self, who: str, pick: int, which: int) -> None:
        """The same message again: a duplicate while its id is remembered, never applied twice."""
        ids = sorted(op_id for op_id, t in self.live.items() if t.sent)
        op_id = ids[pick % len(ids)]
        sent = self.live[op_id].sent
        self.deliver(who, op_id, sent[which % len(sent)], explicit=True)

    @precondition(lambda self: self.live and len(self.held) < MAX_HELD)
    @rule(
        pick=picks, stage=stage_picks, kind=st.sampled_from(["start", "succeed", "fail"]), attempt=attempts, who=clients
    )
    def hold_back(self, pick: int, stage: str, kind: str, attempt: int | None, who: str) -> None:
        """A message that will arrive late, after whatever the next steps report."""
        op_id = self.pick_live(pick)
        name = self.resolve_stage(self.live[op_id].op, stage)
        eid = self.fresh_id()
        event: Event
        if kind == "start":
            event = StartStage(stage=name, attempt=attempt, worker=who, event_id=eid)
        elif kind == "succeed":
            event = SucceedStage(stage=name, attempt=attempt, worker=who, event_id=eid)
        else:
            event = FailStage(stage=name, error="late", attempt=attempt, worker=who, event_id=eid)
        self.held.append((op_id, event))

    @precondition(lambda self: self.held)
    @rule(who=clients, which=picks)
    def deliver_late(self, who: str, which: int) -> None:
        op_id, event = self.held.pop(which % len(self.held))
        self.deliver(who, op_id, event, explicit=True)

    # ------------------------------------------------------------- stale caches and group commit

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks)
    def get(self, who: str, pick: int) -> None:
        """A read returns the current state (and refreshes that client's cache)."""
        op_id = self.pick_live(pick)
        got = self.run(self.clients[who].get(op_id))
        assert got == self.live[op_id].op, f"{who}.get: {_diff(got, self.live[op_id].op)}"

    @precondition(lambda self: self.live)
    @rule(who=clients, pick=picks, value=st.integers(0, 9))
    def update_with_function(self, who: str, pick: int, value: int) -> None:
        op_id = self.pick_live(pick)
        self.check_update(who, op_id, f"fn-{who}", value)

    def check_update(self, who: str, op_id: str, key: str, value: int) -> None:
        before = self.live[op_id].op
        fn = _add_key(key, value)
        result, error, _, _ = self.call(self.clients[who].update(op_id, fn))
        assert error is None, f"update raised {error!r}"
        assert result.outcome is Outcome.APPLIED and result.revision > before.revision, result
        want = msgspec.structs.replace(fn(before), revision=result.revision)
        assert result.operation == want, f"update(fn): {_diff(result.operation, want)}"
        self.remember(op_id, want)

    @precondition(lambda self: self.live)
    @rule(pick=picks, by_function=st.booleans(), explicit=st.booleans())
    def write_from_a_stale_cache(self, pick: int, by_function: bool, explicit: bool) -> None:
        """``other`` caches a revision, ``main`` moves past it, then ``other`` writes: nothing is lost."""
        op_id = self.pick_live(pick)
        assert self.run(self.other.get(op_id)) == self.live[op_id].op
        first = self.deliver(
            "main", op_id, MergeMetadata(patch={"by-main": self.counter}, event_id=self.fresh_id()), True
        )
        if by_function:
            self.check_update("other", op_id, "by-other", self.counter)
        else:
            self.deliver(
                "other", op_id, MergeMetadata(patch={"by-other": self.counter}, event_id=self.fresh_id()), explicit
            )
        if first is Outcome.APPLIED:
            assert "by-main" in self.live[op_id].op.metadata

    @precondition(lambda self: self.live)
    @rule(pick=picks, n=st.integers(2, 5), repeat=st.none() | st.integers(0, 4))
    def concurrent_patches(self, pick: int, n: int, repeat: int | None) -> None:
        """Patches of one operation at once from one client share compare-and-sets, in arrival order;
        one sent twice within the batch is a duplicate."""
        op_id = self.pick_live(pick)
        events = [MergeMetadata(patch={f"k{i}": self.counter}, event_id=self.fresh_id()) for i in range(n)]
        if repeat is not None:
            events.append(events[repeat % n])

        async def together() -> list[UpdateResult | BaseException]:
            return await asyncio.gather(
                *(self.main.merge_metadata(op_id, e.patch, event_id=e.event_id) for e in events), return_exceptions=True
            )

        t0 = datetime.now(UTC) - CLOCK_SLACK
        outcomes = self.run(together())
        t1 = datetime.now(UTC) + CLOCK_SLACK
        results: list[UpdateResult] = []
        for event, result in zip(events, outcomes, strict=True):
            assert isinstance(result, UpdateResult), f"{event!r} raised {result!r}"
            results.append(result)
        last = max(results, key=lambda r: r.revision)
        tracked = self.live[op_id]
        state = tracked.op
        revision = state.revision
        for event, result in zip(events, results, strict=True):
            # Patches take the time only as updated_at, so the last one's stamp stands for all.
            decision = apply_event(state, PIPELINE, event, last.operation.updated_at)
            assert result.outcome is decision.outcome, f"{event!r}: machine {decision.outcome}, client {result}"
            assert result.revision >= revision, f"a later caller was answered from an earlier write: {results}"
            assert _documented_outcome(state, event) in (None, result.outcome), f"{event!r}: {result}"
            revision = result.revision
            if decision.outcome is Outcome.APPLIED:
                _check_applied(state, event, decision.operation)
                assert result.revision > tracked.op.revision, f"applied at {result.revision}, was {tracked.op.revision}"
                assert event.event_id in result.operation.events, f"{event!r} applied, not remembered: {result}"
                self.note_applied(tracked, event)
            state = decision.operation
        if state is not tracked.op:
            assert t0 <= last.operation.updated_at <= t1, f"batch stamped {last.operation.updated_at}, not {t0}..{t1}"
            want = msgspec.structs.replace(state, revision=last.revision)
            assert last.operation == want, f"batch: {_diff(last.operation, want)}"
            self.remember(op_id, want)
        else:
            assert all(r.operation == state for r in results), results

    # ------------------------------------------------------------- archiving

    @precondition(lambda self: any(t.op.status.terminal for t in self.live.values()))
    @rule(who=clients, pick=picks)
    def archive(self, who: str, pick: int) -> None:
        """The archiver's removal of a finished operation at its current revision."""
        ids = sorted(op_id for op_id, t in self.live.items() if t.op.status.terminal)
        op_id = ids[pick % len(ids)]
        current = self.live[op_id].op
        marker = self.run(self.clients[who].remove(op_id, current.revision))
        assert marker > current.revision, f"removal marker at {marker}, operation at {current.revision}"
        del self.live[op_id]
        self.removed[op_id] = marker
        for client in (self.main, self.other):
            with pytest.raises(OperationNotFound):
                self.run(client.get(op_id))

    @precondition(lambda self: any(r < self.current_revision(i) for i, r in self.states))
    @rule(who=clients, pick=picks)
    def archive_a_stale_revision(self, who: str, pick: int) -> None:
        """A removal computed from an older snapshot is refused, and removes nothing."""
        older = sorted((i, r) for i, r in self.states if r < self.current_revision(i))
        op_id, revision = older[pick % len(older)]
        with pytest.raises(ConflictError) as info:
            self.run(self.clients[who].remove(op_id, revision))
        assert info.value.expected_revision == revision, info.value

    def current_revision(self, op_id: str) -> int:
        tracked = self.live.get(op_id)
        return tracked.op.revision if tracked is not None else self.removed.get(op_id, 0)

    @precondition(lambda self: self.removed)
    @rule(who=clients, pick=picks, stage=st.sampled_from(STAGES))
    def event_on_a_removed_operation(self, who: str, pick: int, stage: str) -> None:
        ids = sorted(self.removed)
        op_id = ids[pick % len(ids)]
        self.deliver(who, op_id, SucceedStage(stage=stage, event_id=self.fresh_id()), explicit=True)

    # ------------------------------------------------------------- after every step

    @invariant()
    def server_holds_the_model(self) -> None:
        async def stored() -> dict[str, Operation | None]:
            found: dict[str, Operation | None] = {}
            store = self.main._open_store()
            for op_id in [*self.live, *self.removed]:
                key = operation_key(op_id)
                entry = await store.get(key, leader=True)
                found[op_id] = None if entry is None else decode_operation(key, entry.revision, entry.value or b"")
            return found

        for op_id, op in self.run(stored()).items():
            tracked = self.live.get(op_id)
            if tracked is None:
                assert op is None, f"removed operation {op_id} is back: {op}"
                continue
            assert op == tracked.op, f"stored value: {_diff(op, tracked.op)}"
            try:
                _check_operation(op)
            except AssertionError as exc:
                exc.add_note(f"stored value: {op}")
                raise
            for event_id in tracked.applied & set(op.events):
                assert op.events.count(event_id) == 1, f"{event_id} remembered twice: {op.events}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_matches_model(nats_server: NatsServer) -> None:
    ClientModel.nats_url = nats_server.url
    run_state_machine_as_test(
        ClientModel,
        settings=settings(
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
