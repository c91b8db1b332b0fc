"""The state machine: pure functions from (operation, pipeline, event, now) to a decision.

No I/O here. The client runs these inside its compare-and-set loop; the archiver, the
dashboard and the property tests call them directly. The rules are documented, with a
diagram, in docs/state-model.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import msgspec

from kvstate.derive import retry_stages
from kvstate.errors import InvalidMetadata, InvalidTransition, NotRetryable
from kvstate.events import (
    Cancel,
    Event,
    FailStage,
    Heartbeat,
    MergeMetadata,
    Reopen,
    SkipStage,
    StartStage,
    SucceedStage,
)
from kvstate.merge import merge_patch
from kvstate.model import (
    ACTION_LIMIT,
    EVENT_WINDOW,
    HISTORY_LIMIT,
    SCHEMA_VERSION,
    Action,
    ActionKind,
    CancelInfo,
    JSONObject,
    Operation,
    OpStatus,
    Outcome,
    StageError,
    StageState,
    StageStatus,
    Transition,
)
from kvstate.pipeline import Pipeline, StageSpec
from kvstate.tracing import trace_id_from

__all__ = [
    "Decision",
    "already_applied",
    "apply_event",
    "derive_status",
    "new_operation",
    "ready_stages",
    "redrive",
    "retry",
]

_replace = msgspec.structs.replace
_WAITING = StageState(status=StageStatus.WAITING)
_ACTIVE = (StageStatus.RUNNING, StageStatus.RETRYING)


class Decision(NamedTuple):
    """What the state machine decided: the outcome, the resulting operation and why."""

    outcome: Outcome
    operation: Operation
    reason: str | None = None


def new_operation(
    op_id: str,
    pipeline: Pipeline,
    now: datetime,
    metadata: JSONObject | None = None,
    event_id: str | None = None,
    traceparent: str | None = None,
) -> Operation:
    """A fresh, pending operation of ``pipeline`` with every stage waiting (in the trace of ``traceparent``)."""
    return Operation(
        schema=SCHEMA_VERSION,
        id=op_id,
        pipeline=pipeline.name,
        status=OpStatus.PENDING,
        created_at=now,
        updated_at=now,
        stages={name: StageState(status=StageStatus.WAITING) for name in pipeline.stage_names},
        metadata=dict(metadata or {}),
        origin=event_id,
        history=[Transition(at=now, to=OpStatus.PENDING.value, event=event_id)],
        events=[event_id] if event_id else [],
        trace_id=trace_id_from(traceparent) if traceparent is not None else None,
    )


def derive_status(op: Operation, pipeline: Pipeline) -> OpStatus:
    """The operation status its stages imply.

    cancelled once cancelled; failed when a required stage failed for good; succeeded
    when every required stage succeeded and every optional stage finished; pending while
    no stage has moved; running otherwise.
    """
    if op.cancel is not None:
        return OpStatus.CANCELLED
    stages = op.stages
    all_done = True
    any_moved = False
    for spec in pipeline.stages:
        state = stages.get(spec.name)
        status = StageStatus.WAITING if state is None else state.status
        if status is StageStatus.WAITING:
            all_done = False
            continue
        any_moved = True
        if status is StageStatus.SUCCEEDED:
            continue
        if spec.optional:
            if status is not StageStatus.FAILED and status is not StageStatus.SKIPPED:
                all_done = False
        elif status is StageStatus.FAILED:
            return OpStatus.FAILED
        else:
            all_done = False
    if all_done:
        return OpStatus.SUCCEEDED
    return OpStatus.RUNNING if any_moved else OpStatus.PENDING


def ready_stages(op: Operation, pipeline: Pipeline) -> list[str]:
    """Waiting stages whose dependencies are all finished: what can start next."""
    return [
        spec.name
        for spec in pipeline.stages
        if op.stage(spec.name).status is StageStatus.WAITING and not _unmet_dependencies(op, pipeline, spec)
    ]


def apply_event(op: Operation, pipeline: Pipeline, event: Event, now: datetime) -> Decision:
    """Apply ``event`` to ``op``: applied, duplicate or stale; raises for illegal input.

    Raises UnknownStage for stages the pipeline lacks, InvalidTransition for changes the
    machine forbids, InvalidMetadata for patches that are not objects.
    """
    if event.event_id in op.events or (isinstance(event, Cancel | Reopen) and _acted(op, event.event_id)):
        return Decision(Outcome.DUPLICATE, op, f"event {event.event_id} was already applied")
    if isinstance(event, Reopen):
        return _reopen(op, pipeline, event, now)
    stage = getattr(event, "stage", None)
    spec = pipeline.stage(stage) if stage is not None else None
    if op.status.terminal:
        return Decision(Outcome.STALE, op, f"operation is already {op.status.value}")
    if isinstance(event, MergeMetadata):
        return _merge(op, event, now)
    if isinstance(event, Cancel):
        return _cancel(op, pipeline, event, now)
    assert spec is not None  # every remaining event type names a stage
    current = op.stage(spec.name)
    if isinstance(event, Heartbeat):
        return _heartbeat(op, spec, current, event, now)
    if current.status.terminal:
        return Decision(Outcome.STALE, op, f"stage {spec.name} is already {current.status.value}")
    if isinstance(event, StartStage):
        return _start(op, pipeline, spec, current, event, now)
    if isinstance(event, SucceedStage | FailStage):
        return _finish(op, pipeline, spec, current, event, now)
    if isinstance(event, SkipStage):
        return _skip(op, pipeline, spec, current, event, now)
    raise TypeError(f"not a kvstate event: {event!r}")  # pragma: no cover - Event is closed


def _start(
    op: Operation, pipeline: Pipeline, spec: StageSpec, current: StageState, event: StartStage, now: datetime
) -> Decision:
    attempt = event.attempt
    if attempt is None:
        if current.status is StageStatus.RUNNING:
            return Decision(Outcome.STALE, op, f"stage {spec.name} is already running attempt {current.attempt}")
        attempt = current.attempt + 1
    elif attempt <= current.attempt:
        if attempt == current.attempt and current.status is StageStatus.RUNNING:
            return Decision(Outcome.STALE, op, f"attempt {attempt} of stage {spec.name} already started")
        return Decision(
            Outcome.STALE, op, f"attempt {attempt} of stage {spec.name} is older than attempt {current.attempt}"
        )
    _check_attempt(op, spec, attempt)
    _check_dependencies(op, pipeline, spec)
    new_state = StageState(
        status=StageStatus.RUNNING,
        attempt=attempt,
        worker=event.worker,
        started_at=now,
        heartbeat_at=now,
        metadata=_merged(current.metadata, event.metadata),
        trace_id=trace_id_from(event.traceparent) if event.traceparent is not None else None,
    )
    return _apply_stage(op, pipeline, spec.name, current, new_state, event, now)


def _heartbeat(op: Operation, spec: StageSpec, current: StageState, event: Heartbeat, now: datetime) -> Decision:
    if current.status is not StageStatus.RUNNING:
        return Decision(Outcome.STALE, op, f"stage {spec.name} is {current.status.value}, not running")
    if event.attempt is not None and event.attempt != current.attempt:
        return Decision(
            Outcome.STALE,
            op,
            f"heartbeat for attempt {event.attempt}, stage {spec.name} runs attempt {current.attempt}",
        )
    new_state = _replace(current, heartbeat_at=now, worker=event.worker or current.worker)
    stages = dict(op.stages)
    stages[spec.name] = new_state
    return Decision(Outcome.APPLIED, _replace(op, stages=stages, updated_at=now))


def _finish(
    op: Operation,
    pipeline: Pipeline,
    spec: StageSpec,
    current: StageState,
    event: SucceedStage | FailStage,
    now: datetime,
) -> Decision:
    attempt = event.attempt
    started_at = current.started_at
    implicit_start = current.status is not StageStatus.RUNNING
    if attempt is None:
        attempt = current.attempt + 1 if implicit_start else current.attempt
    elif attempt < current.attempt:
        return Decision(
            Outcome.STALE, op, f"attempt {attempt} of stage {spec.name} is older than attempt {current.attempt}"
        )
    elif attempt == current.attempt and current.status is StageStatus.RETRYING:
        return Decision(Outcome.STALE, op, f"attempt {attempt} of stage {spec.name} already failed")
    elif attempt > current.attempt:
        implicit_start = True
    if implicit_start:
        _check_attempt(op, spec, attempt)
        _check_dependencies(op, pipeline, spec)
        started_at = now
    metadata = _merged(current.metadata, event.metadata)
    if isinstance(event, SucceedStage):
        status, error = StageStatus.SUCCEEDED, None
    else:
        retry = event.retryable and attempt < spec.max_attempts
        status = StageStatus.RETRYING if retry else StageStatus.FAILED
        error = StageError(message=event.error, retryable=event.retryable, code=event.code)
    new_state = StageState(
        status=status,
        attempt=attempt,
        worker=event.worker or current.worker,
        started_at=started_at,
        finished_at=now,
        heartbeat_at=current.heartbeat_at if not implicit_start else None,
        error=error,
        metadata=metadata,
        trace_id=current.trace_id if not implicit_start else None,  # the attempt's trace, for its link
    )
    return _apply_stage(op, pipeline, spec.name, current, new_state, event, now)


def _skip(
    op: Operation, pipeline: Pipeline, spec: StageSpec, current: StageState, event: SkipStage, now: datetime
) -> Decision:
    if not spec.optional:
        raise InvalidTransition(op.id, "only optional stages can be skipped", spec.name)
    if current.status is StageStatus.RUNNING:
        raise InvalidTransition(op.id, "a running stage cannot be skipped; fail or finish it first", spec.name)
    error = StageError(message=event.reason) if event.reason else None
    metadata = _merged(current.metadata, event.metadata)
    new_state = _replace(current, status=StageStatus.SKIPPED, finished_at=now, error=error, metadata=metadata)
    return _apply_stage(op, pipeline, spec.name, current, new_state, event, now)


def _merge(op: Operation, event: MergeMetadata, now: datetime) -> Decision:
    if not isinstance(event.patch, dict):
        raise InvalidMetadata("a metadata patch must be a JSON object")
    if event.attempt is not None and event.stage is None:
        raise InvalidMetadata("a metadata patch names an attempt only together with its stage")
    current = op.stage(event.stage) if event.stage is not None else None
    if current is not None and event.attempt is not None:
        if event.attempt < current.attempt:
            return Decision(
                Outcome.STALE, op, f"metadata of attempt {event.attempt}; stage {event.stage} is at {current.attempt}"
            )
        if event.attempt > current.attempt:
            raise InvalidTransition(op.id, f"attempt {event.attempt} has not started", event.stage)
    if event.expect is not None:
        target = op.metadata if current is None else current.metadata
        for name, wanted in event.expect.items():
            found = target.get(name)
            if not _same_json(found, wanted):
                return Decision(Outcome.STALE, op, f"metadata {name!r} is {found!r}, the patch expected {wanted!r}")
    if current is None:
        merged = _as_object(merge_patch(op.metadata, event.patch))
        return Decision(Outcome.APPLIED, _replace(op, metadata=merged, updated_at=now, events=_events(op, event)))
    assert event.stage is not None
    stages = dict(op.stages)
    stages[event.stage] = _replace(current, metadata=_as_object(merge_patch(current.metadata, event.patch)))
    return Decision(Outcome.APPLIED, _replace(op, stages=stages, updated_at=now, events=_events(op, event)))


def _same_json(a: object, b: object) -> bool:
    """JSON equality: true is not 1, 1 is 1.0, objects and arrays compare member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _cancel(op: Operation, pipeline: Pipeline, event: Cancel, now: datetime) -> Decision:
    action = Action(at=now, kind=ActionKind.CANCEL.value, event=event.event_id, by=event.worker, reason=event.reason)
    cancelled = _replace(
        op, cancel=CancelInfo(at=now, reason=event.reason, by=event.worker), actions=_actions(op, action)
    )
    entry = Transition(
        at=now, from_=op.status.value, to=OpStatus.CANCELLED.value, worker=event.worker, event=event.event_id
    )
    return Decision(Outcome.APPLIED, _finalize(cancelled, pipeline, [entry], event, now))


def _reopen(op: Operation, pipeline: Pipeline, event: Reopen, now: datetime, action: Action | None = None) -> Decision:
    """``event`` applied to ``op``; ``action`` is what the actions log records (default: a reopen)."""
    if not event.stages:
        raise InvalidTransition(op.id, "reopen needs at least one stage")
    targets: set[str] = set()
    for name in event.stages:
        pipeline.stage(name)  # UnknownStage for a name the pipeline lacks
        targets.add(name)
        targets |= pipeline.dependents(name)
    for name, state in op.stages.items():  # cut off when the operation ended: they run again too
        if state.status is StageStatus.CANCELLED:
            targets.add(name)
            targets |= pipeline.dependents(name)
    stages = dict(op.stages)
    entries: list[Transition] = []
    for name in pipeline.stage_names:
        if name in targets and stages.get(name, _WAITING).status is not StageStatus.WAITING:
            old = stages[name]
            entries.append(
                Transition(
                    at=now,
                    stage=name,
                    from_=old.status.value,
                    to=StageStatus.WAITING.value,
                    worker=event.worker,
                    event=event.event_id,
                )
            )
            stages[name] = StageState(status=StageStatus.WAITING, metadata=old.metadata)
    if not entries and op.cancel is None:
        return Decision(Outcome.STALE, op, "every stage named is already waiting")
    if action is None:
        action = Action(
            at=now,
            kind=ActionKind.REOPEN.value,
            event=event.event_id,
            by=event.worker,
            reason=event.reason,
            stages=list(event.stages),
        )
    reopened = _replace(op, stages=stages, cancel=None, finished_at=None, actions=_actions(op, action))
    if derive_status(reopened, pipeline) is OpStatus.FAILED:
        still_failed = [
            s.name
            for s in pipeline.stages
            if not s.optional and stages.get(s.name, _WAITING).status is StageStatus.FAILED
        ]
        raise InvalidTransition(op.id, f"the operation would still be failed: reopen {', '.join(still_failed)} as well")
    return Decision(Outcome.APPLIED, _finalize(reopened, pipeline, entries, event, now))


def _apply_stage(
    op: Operation,
    pipeline: Pipeline,
    name: str,
    old: StageState,
    new: StageState,
    event: Event,
    now: datetime,
) -> Decision:
    stages = dict(op.stages)
    stages[name] = new
    entry = _stage_transition(name, old, new, event, now)
    return Decision(Outcome.APPLIED, _finalize(_replace(op, stages=stages), pipeline, [entry], event, now))


def _stage_transition(name: str, old: StageState, new: StageState, event: Event, now: datetime) -> Transition:
    """The history entry of stage ``name`` going from ``old`` to ``new`` because of ``event``."""
    return Transition(
        at=now,
        stage=name,
        from_=old.status.value,
        to=new.status.value,
        attempt=new.attempt or None,
        worker=new.worker,
        event=event.event_id,
    )


def _finalize(op: Operation, pipeline: Pipeline, entries: list[Transition], event: Event, now: datetime) -> Operation:
    """Recompute the derived status and append history and the event id, both bounded."""
    status = derive_status(op, pipeline)
    finished_at = op.finished_at
    if status is not op.status:
        if status is OpStatus.FAILED or status is OpStatus.CANCELLED:
            op = _cancel_active_stages(op, entries, event, now)
        if not isinstance(event, Cancel):
            entries.append(Transition(at=now, from_=op.status.value, to=status.value, event=event.event_id))
        finished_at = now if status.terminal else None
    history = op.history + entries
    if len(history) > HISTORY_LIMIT:
        history = history[-HISTORY_LIMIT:]
    return _replace(
        op, status=status, finished_at=finished_at, updated_at=now, history=history, events=_events(op, event)
    )


def _cancel_active_stages(op: Operation, entries: list[Transition], event: Event, now: datetime) -> Operation:
    """Close the stages still running or waiting for a retry when the operation ends unfinished.

    Their work can no longer change the outcome, and their late reports are stale, so left
    alone they would read as running for ever in the bucket, the dashboard and the archive.
    A running attempt is closed now; a retrying one keeps the time and error of its failure.
    """
    active = [(name, state) for name, state in op.stages.items() if state.status in _ACTIVE]
    if not active:
        return op
    stages = dict(op.stages)
    for name, state in active:
        finished_at = now if state.status is StageStatus.RUNNING else state.finished_at
        stages[name] = _replace(state, status=StageStatus.CANCELLED, finished_at=finished_at)
        entries.append(_stage_transition(name, state, stages[name], event, now))
    return _replace(op, stages=stages)


def already_applied(op: Operation, event_id: str) -> bool:
    """True when an event with ``event_id`` was applied to ``op``: it is in the event window, or it
    is the event id of one of its remembered actions (cancels, reopens and re-drives stay
    known for ``ACTION_LIMIT`` actions, however many other events came after them)."""
    return event_id in op.events or _acted(op, event_id)


def _acted(op: Operation, event_id: str) -> bool:
    return any(action.event == event_id for action in op.actions)


def _actions(op: Operation, action: Action) -> list[Action]:
    actions = [*op.actions, action]
    return actions[-ACTION_LIMIT:] if len(actions) > ACTION_LIMIT else actions


def retry(
    op: Operation,
    pipeline: Pipeline,
    stages: Sequence[str] | None,
    now: datetime,
    *,
    event_id: str,
    reason: str | None = None,
    by: str | None = None,
) -> Decision:
    """Run a finished operation again from ``stages``: a ``Reopen`` that only a finished operation takes.

    Without ``stages``, what ``kvstate.derive.retry_stages`` names (a failed operation's failed
    stage; a cancelled one resumes where the cancel stopped it). A duplicate when
    ``event_id`` was applied already (checked first, so a retried retry is not refused as
    running); NotRetryable for an operation still pending or running, or with nothing to
    run again; UnknownStage for a stage the pipeline lacks; InvalidTransition when the
    operation would stay failed.
    """
    if already_applied(op, event_id):
        return Decision(Outcome.DUPLICATE, op, f"event {event_id} was already applied")
    event = _retry_event(op, pipeline, stages, event_id=event_id, reason=reason, by=by)
    decision = _reopen(op, pipeline, event, now)
    if decision.outcome is not Outcome.APPLIED:
        raise NotRetryable(op.id, decision.reason or "nothing to run again")
    return decision


def redrive(
    snapshot: Operation,
    pipeline: Pipeline,
    stages: Sequence[str] | None,
    now: datetime,
    *,
    event_id: str,
    archived_source: int,
    redrives: int,
    reason: str | None = None,
    by: str | None = None,
) -> Operation:
    """The live operation that puts the archived ``snapshot`` back to work from ``stages``.

    The same reopen as ``retry`` (default stages included), on a value that starts a new
    life in the bucket: its event window holds only ``event_id`` (the archive does not keep
    the window), an ``Action`` of kind ``redrive`` links it to the archived revision and
    source, and ``redrives`` (one more than any archived snapshot of the id has) gives the
    archive a row of its own for it when it finishes again.
    """
    if not snapshot.status.terminal:
        raise NotRetryable(snapshot.id, f"an archived snapshot is finished, this one is {snapshot.status.value}")
    base = _replace(snapshot, events=[], revision=0)
    event = _retry_event(base, pipeline, stages, event_id=event_id, reason=reason, by=by)
    action = Action(
        at=now,
        kind=ActionKind.REDRIVE.value,
        event=event_id,
        by=by,
        reason=reason,
        stages=list(event.stages),
        archived_revision=snapshot.revision,
        archived_source=archived_source,
    )
    decision = _reopen(base, pipeline, event, now, action)
    if decision.outcome is not Outcome.APPLIED:
        raise NotRetryable(snapshot.id, decision.reason or "nothing to run again")
    return _replace(decision.operation, redrives=redrives)


def _retry_event(
    op: Operation,
    pipeline: Pipeline,
    stages: Sequence[str] | None,
    *,
    event_id: str,
    reason: str | None,
    by: str | None,
) -> Reopen:
    """The Reopen a retry of ``op`` applies; NotRetryable when ``op`` has not finished or nothing is named or failed."""
    if not op.status.terminal:
        raise NotRetryable(op.id, f"it is {op.status.value}: only a finished operation can be retried")
    if stages:
        for name in stages:
            pipeline.stage(name)  # UnknownStage before anything else
        named = tuple(dict.fromkeys(stages))
    else:
        named = retry_stages(op, pipeline)
        if not named and op.status is OpStatus.CANCELLED:
            named = tuple(ready_stages(_replace(op, cancel=None, status=OpStatus.RUNNING), pipeline))
        if not named:
            raise NotRetryable(op.id, f"it {op.status.value} with no failed stage: name the stages to run again")
    return Reopen(stages=named, event_id=event_id, worker=by, reason=reason)


def _events(op: Operation, event: Event) -> list[str]:
    events = [*op.events, event.event_id]
    return events[-EVENT_WINDOW:] if len(events) > EVENT_WINDOW else events


def _check_attempt(op: Operation, spec: StageSpec, attempt: int) -> None:
    if attempt < 1:
        raise InvalidTransition(op.id, f"attempt must be at least 1, got {attempt}", spec.name)
    if attempt > spec.max_attempts:
        raise InvalidTransition(op.id, f"attempt {attempt} exceeds max_attempts {spec.max_attempts}", spec.name)


def _unmet_dependencies(op: Operation, pipeline: Pipeline, spec: StageSpec) -> list[str]:
    unmet = []
    for dep in spec.after:
        status = op.stage(dep).status
        if status is StageStatus.SUCCEEDED:
            continue
        if status.terminal and pipeline.stage(dep).optional:
            continue
        unmet.append(f"{dep} ({status.value})")
    return unmet


def _check_dependencies(op: Operation, pipeline: Pipeline, spec: StageSpec) -> None:
    unmet = _unmet_dependencies(op, pipeline, spec)
    if unmet:
        raise InvalidTransition(op.id, f"dependencies not finished: {', '.join(unmet)}", spec.name)


def _merged(metadata: JSONObject, patch: JSONObject | None) -> JSONObject:
    """``metadata`` with the stage event's ``patch`` merged in (RFC 7386), when it carries one."""
    return metadata if patch is None else _as_object(merge_patch(metadata, patch))


def _as_object(value: object) -> JSONObject:
    if not isinstance(value, dict):  # merge_patch of an object patch always yields a dict
        raise InvalidMetadata("metadata must stay a JSON object")
    return value
