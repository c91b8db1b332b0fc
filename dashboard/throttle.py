"""Per-client limits, in memory and bounded: the request rate, failed logins, open streams.

Pure bookkeeping on an injectable clock (no I/O, no asyncio: one event loop calls it, so
no locks), property-tested in tests/dashboard/test_dashboard_throttle.py. Each table
keeps at most ``max_clients`` entries: the least recently seen client is forgotten first,
so a flood of distinct addresses costs a bounded amount of memory (and, at worst, gives
the forgotten clients a fresh allowance). ``client_key`` folds an IPv6 address to its /64,
the block one host usually has, so one host cannot dodge the limits by rotating addresses
inside it.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "ConnectionCounter",
    "LoginThrottle",
    "RateLimiter",
    "client_key",
    "retry_after_header",
]

DEFAULT_MAX_CLIENTS = 10_000
"""Entries a table keeps (about 100 bytes each)."""

Clock = Callable[[], float]
V = TypeVar("V")


def client_key(address: str) -> str:
    """The key a client is limited by: its IPv4 address, the /64 of its IPv6 address, else the text itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Bounded(Generic[V]):
    """An LRU table of at most ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._entries: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, bursts up to a minute's worth."""

    def __init__(
        self, per_minute: int, *, max_clients: int = DEFAULT_MAX_CLIENTS, clock: Clock = time.monotonic
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.refill = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: _Bounded[_Bucket] = _Bounded(max_clients)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Spend one request of ``key``: 0.0 when allowed, else the seconds until one is (nothing spent)."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.capacity, now)
        else:
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.refill)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            self._buckets.put(key, bucket)
            return 0.0
        self._buckets.put(key, bucket)
        return (1.0 - bucket.tokens) / self.refill


@dataclass(slots=True)
class _Failures:
    count: int
    since: float  # the first failure of the current window
    locked_until: float = 0.0


class LoginThrottle:
    """Failed logins per client: after ``max_failures`` within ``window`` seconds, locked out until it ends."""

    def __init__(
        self, max_failures: int, window: float, *, max_clients: int = DEFAULT_MAX_CLIENTS, clock: Clock = time.monotonic
    ) -> None:
        if max_failures < 1 or not window > 0:
            raise ValueError("max_failures must be at least 1 and window above 0")
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: _Bounded[_Failures] = _Bounded(max_clients)

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, key: str) -> float:
        """Seconds ``key`` must wait before it may try again (0.0: it may now)."""
        entry = self._failures.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.locked_until - self.clock())

    def failed(self, key: str) -> float:
        """Count a failed login of ``key``; the lockout it now has, in seconds (0.0: none yet)."""
        now = self.clock()
        entry = self._failures.get(key)
        if entry is None or now - entry.since >= self.window:
            entry = _Failures(0, now)
        entry.count += 1
        if entry.count >= self.max_failures:
            entry.locked_until = max(entry.locked_until, entry.since + self.window)
        self._failures.put(key, entry)
        return max(0.0, entry.locked_until - now)

    def succeeded(self, key: str) -> None:
        """A good login of ``key``: its failures are forgotten."""
        self._failures.pop(key)


class ConnectionCounter:
    """Open long-lived requests (event streams, long polls) per client, at most ``per_client`` each.

    Only clients holding at least one are kept, so the table is bounded by the open
    connections themselves.
    """

    def __init__(self, per_client: int) -> None:
        if per_client < 1:
            raise ValueError("per_client must be at least 1")
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, key: str) -> int:
        """How many ``key`` holds now."""
        return self._open.get(key, 0)

    def acquire(self, key: str) -> bool:
        """Take one for ``key``; False (nothing taken) when it already holds ``per_client``."""
        held = self._open.get(key, 0)
        if held >= self.per_client:
            return False
        self._open[key] = held + 1
        return True

    def release(self, key: str) -> None:
        """Give one back."""
        held = self._open.get(key, 0) - 1
        if held > 0:
            self._open[key] = held
        else:
            self._open.pop(key, None)


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
