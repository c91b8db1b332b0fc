"""What a service does with a kvstate error: retry it later, or refuse the message for good.

The rule every demo service follows, and the one to copy:

========================================== ======== ==================================================
error                                      verdict  why
========================================== ======== ==================================================
ConnectionLostError                        RETRY    NATS did not answer in time: the update may or may
                                                    not have landed; trying again with the same event
                                                    id applies it once (``duplicate`` if it had landed)
ConflictError                              RETRY    compare-and-set kept losing to other writers: a
                                                    later try usually wins
BucketError (and BucketNotFound)           RETRY    the client opened the bucket when the service
                                                    started, so a missing bucket now is a stream
                                                    electing its leader (no responders look like no
                                                    bucket) or an operator re-creating it: the work
                                                    waits, it is not thrown away
ValidationError and its subclasses         REJECT   the event itself is wrong: every try fails the same
InvalidTransition                          REJECT   the state machine forbids this change
OperationNotFound                          REJECT   archived or removed: nothing left to update
CorruptValue                               REJECT   the stored value cannot be read by anyone
OperationExists                            REJECT   the id holds other data
RevisionMismatch                           REJECT   a conditional update's revision is gone for good:
                                                    re-read and decide again, do not resend it
StaleUpdate                                STALE    not an error: the operation moved past this event
JobNotFound, JobFinished                   REJECT   bulk jobs: no such job, or it ended
JobBusy                                    RETRY    another runner holds the job's lease; it ends
                                                    or expires
PermissionDenied (and AuthenticationFailed) None    a broken setup, not a bad message: the NATS
                                                    permissions refuse this service what it needs
                                                    (docs/security.md); no try succeeds until an
                                                    operator changes them, and dropping the message
                                                    would lose the work, so it goes back with a
                                                    back-off like any error of the setup
anything else                              None     a bug or a broken setup: the caller decides
                                                    (the demo hands the message back and counts it)
========================================== ======== ==================================================

Only ``raise_for_stale()`` raises StaleUpdate; plain updates report staleness as
``Outcome.STALE``, which a service acknowledges like any finished message.

A RETRY keeps the event ids: the demo derives them from the queue message, which is the
same on redelivery, so an update that did land before the error is recognised as a
duplicate and nothing is applied twice.
"""

from __future__ import annotations

import enum
import random

from kvstate import (
    BucketError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    InvalidTransition,
    JobBusy,
    JobFinished,
    JobNotFound,
    OperationExists,
    OperationNotFound,
    RevisionMismatch,
    StaleUpdate,
    ValidationError,
)
from kvstate.backoff import Backoff

__all__ = ["PERMANENT", "TRANSIENT", "Verdict", "backoff", "verdict"]


class Verdict(enum.Enum):
    """What to do with the message whose handling raised."""

    RETRY = "retry"
    """transient: do not acknowledge; retry, or hand the message back with a delay (nak)"""
    REJECT = "reject"
    """permanent: retrying cannot help; terminate the message and log why, once"""
    STALE = "stale"
    """not an error: the state machine moved past this event; acknowledge it"""


TRANSIENT: tuple[type[Exception], ...] = (ConnectionLostError, ConflictError, BucketError, JobBusy)
"""Errors a later try can get past."""
PERMANENT: tuple[type[Exception], ...] = (
    ValidationError,
    InvalidTransition,
    OperationNotFound,
    CorruptValue,
    OperationExists,
    RevisionMismatch,
    JobNotFound,
    JobFinished,
)
"""Errors every later try would meet again."""


def verdict(exc: BaseException) -> Verdict | None:
    """The verdict on ``exc``; None for an error this table does not know."""
    if isinstance(exc, StaleUpdate):
        return Verdict.STALE
    if isinstance(exc, TRANSIENT):
        return Verdict.RETRY
    if isinstance(exc, PERMANENT):
        return Verdict.REJECT
    return None


BACKOFF_BASE = 0.5
"""Seconds before the first retry."""
BACKOFF_CAP = 15.0
"""Longest wait between two tries: a leader election takes 4-9 s, a NATS restart a few."""
_BACKOFF = Backoff(first=BACKOFF_BASE, cap=BACKOFF_CAP)


def backoff(tries: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after ``tries`` failed tries (1, 2, ...): doubling from
    ``BACKOFF_BASE`` up to ``BACKOFF_CAP``, then a random share of it between half and all,
    so services that failed together do not all come back in the same instant."""
    return _BACKOFF.delay(tries, rng)
