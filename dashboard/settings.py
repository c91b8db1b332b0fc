"""Dashboard settings, built once at the process edge from an environment mapping.

The secrets among them (``DASHBOARD_AUTH_TOKEN``, ``DASHBOARD_SECRET`` and the password of
``DATABASE_URL``) never appear in the settings' ``repr``: it shows them masked, so settings
written to a log or a traceback leak nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from kvstate.errors import ConfigurationError
from kvstate.jobs import MAX_RATE, MIN_RATE
from kvstate.settings import (
    Settings,
    flag,
    from_environ,
    positive_float,
    positive_int,
    redact_url,
    setting,
    tcp_port,
)

__all__ = [
    "LOOPBACK_HOSTS",
    "TRACE_ID_PLACEHOLDER",
    "DashboardSettings",
    "host_pattern_problem",
    "is_loopback",
    "trace_url_problem",
]


_NONE: str | None = None
_NO_HOSTS: tuple[str, ...] | None = None

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The names the dashboard answers to when DASHBOARD_ALLOWED_HOSTS is unset (plus DASHBOARD_HOST)."""
_WILDCARD_BINDS = ("", "0.0.0.0", "::")
_MASK = "***"


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be an entry of DASHBOARD_ALLOWED_HOSTS (None when it can).

    An entry is a host name or address without port (``dash.example.com``, ``10.0.0.5``,
    ``::1``), ``*.example.com`` for any subdomain of example.com, or ``*`` for any host.
    """
    if pattern == "*":
        return None
    name = pattern.removeprefix("*.")
    if not name or "*" in name:
        return "a wildcard may only be a whole leading label (*.example.com) or * alone"
    if any(c.isspace() or c in "/:@[]" for c in name) and not _is_address(name):
        return "a host name or address without scheme, port or path"
    return None


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _hosts(raw: str) -> tuple[str, ...] | None:
    patterns = tuple(part.strip().lower().rstrip(".") for part in raw.split(",") if part.strip())
    if not patterns:
        raise ValueError("name at least one host, or * for any")
    for pattern in patterns:
        if (problem := host_pattern_problem(pattern)) is not None:
            raise ValueError(f"{pattern!r}: {problem}")
    return patterns


def _proxies(raw: str) -> tuple[str, ...] | None:
    entries = tuple(part.strip() for part in raw.split(",") if part.strip())
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (10.0.0.0/8)") from None
    return entries or None


def is_loopback(host: str) -> bool:
    """True when listening on ``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


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
        "when set (8+ characters), required for every write (cancel, API writes), and for reads with "
        "DASHBOARD_AUTH_READS: as `Authorization: Bearer`, as the basic-auth password or in the cancel form",
    )
    auth_reads: bool = setting(
        "DASHBOARD_AUTH_READS",
        False,
        flag,
        "`true`: reads need DASHBOARD_AUTH_TOKEN too (every page, fragment, event stream, API read, /metrics and "
        "the OpenAPI document; /healthz and /static stay open)",
        shown_default="`false`",
    )
    allow_anonymous: bool = setting(
        "DASHBOARD_ALLOW_ANONYMOUS",
        False,
        flag,
        "`true`: start on a non-loopback DASHBOARD_HOST without DASHBOARD_AUTH_TOKEN (refused otherwise, exit code 2)",
        shown_default="`false`",
    )
    allowed_hosts: tuple[str, ...] | None = setting(
        "DASHBOARD_ALLOWED_HOSTS",
        _NO_HOSTS,
        _hosts,
        "comma-separated `Host` names the dashboard answers (`dash.example.com`, `*.example.com`, `*` for any); "
        "any other gets 400 (DNS rebinding)",
        shown_default="`localhost`, `127.0.0.1`, `::1` and DASHBOARD_HOST",
    )
    trusted_proxies: tuple[str, ...] | None = setting(
        "DASHBOARD_TRUSTED_PROXIES",
        _NO_HOSTS,
        _proxies,
        "comma-separated addresses or networks of reverse proxies whose `X-Forwarded-For`/`-Proto` are believed "
        "(the client address of limits and the audit log, https for `Secure` cookies); unset: ignored",
    )
    rate_limit: int = setting(
        "DASHBOARD_RATE_LIMIT",
        1200,
        _non_negative_int,
        "requests per minute per client address (a token bucket holding a minute's worth), 429 above; 0: off",
    )
    max_streams: int = setting(
        "DASHBOARD_MAX_STREAMS",
        8,
        _non_negative_int,
        "event streams and `:wait` long polls one client address may hold open at once, 429 above; 0: no limit",
    )
    login_failures: int = setting(
        "DASHBOARD_LOGIN_FAILURES",
        10,
        positive_int,
        "wrong tokens one client address may present within DASHBOARD_LOGIN_WINDOW; then 429 until it ends",
    )
    login_window: float = setting(
        "DASHBOARD_LOGIN_WINDOW", 300.0, positive_float, "seconds of the failed-login count (and of the lockout)"
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
        if self.auth_reads and self.auth_token is None:
            raise ConfigurationError("DASHBOARD_AUTH_READS=true needs DASHBOARD_AUTH_TOKEN: reads would need a token")

    def __repr__(self) -> str:
        """The settings with their secrets masked (the token, the CSRF secret, the database password)."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("auth_token", "secret") and value is not None:
                value = _MASK
            elif f.name == "database_url" and value is not None:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def host_patterns(self) -> tuple[str, ...]:
        """The ``Host`` names answered: DASHBOARD_ALLOWED_HOSTS, or the loopback names plus DASHBOARD_HOST."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        bound = self.host.strip("[]").lower()
        return LOOPBACK_HOSTS if bound in _WILDCARD_BINDS or bound in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, bound)

    def exposure_problem(self) -> str | None:
        """Why serving on DASHBOARD_HOST would expose an unauthenticated dashboard (None when it would not)."""
        if self.auth_token is not None or self.allow_anonymous or is_loopback(self.host):
            return None
        return (
            f"DASHBOARD_HOST={self.host} is not a loopback address and DASHBOARD_AUTH_TOKEN is unset: anyone who "
            "can reach it could read every operation and cancel any. Set DASHBOARD_AUTH_TOKEN (and "
            "DASHBOARD_AUTH_READS=true), or DASHBOARD_ALLOW_ANONYMOUS=true to serve it without authentication"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DashboardSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge).

        Without DASHBOARD_DATABASE_URL the dashboard reads the archive with DATABASE_URL, so
        that deployments from before the read-only role keep their archive pages."""
        fallback: dict[str, object] = {}
        if not environ.get("DASHBOARD_DATABASE_URL", "").strip() and environ.get("DATABASE_URL", "").strip():
            fallback = {"database_url": environ["DATABASE_URL"].strip(), "database_url_fallback": True}
        return from_environ(cls, environ, kv=Settings.from_env(environ), **fallback)
