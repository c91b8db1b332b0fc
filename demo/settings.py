"""Settings of the demo pipeline (``kvstate demo``), built once at the process edge.

Like ``kvstate.settings.Settings``: ``DemoSettings.from_env(os.environ)`` parses the
variables its fields declare (``kvstate.settings.setting``), and the kvstate client's own
variables (``NATS_URL``, ``KVSTATE_BUCKET``, ...) fill ``kv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstate import ConfigurationError, Settings
from kvstate.settings import from_environ, positive_int, setting, setting_specs

__all__ = ["DemoSettings"]


_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _non_negative(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def _positive(raw: str) -> float:
    value = _non_negative(raw)
    if value == 0:
        raise ValueError("must be greater than 0")
    return value


def _probability(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise ValueError("must be a probability between 0 and 1")
    return value


def _seed(raw: str) -> int | None:
    return int(raw)


def _stream(raw: str) -> str:
    if _NAME_RE.fullmatch(raw) is None:
        raise ValueError("a stream name is 1-64 characters of A-Z a-z 0-9 _ -")
    return raw


def _subject(raw: str) -> str:
    if _SUBJECT_RE.fullmatch(raw) is None:
        raise ValueError("a subject prefix is dot-separated tokens of A-Z a-z 0-9 _ - (no wildcards)")
    return raw


@dataclass(frozen=True)
class DemoSettings:
    """How hard the demo drives the pipeline, and how badly its services behave.

    Each field is declared once with ``kvstate.settings.setting`` (variable, default, parser,
    meaning); docs/operations.md#configuration holds the table rendered from them. The kvstate
    client's own variables (``NATS_URL``, ``KVSTATE_BUCKET``, ...) fill ``kv``.
    """

    kv: Settings = field(default_factory=Settings)
    rate: float = setting("DEMO_RATE", 5.0, _non_negative, "new orders per second (0: run the workers only)")
    duration: float = setting("DEMO_DURATION", 0.0, _non_negative, "seconds to feed new orders (0: until stopped)")
    latency_scale: float = setting("DEMO_LATENCY_SCALE", 1.0, _positive, "multiplies every simulated service latency")
    failure_rate: float = setting(
        "DEMO_FAILURE_RATE", 1.0, _non_negative, "multiplies every simulated failure probability"
    )
    poison_rate: float = setting("DEMO_POISON_RATE", 0.02, _probability, "share of orders that fail for good")
    stuck_rate: float = setting(
        "DEMO_STUCK_RATE", 0.002, _probability, "share of attempts whose worker stops heartbeating"
    )
    chaos_rate: float = setting(
        "DEMO_CHAOS_RATE",
        0.05,
        _probability,
        "share of messages redelivered or copied late (exercises duplicate and stale protection)",
    )
    concurrency: int = setting("DEMO_CONCURRENCY", 32, positive_int, "messages each service works on at once")
    max_in_flight: int = setting(
        "DEMO_MAX_IN_FLIGHT", 500, positive_int, "orders in the pipeline at most (the feeder waits)"
    )
    drain_timeout: float = setting(
        "DEMO_DRAIN_TIMEOUT", 60.0, _non_negative, "seconds to let orders finish after the feed stops"
    )
    seed: int | None = setting("DEMO_SEED", None, _seed, "random seed (unset: random)", shown_default="unset")
    stream: str = setting("DEMO_STREAM", "DEMO_WORK", _stream, "JetStream work-queue stream of the demo")
    subject_prefix: str = setting(
        "DEMO_SUBJECT_PREFIX", "demo.work", _subject, "subject prefix of the demo's work queues"
    )

    def __post_init__(self) -> None:
        checks = {
            "rate": self.rate >= 0,
            "duration": self.duration >= 0,
            "latency_scale": self.latency_scale > 0,
            "failure_rate": self.failure_rate >= 0,
            "poison_rate": 0 <= self.poison_rate <= 1,
            "stuck_rate": 0 <= self.stuck_rate <= 1,
            "chaos_rate": 0 <= self.chaos_rate <= 1,
            "concurrency": self.concurrency >= 1,
            "max_in_flight": self.max_in_flight >= 1,
            "drain_timeout": self.drain_timeout >= 0,
        }
        specs = setting_specs(DemoSettings)
        for name, ok in checks.items():
            if not ok:
                raise ConfigurationError(f"{specs[name].env}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DemoSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return from_environ(cls, environ, kv=Settings.from_env(environ))
