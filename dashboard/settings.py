"""Dashboard settings, built once at the process edge from an environment mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kvstate.errors import ConfigurationError
from kvstate.jobs import MAX_RATE, MIN_RATE
from kvstate.settings import Settings, from_environ, positive_float, positive_int, setting, tcp_port

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

    Each field is declared once with ``kvstate.settings.setting`` (variable, default, parser,
    meaning); docs/operations.md#configuration holds the table rendered from them. Plus every
    variable of ``kvstate.Settings`` (NATS_URL, KVSTATE_BUCKET, ...) in ``kv``.
    """

    kv: Settings = field(default_factory=Settings)
    host: str = setting("DASHBOARD_HOST", "127.0.0.1", str, "address the dashboard listens on")
    port: int = setting("DASHBOARD_PORT", 8000, tcp_port, "port the dashboard listens on")
    auth_token: str | None = setting(
        "DASHBOARD_AUTH_TOKEN",
        _NONE,
        _optional,
        "when set, required (bearer token or basic-auth password) for cancel and API writes",
    )
    database_url: str | None = setting(
        "DASHBOARD_DATABASE_URL",
        _NONE,
        _optional,
        "PostgreSQL of the archive the dashboard reads, as a read-only role (a member of "
        "`ARCHIVER_READER_ROLE`, [security](security.md#postgresql)); TLS parameters such as `?sslmode=` pass "
        "through; unset: `DATABASE_URL`, with a warning; neither: no archive pages",
    )
    stats_window: float = setting(
        "DASHBOARD_STATS_WINDOW", 900.0, positive_float, "seconds of history behind the p50/p95 and throughput figures"
    )
    page_size: int = setting("DASHBOARD_PAGE_SIZE", 50, positive_int, "rows per page in lists (1-500)")
    max_body: int = setting(
        "DASHBOARD_MAX_BODY", 16384, positive_int, "largest request body accepted, bytes (at least 1024)"
    )
    secret: str | None = setting(
        "DASHBOARD_SECRET",
        _NONE,
        _secret,
        "CSRF signing secret, at least 16 characters (random per process when unset; set it when several "
        "dashboards share a load balancer)",
    )
    debounce: float = setting(
        "DASHBOARD_DEBOUNCE", 0.25, positive_float, "seconds change signals are coalesced before pages re-fetch"
    )
    trace_url: str | None = setting(
        "DASHBOARD_TRACE_URL",
        _NONE,
        _trace_url,
        "link template of a tracing backend with `{trace_id}` (`https://jaeger.example/trace/{trace_id}`); the "
        "detail page and the API link each operation's and attempt's trace; an http(s) URL, unset: no links",
    )

    database_url_fallback: bool = field(default=False, compare=False)
    """True when DASHBOARD_DATABASE_URL was unset and the archive URL came from DATABASE_URL (the archiver's)"""
    job_max_operations: int = setting(
        "DASHBOARD_JOB_MAX_OPERATIONS",
        5000,
        positive_int,
        "most operations one bulk job may change (a filter matching more is refused); its record keeps their ids",
    )
    job_rate: float = setting(
        "DASHBOARD_JOB_RATE", 50.0, positive_float, "operations per second a bulk job changes, unless it asks for fewer"
    )

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 500:
            raise ConfigurationError(f"DASHBOARD_PAGE_SIZE={self.page_size}: must be between 1 and 500")
        if self.max_body < 1024:
            raise ConfigurationError(f"DASHBOARD_MAX_BODY={self.max_body}: must be at least 1024")
        if self.auth_token is not None and len(self.auth_token) < 8:
            raise ConfigurationError("DASHBOARD_AUTH_TOKEN must be at least 8 characters")
        if not MIN_RATE <= self.job_rate <= MAX_RATE:
            raise ConfigurationError(
                f"DASHBOARD_JOB_RATE={self.job_rate:g}: must be between {MIN_RATE:g} and {MAX_RATE:g}"
            )
        if self.trace_url is not None and (problem := trace_url_problem(self.trace_url)) is not None:
            raise ConfigurationError(f"DASHBOARD_TRACE_URL={self.trace_url!r}: {problem}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DashboardSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge).

        Without DASHBOARD_DATABASE_URL the dashboard reads the archive with DATABASE_URL, so
        that deployments from before the read-only role keep their archive pages."""
        fallback: dict[str, object] = {}
        if not environ.get("DASHBOARD_DATABASE_URL", "").strip() and environ.get("DATABASE_URL", "").strip():
            fallback = {"database_url": environ["DATABASE_URL"].strip(), "database_url_fallback": True}
        return from_environ(cls, environ, kv=Settings.from_env(environ), **fallback)
