"""Archiver settings, built once at the process edge from an environment mapping.

Nothing in ``archiver`` reads ``os.environ``: the CLI passes it to
``ArchiverSettings.from_env``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from archiver._pg import dsn_problem
from archiver.grants import DEFAULT_READER_ROLE
from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id
from kvstate.settings import (
    Settings,
    from_environ,
    non_negative_float,
    positive_float,
    positive_int,
    redact_url,
    redacted_repr,
    setting,
    tcp_port,
)

__all__ = ["ArchiverSettings"]


def _database_url(raw: str) -> str:
    problem = dsn_problem(raw)
    if problem is not None:
        raise ValueError(problem)
    return raw


_ROLE_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _role(raw: str) -> str:
    if _ROLE_RE.fullmatch(raw) is None:
        raise ValueError("a PostgreSQL role name: lower-case letters, digits and _, at most 63, no leading digit")
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
        "PostgreSQL of the archive, as the role that owns its tables (archiver: must reach a PostgreSQL, it "
        "waits until it can; dashboard: read when `DASHBOARD_DATABASE_URL` is unset; `kvstate up`: use this server "
        "instead of starting one); `?sslmode=verify-full&sslrootcert=...` and libpq's other TLS parameters pass "
        "through",
    )
    reader_role: str = setting(
        "ARCHIVER_READER_ROLE",
        DEFAULT_READER_ROLE,
        _role,
        "NOLOGIN group role that may only read the archive: created if missing (when the archiver's role "
        "has CREATEROLE) and granted SELECT on the archive tables at each start; the dashboard's login "
        "role is its member ([security](security.md#postgresql))",
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
        """Settings from an environment mapping (pass ``os.environ`` at the process edge).

        A DATABASE_URL it rejects is quoted without its password."""
        url = environ.get("DATABASE_URL", "").strip()
        if url and (problem := dsn_problem(url)) is not None:
            raise ConfigurationError(f"DATABASE_URL={redact_url(url)!r} is not valid: {problem}")
        return from_environ(cls, environ, kv=Settings.from_env(environ))
