"""Counters of one demo run, and the live progress line built from them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvstate import Outcome

__all__ = ["DemoStats"]


@dataclass
class DemoStats:
    """What the demo did so far. Mutated from one event loop only, so plain ints suffice."""

    created: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    in_flight: int = 0
    applied: int = 0
    duplicate: int = 0
    stale: int = 0
    retries: int = 0
    stuck: int = 0
    replays: int = 0
    skipped: int = 0
    transient: int = 0
    """kvstate errors a later try can get past (``demo.retry``), each retried in place or
    handed back to the queue with a delay: never acknowledged"""
    rejected: int = 0
    """messages refused for good (a permanent kvstate error): terminated and logged once"""
    errors: int = 0
    """unexpected exceptions (a bug): the message is handed back to the queue"""
    started_at: float = field(default_factory=time.monotonic)
    _window: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def record(self, outcome: Outcome) -> None:
        """Count the outcome of one kvstate update."""
        if outcome is Outcome.APPLIED:
            self.applied += 1
        elif outcome is Outcome.DUPLICATE:
            self.duplicate += 1
        else:
            self.stale += 1

    @property
    def finished(self) -> int:
        """Operations of this run that reached a terminal status."""
        return self.succeeded + self.failed + self.cancelled

    def rate(self, now: float | None = None, window: float = 5.0) -> float:
        """Operations created per second over the last ``window`` seconds."""
        now = time.monotonic() if now is None else now
        if not self._window:
            self._window.append((self.started_at, 0))
        self._window.append((now, self.created))
        # keep the newest sample that is at least ``window`` old as the reference point
        while len(self._window) > 2 and now - self._window[1][0] >= window:
            self._window.pop(0)
        first_at, first_count = self._window[0]
        if now - first_at <= 0:
            return 0.0
        return (self.created - first_count) / (now - first_at)

    def line(self, now: float | None = None) -> str:
        """The progress line: elapsed, rate, in flight, done, failed, the protection counters,
        and the kvstate errors retried (``transient``) or refused for good (``rejected``)."""
        now = time.monotonic() if now is None else now
        return (
            f"demo {now - self.started_at:6.0f}s  rate {self.rate(now):5.1f}/s  in flight {self.in_flight:4d}  "
            f"done {self.succeeded:6d}  failed {self.failed + self.cancelled:5d}  |  retries {self.retries}  "
            f"stuck {self.stuck}  duplicate {self.duplicate}  stale {self.stale}  "
            f"transient {self.transient}  rejected {self.rejected}"
        )

    def as_dict(self) -> dict[str, int]:
        """The counters, for the final report and for tests."""
        names = (
            "created",
            "succeeded",
            "failed",
            "cancelled",
            "in_flight",
            "applied",
            "duplicate",
            "stale",
            "retries",
            "stuck",
            "replays",
            "skipped",
            "transient",
            "rejected",
            "errors",
        )
        return {name: getattr(self, name) for name in names}
