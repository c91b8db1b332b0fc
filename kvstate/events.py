"""Events: the changes services report about an operation.

Each event carries an ``event_id`` (idempotency key). Services that read from queues
should derive it from the message (for example the JetStream message id) so a
redelivered message is recognised as a duplicate; when left out, a fresh ULID is used.
"""

from __future__ import annotations

import msgspec

from kvstate._time import new_ulid
from kvstate.model import JSONObject

__all__ = [
    "Cancel",
    "Event",
    "FailStage",
    "Heartbeat",
    "MergeMetadata",
    "Reopen",
    "SkipStage",
    "StartStage",
    "SucceedStage",
]


class _Base(msgspec.Struct, kw_only=True, frozen=True, tag_field="type", omit_defaults=True):
    event_id: str = msgspec.field(default_factory=new_ulid)
    worker: str | None = None


class StartStage(_Base, tag="start", frozen=True):
    """An attempt of ``stage`` began. ``attempt`` defaults to the next one; ``metadata`` is
    merged into the stage's namespace; ``traceparent`` (W3C) records the attempt's trace."""

    stage: str
    attempt: int | None = None
    metadata: JSONObject | None = None
    traceparent: str | None = None


class Heartbeat(_Base, tag="heartbeat", frozen=True):
    """The running attempt of ``stage`` is alive."""

    stage: str
    attempt: int | None = None


class SucceedStage(_Base, tag="succeed", frozen=True):
    """``stage`` finished well; ``metadata`` is merged into the stage's namespace."""

    stage: str
    attempt: int | None = None
    metadata: JSONObject | None = None


class FailStage(_Base, tag="fail", frozen=True):
    """An attempt of ``stage`` failed; it is retried while ``retryable`` and attempts remain."""

    stage: str
    error: str
    retryable: bool = True
    code: str | None = None
    attempt: int | None = None
    metadata: JSONObject | None = None


class SkipStage(_Base, tag="skip", frozen=True):
    """An optional ``stage`` will not run for this operation; ``metadata`` is merged into its namespace."""

    stage: str
    reason: str | None = None
    metadata: JSONObject | None = None


class MergeMetadata(_Base, tag="merge", frozen=True):
    """Merge ``patch`` (RFC 7386) into the shared metadata, or into ``stage``'s namespace.

    ``attempt`` (with ``stage``): the attempt that writes; a patch from an older attempt is
    stale, so a late worker cannot overwrite what the current attempt wrote. ``expect``:
    members of the target that must hold exactly these values (``null``: absent) for the
    patch to apply, otherwise it is stale: a test-and-set for shared metadata that several
    services write.
    """

    patch: JSONObject
    stage: str | None = None
    attempt: int | None = None
    expect: JSONObject | None = None


class Cancel(_Base, tag="cancel", frozen=True):
    """Stop the operation: it becomes ``cancelled`` and takes no further stage events."""

    reason: str | None = None


class Reopen(_Base, tag="reopen", frozen=True):
    """Put finished ``stages`` (and every stage after them) back to waiting; ``worker`` is who asks, ``reason`` why."""

    stages: tuple[str, ...]
    reason: str | None = None


Event = StartStage | Heartbeat | SucceedStage | FailStage | SkipStage | MergeMetadata | Cancel | Reopen
"""Any event the state machine accepts."""
