"""Archiver settings, built once at the process edge from an environment mapping.

Nothing in ``archiver`` reads ``os.environ``: the CLI passes it to
``ArchiverSettings.from_env``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id
from kvstate.settings import (
    Settings,
    from_environ,
    non_negative_float,
    positive_float,
    positive_int,
    redacted_repr,
    setting,
    tcp_port,
)

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

    Each field is declared once with ``kvstate.settings.setting`` (variable, default, parser,
    meaning); docs/operations.md#configuration holds the table rendered from them. Plus every
    variable of ``kvstate.Settings`` (NATS_URL, KVSTATE_BUCKET, ...) in ``kv``.
    """

    kv: Settings = field(default_factory=Settings)
    database_url: str = setting(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/kvstate",
        _database_url,
        "PostgreSQL of the archive (archiver: must reach a PostgreSQL, it waits until it can; dashboard: "
        "optional, enables archive pages; `kvstate up`: use this server instead of starting one)",
    )
    batch_size: int = setting("ARCHIVER_BATCH_SIZE", 500, positive_int, "rows per archive transaction, at most")
    batch_timeout: float = setting("ARCHIVER_BATCH_TIMEOUT", 0.2, positive_float, "seconds a batch waits to fill")
    grace_period: float = setting(
        "ARCHIVER_GRACE_PERIOD",
        120.0,
        non_negative_float,
        "seconds a finished operation stays in the bucket after archiving",
    )
    consumer: str = setting(
        "ARCHIVER_CONSUMER",
        "archiver",
        _consumer,
        "durable consumer name (archivers with the same name share the work)",
    )
    marker_ttl: float = setting("ARCHIVER_MARKER_TTL", 300.0, positive_float, "seconds before a removal marker expires")
    ack_wait: float = setting(
        "ARCHIVER_ACK_WAIT", 30.0, positive_float, "seconds before an unacknowledged message is redelivered"
    )
    sweep_interval: float = setting(
        "ARCHIVER_SWEEP_INTERVAL",
        60.0,
        positive_float,
        "seconds between sweeps for finished operations still in the bucket",
    )
    metrics_port: int = setting("ARCHIVER_METRICS_PORT", 9101, tcp_port, "port of /metrics and /healthz (0: off)")
    metrics_host: str = setting("ARCHIVER_METRICS_HOST", "127.0.0.1", str, "address of /metrics and /healthz")
    stall_after: float = setting(
        "ARCHIVER_STALL_AFTER",
        60.0,
        positive_float,
        "seconds with messages waiting (pending or unacknowledged) and no commit or ack before /healthz "
        "reports `stalled` (503); the consumer's stall guard acts after a third of it",
    )

    __repr__ = redacted_repr  # no password of DATABASE_URL or NATS_URL, no token

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
        return from_environ(cls, environ, kv=Settings.from_env(environ))
