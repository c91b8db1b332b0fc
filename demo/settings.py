"""Settings of the demo pipeline (``kvstate demo``), built once at the process edge.

Like ``kvstate.settings.Settings``: ``DemoSettings.from_env(os.environ)`` parses the
variables below, ``ENV`` maps each field to its variable (``env_variables`` reads it),
and the kvstate client's own variables (``NATS_URL``, ``KVSTATE_BUCKET``, ...) fill ``kv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from kvstate import ConfigurationError, Settings
from kvstate.settings import env_value, positive_int

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

    ========================= ============ ==================================================
    variable                  default      meaning
    ========================= ============ ==================================================
    DEMO_RATE                 5            new operations per second (0: workers only)
    DEMO_DURATION             0            seconds to generate for; 0 runs until stopped
    DEMO_LATENCY_SCALE        1.0          multiplies every simulated stage latency
    DEMO_FAILURE_RATE         1.0          multiplies every transient failure probability
    DEMO_POISON_RATE          0.02         share of inputs that fail for good
    DEMO_STUCK_RATE           0.002        share of attempts whose worker hangs silently
    DEMO_CHAOS_RATE           0.05         share of attempts replayed late (redelivery)
    DEMO_CONCURRENCY          32           messages one service works on at once
    DEMO_MAX_IN_FLIGHT        500          the generator waits above this many live ops
    DEMO_DRAIN_TIMEOUT        60           seconds to wait for live ops after generating
    DEMO_SEED                 (random)     seed of the random choices, for repeatable runs
    DEMO_STREAM               DEMO_WORK    the JetStream work-queue stream
    DEMO_SUBJECT_PREFIX       demo.work    work subjects are PREFIX.<stage>
    ========================= ============ ==================================================
    """

    kv: Settings = field(default_factory=Settings)
    rate: float = 5.0
    duration: float = 0.0
    latency_scale: float = 1.0
    failure_rate: float = 1.0
    poison_rate: float = 0.02
    stuck_rate: float = 0.002
    chaos_rate: float = 0.05
    concurrency: int = 32
    max_in_flight: int = 500
    drain_timeout: float = 60.0
    seed: int | None = None
    stream: str = "DEMO_WORK"
    subject_prefix: str = "demo.work"

    ENV: ClassVar[dict[str, str]] = {
        "rate": "DEMO_RATE",
        "duration": "DEMO_DURATION",
        "latency_scale": "DEMO_LATENCY_SCALE",
        "failure_rate": "DEMO_FAILURE_RATE",
        "poison_rate": "DEMO_POISON_RATE",
        "stuck_rate": "DEMO_STUCK_RATE",
        "chaos_rate": "DEMO_CHAOS_RATE",
        "concurrency": "DEMO_CONCURRENCY",
        "max_in_flight": "DEMO_MAX_IN_FLIGHT",
        "drain_timeout": "DEMO_DRAIN_TIMEOUT",
        "seed": "DEMO_SEED",
        "stream": "DEMO_STREAM",
        "subject_prefix": "DEMO_SUBJECT_PREFIX",
    }

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
        for name, ok in checks.items():
            if not ok:
                raise ConfigurationError(f"{self.ENV[name]}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DemoSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        d = cls.ENV
        return cls(
            kv=Settings.from_env(environ),
            rate=env_value(environ, d["rate"], cls.rate, _non_negative),
            duration=env_value(environ, d["duration"], cls.duration, _non_negative),
            latency_scale=env_value(environ, d["latency_scale"], cls.latency_scale, _positive),
            failure_rate=env_value(environ, d["failure_rate"], cls.failure_rate, _non_negative),
            poison_rate=env_value(environ, d["poison_rate"], cls.poison_rate, _probability),
            stuck_rate=env_value(environ, d["stuck_rate"], cls.stuck_rate, _probability),
            chaos_rate=env_value(environ, d["chaos_rate"], cls.chaos_rate, _probability),
            concurrency=env_value(environ, d["concurrency"], cls.concurrency, positive_int),
            max_in_flight=env_value(environ, d["max_in_flight"], cls.max_in_flight, positive_int),
            drain_timeout=env_value(environ, d["drain_timeout"], cls.drain_timeout, _non_negative),
            seed=env_value(environ, d["seed"], cls.seed, _seed),
            stream=env_value(environ, d["stream"], cls.stream, _stream),
            subject_prefix=env_value(environ, d["subject_prefix"], cls.subject_prefix, _subject),
        )
