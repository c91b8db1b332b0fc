"""Dashboard settings, built once at the process edge from an environment mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from kvstate.errors import ConfigurationError
from kvstate.settings import Settings, env_value, positive_float, positive_int, redacted_repr, tcp_port

__all__ = ["TRACE_ID_PLACEHOLDER", "DashboardSettings", "trace_url_problem"]


_NONE: str | None = None


def _optional(raw: str) -> str | None:
    return raw


def _secret(raw: str) -> str | None:
    if len(raw) < 16:
        raise ValueError("must be at least 16 characters")
    return raw


TRACE_ID_PLACEHOLDER = "{trace_id}"


def _trace_url(raw: str) -> str | None:
    problem = trace_url_problem(raw)
    if problem is not None:
        raise ValueError(problem)
    return raw


def trace_url_problem(template: str) -> str | None:
    """Why ``template`` cannot be DASHBOARD_TRACE_URL (None when it can): an http(s) URL holding ``{trace_id}``."""
    try:
        parts = urlsplit(template)
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http:// or https:// URL"
    if TRACE_ID_PLACEHOLDER not in template:
        return f"must contain {TRACE_ID_PLACEHOLDER} where the trace id goes"
    if any(c.isspace() or not c.isprintable() for c in template):
        return "must not contain spaces or control characters"
    return None


@dataclass(frozen=True)
class DashboardSettings:
    """Settings of one dashboard process (the NATS/bucket ones come from ``kvstate.Settings``).

    ======================== ============== ==================================================
    variable                 default        meaning
    ======================== ============== ==================================================
    DASHBOARD_HOST           127.0.0.1      interface to listen on
    DASHBOARD_PORT           8000           TCP port
    DASHBOARD_AUTH_TOKEN     (unset)        when set, required for cancel and API writes
    DATABASE_URL             (unset)        PostgreSQL archive; archive pages off when unset
    DASHBOARD_STATS_WINDOW   900            seconds of history for p50/p95 and throughput
    DASHBOARD_PAGE_SIZE      50             rows per page in lists
    DASHBOARD_MAX_BODY       16384          largest accepted request body, in bytes
    DASHBOARD_SECRET         (random)       CSRF signing secret (set it when running replicas)
    DASHBOARD_DEBOUNCE       0.25           seconds between two live-update signals
    DASHBOARD_TRACE_URL      (unset)        trace link template with {trace_id}, e.g.
                                            https://jaeger.example/trace/{trace_id}
    ======================== ============== ==================================================
    """

    kv: Settings = field(default_factory=Settings)
    host: str = "127.0.0.1"
    port: int = 8000
    auth_token: str | None = None
    database_url: str | None = None
    stats_window: float = 900.0
    page_size: int = 50
    max_body: int = 16384
    secret: str | None = None
    debounce: float = 0.25
    trace_url: str | None = None

    ENV: ClassVar[dict[str, str]] = {
        "host": "DASHBOARD_HOST",
        "port": "DASHBOARD_PORT",
        "auth_token": "DASHBOARD_AUTH_TOKEN",
        "database_url": "DATABASE_URL",
        "stats_window": "DASHBOARD_STATS_WINDOW",
        "page_size": "DASHBOARD_PAGE_SIZE",
        "max_body": "DASHBOARD_MAX_BODY",
        "secret": "DASHBOARD_SECRET",
        "debounce": "DASHBOARD_DEBOUNCE",
        "trace_url": "DASHBOARD_TRACE_URL",
    }

    __repr__ = redacted_repr  # no password of DATABASE_URL or NATS_URL, no token

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 500:
            raise ConfigurationError(f"DASHBOARD_PAGE_SIZE={self.page_size}: must be between 1 and 500")
        if self.max_body < 1024:
            raise ConfigurationError(f"DASHBOARD_MAX_BODY={self.max_body}: must be at least 1024")
        if self.auth_token is not None and len(self.auth_token) < 8:
            raise ConfigurationError("DASHBOARD_AUTH_TOKEN must be at least 8 characters")
        if self.trace_url is not None and (problem := trace_url_problem(self.trace_url)) is not None:
            raise ConfigurationError(f"DASHBOARD_TRACE_URL={self.trace_url!r}: {problem}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DashboardSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return cls(
            kv=Settings.from_env(environ),
            host=env_value(environ, "DASHBOARD_HOST", cls.host, str),
            port=env_value(environ, "DASHBOARD_PORT", cls.port, tcp_port),
            auth_token=env_value(environ, "DASHBOARD_AUTH_TOKEN", _NONE, _optional),
            database_url=env_value(environ, "DATABASE_URL", _NONE, _optional),
            stats_window=env_value(environ, "DASHBOARD_STATS_WINDOW", cls.stats_window, positive_float),
            page_size=env_value(environ, "DASHBOARD_PAGE_SIZE", cls.page_size, positive_int),
            max_body=env_value(environ, "DASHBOARD_MAX_BODY", cls.max_body, positive_int),
            secret=env_value(environ, "DASHBOARD_SECRET", _NONE, _secret),
            debounce=env_value(environ, "DASHBOARD_DEBOUNCE", cls.debounce, positive_float),
            trace_url=env_value(environ, "DASHBOARD_TRACE_URL", _NONE, _trace_url),
        )
