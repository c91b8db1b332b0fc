"""Settings, built once per process at the edge from an environment mapping.

Nothing else in kvstate reads ``os.environ``. ``Settings.from_env(os.environ)`` parses
the variables below; every one has a documented default (README, docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id

__all__ = [
    "Settings",
    "env_value",
    "env_variables",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "tcp_port",
]

T = TypeVar("T")


def env_value(environ: Mapping[str, str], name: str, default: T, convert: Callable[[str], T]) -> T:
    """``convert(environ[name])``, or ``default`` when unset or blank.

    A value ``convert`` rejects (ValueError) becomes a ConfigurationError naming the
    variable. Every settings class of the project parses its variables with this.
    """
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return convert(raw.strip())
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not valid: {exc}") from exc


def positive_int(raw: str) -> int:
    """An integer of at least 1."""
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def positive_float(raw: str) -> float:
    """A number above 0."""
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def non_negative_float(raw: str) -> float:
    """A number of at least 0."""
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be zero or a positive number")
    return value


def tcp_port(raw: str) -> int:
    """A TCP port, 0-65535 (0 where the caller allows "off" or "any")."""
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _replicas(raw: str) -> int:
    value = int(raw)
    if value not in (1, 3, 5):
        raise ValueError("replicas must be 1, 3 or 5")
    return value


def _bucket(raw: str) -> str:
    try:
        return validate_id(raw, "bucket name")
    except Exception as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class Settings:
    """Connection and bucket settings of the kvstate client.

    ======================== ============================== ==========================================
    variable                 default                        meaning
    ======================== ============================== ==========================================
    NATS_URL                 nats://127.0.0.1:4222          NATS server(s), comma-separated
    KVSTATE_BUCKET           operations                     the KV bucket holding operations
    KVSTATE_REPLICAS         1                              bucket replicas when it is created (1/3/5)
    KVSTATE_HISTORY          1                              revisions kept per key (1-64)
    KVSTATE_MAX_VALUE_SIZE   262144                         largest operation value, in bytes
    KVSTATE_MAX_RETRIES      25                             compare-and-set attempts per update
    KVSTATE_TIMEOUT          5.0                            seconds to wait for one NATS request
    KVSTATE_DEADLINE         30.0                           seconds one call keeps retrying transient
                                                            failures (leader elections, timeouts)
    ======================== ============================== ==========================================
    """

    nats_url: str = "nats://127.0.0.1:4222"
    bucket: str = "operations"
    replicas: int = 1
    history: int = 1
    max_value_size: int = 262144
    max_retries: int = 25
    timeout: float = 5.0
    deadline: float = 30.0

    ENV: ClassVar[dict[str, str]] = {
        "nats_url": "NATS_URL",
        "bucket": "KVSTATE_BUCKET",
        "replicas": "KVSTATE_REPLICAS",
        "history": "KVSTATE_HISTORY",
        "max_value_size": "KVSTATE_MAX_VALUE_SIZE",
        "max_retries": "KVSTATE_MAX_RETRIES",
        "timeout": "KVSTATE_TIMEOUT",
        "deadline": "KVSTATE_DEADLINE",
    }

    def __post_init__(self) -> None:
        if not 1 <= self.history <= 64:
            raise ConfigurationError(f"KVSTATE_HISTORY={self.history}: must be between 1 and 64")
        if self.max_value_size < 1024:
            raise ConfigurationError(f"KVSTATE_MAX_VALUE_SIZE={self.max_value_size}: must be at least 1024")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return cls(
            nats_url=env_value(environ, "NATS_URL", cls.nats_url, str),
            bucket=env_value(environ, "KVSTATE_BUCKET", cls.bucket, _bucket),
            replicas=env_value(environ, "KVSTATE_REPLICAS", cls.replicas, _replicas),
            history=env_value(environ, "KVSTATE_HISTORY", cls.history, positive_int),
            max_value_size=env_value(environ, "KVSTATE_MAX_VALUE_SIZE", cls.max_value_size, positive_int),
            max_retries=env_value(environ, "KVSTATE_MAX_RETRIES", cls.max_retries, positive_int),
            timeout=env_value(environ, "KVSTATE_TIMEOUT", cls.timeout, positive_float),
            deadline=env_value(environ, "KVSTATE_DEADLINE", cls.deadline, positive_float),
        )

    @property
    def servers(self) -> list[str]:
        """NATS_URL split into the server list nats-py takes."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


def env_variables(settings_type: type) -> set[str]:
    """The environment variable names a settings class reads (for docs and their tests)."""
    env: dict[str, str] = getattr(settings_type, "ENV", {})
    names = {f.name for f in fields(settings_type)}
    missing = set(env) - names
    if missing:
        raise ConfigurationError(f"{settings_type.__name__}.ENV names unknown fields: {sorted(missing)}")
    return set(env.values())
