"""The operation model: msgspec Structs stored as JSON in the bucket.

Schema evolution rules (docs/state-format.md): new fields get defaults, a field never
changes type, unknown fields are ignored, so an older reader accepts a newer value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import msgspec

from kvstate.errors import StaleUpdate

__all__ = [
    "ACTION_LIMIT",
    "EVENT_WINDOW",
    "HISTORY_LIMIT",
    "SCHEMA_VERSION",
    "Action",
    "ActionKind",
    "BucketInfo",
    "CancelInfo",
    "JSONObject",
    "OpStatus",
    "Operation",
    "Outcome",
    "StageError",
    "StageState",
    "StageStatus",
    "Transition",
    "UpdateResult",
]

SCHEMA_VERSION = 1
"""Written into every operation value as ``"schema"``."""

HISTORY_LIMIT = 50
"""Transitions kept per operation (the oldest are dropped first)."""

EVENT_WINDOW = 32
"""Applied event ids remembered per operation for duplicate detection."""

ACTION_LIMIT = 20
"""Actions (cancels, reopens, re-drives) kept per operation (the oldest are dropped first)."""

JSONObject = dict[str, object]
"""A JSON object: what metadata is made of."""


class OpStatus(StrEnum):
    """Status of a whole operation, derived from its stages (docs/state-model.md)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed and cancelled."""
        return self in _TERMINAL_OP


_TERMINAL_OP = frozenset({OpStatus.SUCCEEDED, OpStatus.FAILED, OpStatus.CANCELLED})


class StageStatus(StrEnum):
    """Status of one stage of an operation."""

    WAITING = "waiting"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    """The operation ended (failed or cancelled) while this stage was running or waiting for a retry."""

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed (no attempt left), skipped and cancelled."""
        return self in _TERMINAL_STAGE


_TERMINAL_STAGE = frozenset({StageStatus.SUCCEEDED, StageStatus.FAILED, StageStatus.SKIPPED, StageStatus.CANCELLED})


class StageError(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Why an attempt of a stage failed."""

    message: str
    retryable: bool = False
    code: str | None = None


class StageState(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """The state of one stage within one operation."""

    status: StageStatus
    attempt: int = 0
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    error: StageError | None = None
    metadata: JSONObject = {}
    trace_id: str | None = None
    """the W3C trace id the latest attempt ran in, when its start carried one"""

    @property
    def duration(self) -> float | None:
        """Seconds from the start to the end of the latest attempt, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Transition(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One entry of an operation's transition history.

    ``stage`` is None for operation-level transitions (created, cancelled, reopened and
    every change of the derived operation status).
    """

    at: datetime
    to: str
    from_: str | None = msgspec.field(default=None, name="from")
    stage: str | None = None
    attempt: int | None = None
    worker: str | None = None
    event: str | None = None


class CancelInfo(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Who cancelled an operation, when and why."""

    at: datetime
    reason: str | None = None
    by: str | None = None


class ActionKind(StrEnum):
    """What an ``Action`` did to the operation."""

    CANCEL = "cancel"
    REOPEN = "reopen"
    """stages put back to waiting: a retry (``Client.retry``) or a plain ``reopen``"""
    REDRIVE = "redrive"
    """put back into the bucket from its archived snapshot (``kvstate archive redrive``)"""


class Action(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One cancel, reopen (a retry) or re-drive of the operation: when, who, why, under which event id.

    Kept apart from the transition history, which a busy operation turns over within a few
    dozen changes, so that who acted on it and why stays readable, and so that the event id
    of each such action stays known to duplicate detection long after it left the event
    window (a bulk job resumed after a crash must not cancel or retry an operation twice).
    ``kind`` is a string, not the enum, so an older reader accepts a kind added later.
    """

    at: datetime
    kind: str
    """an ``ActionKind`` value: cancel, reopen or redrive"""
    event: str
    """the event id the action was applied under"""
    by: str | None = None
    reason: str | None = None
    stages: list[str] = []
    """the stages a reopen or a re-drive named (the stages after them went back to waiting too)"""
    archived_revision: int | None = None
    """re-drive: the revision of the archived snapshot the operation was put back from"""
    archived_source: int | None = None
    """re-drive: the archive source (bucket incarnation) that snapshot was archived from"""


class Operation(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One run of one input through a pipeline.

    ``origin`` is the event id of the creation (makes a retried create idempotent).
    ``revision`` is the KV revision the value was read at; it is not stored in the value.
    """

    schema: int
    id: str
    pipeline: str
    status: OpStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    stages: dict[str, StageState] = {}
    metadata: JSONObject = {}
    cancel: CancelInfo | None = None
    origin: str | None = None
    history: list[Transition] = []
    events: list[str] = []
    trace_id: str | None = None
    """the W3C trace id the operation was created in, when its creation carried one"""
    actions: list[Action] = []
    """its last ``ACTION_LIMIT`` cancels, reopens and re-drives, oldest first"""
    redrives: int = 0
    """how many times it was put back into the bucket from the archive; the archive keeps a row per re-drive"""
    revision: int = 0

    @property
    def done(self) -> bool:
        """True once the operation reached a terminal status."""
        return self.status.terminal

    def stage(self, name: str) -> StageState:
        """The state of stage ``name`` (a waiting stage when it never moved)."""
        return self.stages.get(name, _WAITING)

    @property
    def active_stages(self) -> list[str]:
        """Stages running or waiting for a retry right now, in pipeline order."""
        return [name for name, st in self.stages.items() if st.status in _ACTIVE]

    @property
    def duration(self) -> float | None:
        """Seconds from creation to the terminal status, once finished."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()


_WAITING = StageState(status=StageStatus.WAITING)
_ACTIVE = frozenset({StageStatus.RUNNING, StageStatus.RETRYING})


class Outcome(StrEnum):
    """What an update did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The result of one update: what happened, the state after it and its revision."""

    outcome: Outcome
    operation: Operation
    reason: str | None = None

    @property
    def revision(self) -> int:
        """The KV revision of ``operation``."""
        return self.operation.revision

    @property
    def applied(self) -> bool:
        """True when the update changed the operation."""
        return self.outcome is Outcome.APPLIED

    def raise_for_stale(self) -> UpdateResult:
        """Raise StaleUpdate when the update was stale (like httpx's raise_for_status); else return self."""
        if self.outcome is Outcome.STALE:
            raise StaleUpdate(self.operation.id, self.reason or "stale")
        return self


@dataclass(frozen=True, slots=True)
class BucketInfo:
    """The bucket's configuration and size, as its stream reports them (``Client.bucket_info``)."""

    bucket: str
    stream: str
    storage: str
    replicas: int
    history: int
    max_value_size: int
    direct_get: bool
    msg_ttl: bool
    values: int
    """Messages in the stream: current values, older revisions kept by history, delete markers."""
    bytes: int
    last_revision: int
    """The stream's last sequence: the revision the next write gets is above it."""
    consumers: int
