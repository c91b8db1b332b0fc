"""Backoff: how long to wait before the next try, the one rule every retry loop of the project uses.

    retry = Backoff(first=0.2, cap=5.0)
    for tries in itertools.count(1):
        try:
            return await connect()
        except ConnectionLostError:
            await asyncio.sleep(retry.delay(tries))

The wait doubles from ``first`` up to ``cap``, and then a random share of it is taken
(between ``1 - jitter`` and all of it), so processes that failed together do not all come
back in the same instant ("full jitter" with a floor, as in AWS's architecture blog on
backoff and jitter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped, jittered exponential backoff."""

    first: float
    """seconds before the second try (the wait after the first failure), before jitter"""
    cap: float
    """the longest wait, before jitter"""
    factor: float = 2.0
    jitter: float = 0.5
    """the share of the wait that is random: 0 waits exactly, 1 waits anything from 0 to the full wait"""

    def __post_init__(self) -> None:
        if not (0 < self.first <= self.cap) or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"not a usable backoff: {self!r}")

    def ceiling(self, tries: int) -> float:
        """The wait after ``tries`` failed tries (1, 2, ...), before jitter."""
        exponent = min(max(tries, 1) - 1, 64)  # past 64 doublings every wait is the cap anyway
        return min(self.cap, self.first * self.factor**exponent)

    def delay(self, tries: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``tries`` failed tries: the ceiling, less a random share of ``jitter``."""
        low = 1.0 - self.jitter
        share = rng.uniform(low, 1.0) if rng is not None else random.uniform(low, 1.0)
        return self.ceiling(tries) * share
