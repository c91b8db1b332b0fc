"""Archiver settings, built once at the process edge from an environment mapping.

Nothing in ``archiver`` reads ``os.environ``: the CLI passes it to
``ArchiverSettings.from_env``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id
from kvstate.settings import Settings, env_value, non_negative_float, positive_float, positive_int, tcp_port

__all__ = ["ArchiverSettings"]


def _database_url(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    return raw


def _consumer(raw: str) -> str:
    try:
        return validate_id(raw, "consumer name")
    except Exception as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class ArchiverSettings:
    """Settings of one archiver process (the kvstate ones are in ``kv``).

    ========================= ============================================ ==========================================
    variable                  default                                      meaning
    ========================= ============================================ ==========================================
    DATABASE_URL              postgresql://postgres@127.0.0.1:5432/kvstate the archive database
    ARCHIVER_BATCH_SIZE       500                                          most rows per PostgreSQL transaction
    ARCHIVER_BATCH_TIMEOUT    0.2                                          seconds a batch waits to fill up
    ARCHIVER_GRACE_PERIOD     120                                          seconds a finished operation stays in
                                                                           the bucket after it finished
    ARCHIVER_CONSUMER         archiver                                     durable JetStream consumer (shared by
                                                                           every archiver instance)
    ARCHIVER_MARKER_TTL       300                                          seconds a removal marker stays
    ARCHIVER_ACK_WAIT         30                                           seconds before an unacknowledged message
                                                                           is delivered again
    ARCHIVER_SWEEP_INTERVAL   60                                           seconds between sweeps of the bucket for
                                                                           archived operations left behind
    ARCHIVER_METRICS_PORT     9101                                         /metrics and /healthz port (0 = off)
    ARCHIVER_METRICS_HOST     127.0.0.1                                    address the endpoint listens on
    ARCHIVER_STALL_AFTER      60                                           seconds with messages pending and no
                                                                           commit or ack before /healthz says not
                                                                           ok (the consumer's own stall guard
                                                                           restarts the pull sooner)
    ========================= ============================================ ==========================================

    Plus every variable of ``kvstate.Settings`` (NATS_URL, KVSTATE_BUCKET, ...).
    """

    kv: Settings = field(default_factory=Settings)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/kvstate"
    batch_size: int = 500
    batch_timeout: float = 0.2
    grace_period: float = 120.0
    consumer: str = "archiver"
    marker_ttl: float = 300.0
    ack_wait: float = 30.0
    sweep_interval: float = 60.0
    metrics_port: int = 9101
    metrics_host: str = "127.0.0.1"
    stall_after: float = 60.0

    ENV: ClassVar[dict[str, str]] = {
        "database_url": "DATABASE_URL",
        "batch_size": "ARCHIVER_BATCH_SIZE",
        "batch_timeout": "ARCHIVER_BATCH_TIMEOUT",
        "grace_period": "ARCHIVER_GRACE_PERIOD",
        "consumer": "ARCHIVER_CONSUMER",
        "marker_ttl": "ARCHIVER_MARKER_TTL",
        "ack_wait": "ARCHIVER_ACK_WAIT",
        "sweep_interval": "ARCHIVER_SWEEP_INTERVAL",
        "metrics_port": "ARCHIVER_METRICS_PORT",
        "metrics_host": "ARCHIVER_METRICS_HOST",
        "stall_after": "ARCHIVER_STALL_AFTER",
    }

    def __post_init__(self) -> None:
        if self.batch_size > 10_000:
            raise ConfigurationError(f"ARCHIVER_BATCH_SIZE={self.batch_size}: at most 10000")
        if self.marker_ttl < 1:
            raise ConfigurationError(f"ARCHIVER_MARKER_TTL={self.marker_ttl:g}: at least 1 second")
        if self.ack_wait < 1:
            raise ConfigurationError(f"ARCHIVER_ACK_WAIT={self.ack_wait:g}: at least 1 second")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ArchiverSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return cls(
            kv=Settings.from_env(environ),
            database_url=env_value(environ, "DATABASE_URL", cls.database_url, _database_url),
            batch_size=env_value(environ, "ARCHIVER_BATCH_SIZE", cls.batch_size, positive_int),
            batch_timeout=env_value(environ, "ARCHIVER_BATCH_TIMEOUT", cls.batch_timeout, positive_float),
            grace_period=env_value(environ, "ARCHIVER_GRACE_PERIOD", cls.grace_period, non_negative_float),
            consumer=env_value(environ, "ARCHIVER_CONSUMER", cls.consumer, _consumer),
            marker_ttl=env_value(environ, "ARCHIVER_MARKER_TTL", cls.marker_ttl, positive_float),
            ack_wait=env_value(environ, "ARCHIVER_ACK_WAIT", cls.ack_wait, positive_float),
            sweep_interval=env_value(environ, "ARCHIVER_SWEEP_INTERVAL", cls.sweep_interval, positive_float),
            metrics_port=env_value(environ, "ARCHIVER_METRICS_PORT", cls.metrics_port, tcp_port),
            metrics_host=env_value(environ, "ARCHIVER_METRICS_HOST", cls.metrics_host, str),
            stall_after=env_value(environ, "ARCHIVER_STALL_AFTER", cls.stall_after, positive_float),
        )
