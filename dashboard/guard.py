"""The request guard: the checks every route gets, in one middleware of the app.

Litestar runs app-level middleware for every route handler (pages, fragments, the API,
the event stream, /metrics, the OpenAPI document, static files, and any route added
later), so a new route is protected without doing anything. In order:

1. **Host** (DNS rebinding): the ``Host`` name, without its port, must be one of
   ``DashboardSettings.host_patterns``; else 400.
2. **Rate** (DASHBOARD_RATE_LIMIT): a token bucket per client address; else 429 with
   Retry-After.
3. **Authentication**: with DASHBOARD_AUTH_TOKEN set, every state-changing request, and
   with DASHBOARD_AUTH_READS every request to a route not marked ``public`` (/healthz,
   /static), must present the token (``dashboard.security.presented_credentials``). A
   wrong token is a failed login: audited, counted per client (DASHBOARD_LOGIN_FAILURES
   within DASHBOARD_LOGIN_WINDOW, then 429 with Retry-After until the window ends, the
   token not even compared). Without a token configured nothing is a credential: a
   bearer header then changes nothing (the CSRF check still applies).
4. **Writes**: a browser's ``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` is
   refused (403) on every state-changing method, before the CSRF check
   (``dashboard.security.csrf_middleware``) runs; each write is audited with its status.
5. **Held connections** (DASHBOARD_MAX_STREAMS): routes marked ``holds_connection``
   (the event stream; the operation route for its ``:wait`` long poll) count per
   client; above the cap 429 with Retry-After.

The client address is the connection's peer, or with DASHBOARD_TRUSTED_PROXIES the
address uvicorn takes from ``X-Forwarded-For`` of those proxies. Behind a proxy that is
not trusted, every user shares the proxy's address and so its limits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
)
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from dashboard.audit import ANONYMOUS, Principal, audit, token_id
from dashboard.security import Credentials, presented_credentials, token_matches
from dashboard.settings import DashboardSettings
from dashboard.throttle import ConnectionCounter, LoginThrottle, RateLimiter, client_key, retry_after_header

__all__ = [
    "AUDIT_ACTION",
    "HOLDS_CONNECTION",
    "PUBLIC",
    "SAFE_METHODS",
    "Guard",
    "HostRefused",
    "client_address",
    "host_allowed",
]

PUBLIC = "public"
"""Route opt: the route answers without the token even with DASHBOARD_AUTH_READS (health checks, static files)."""
HOLDS_CONNECTION = "holds_connection"
"""Route opt: ``True`` (every request holds its connection: an event stream) or a path suffix (``":wait"``:
only those requests do); such requests count against DASHBOARD_MAX_STREAMS."""
AUDIT_ACTION = "audit_action"
"""Route opt: the name of the route's writes in the audit log (default: the path's ``:method``, else the
handler's name)."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_ID_PARAMS = ("op_id", "name", "id")


class HostRefused(HTTPException):
    """The request's Host is not one this dashboard answers to (DASHBOARD_ALLOWED_HOSTS)."""

    status_code = 400


def host_allowed(host_header: str | None, patterns: tuple[str, ...]) -> bool:
    """True when the host name of ``host_header`` (port stripped, case and a final dot ignored) matches one
    of ``patterns``: a name, ``*.domain`` (its subdomains) or ``*`` (anything)."""
    if "*" in patterns:
        return True
    if not host_header:
        return False
    host, port = host_header.strip().lower(), ""
    if host.startswith("["):  # [IPv6]:port
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    host = host.rstrip(".")
    if not host or (port and not port.isdigit()):  # a malformed Host is no host of ours
        return False
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def client_address(scope: Scope) -> str:
    """The client's address as the server saw it (after trusted proxy headers), ``unknown`` without one."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _held(opt: dict[str, Any], path: str) -> bool:
    marker = opt.get(HOLDS_CONNECTION)
    if isinstance(marker, str):
        return path.endswith(marker)
    return bool(marker)


def _action(scope: Scope) -> str:
    handler = scope.get("route_handler")
    named = getattr(handler, "opt", {}).get(AUDIT_ACTION)
    if isinstance(named, str):
        return named
    last = scope["path"].rstrip("/").rpartition("/")[2]
    if ":" in last:
        return last.rpartition(":")[2][:40]
    return str(getattr(handler, "handler_name", "write"))


def _operation(scope: Scope) -> str | None:
    params = scope.get("path_params") or {}
    for name in _ID_PARAMS:
        value = params.get(name)
        if isinstance(value, str):
            return value.removeprefix("operations/").partition(":")[0]
    return None


@dataclass
class _Write:
    status: int | None = None
    outcome: str | None = None


class Guard:
    """The checks of the module docstring, with their per-client tables (one Guard per app)."""

    def __init__(self, settings: DashboardSettings, *, clock: Callable[[], float] | None = None) -> None:
        self.patterns = settings.host_patterns
        self.token = settings.auth_token
        self.token_id = token_id(settings.auth_token) if settings.auth_token is not None else ANONYMOUS
        self.auth_reads = settings.auth_reads
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.rate = RateLimiter(settings.rate_limit, **kwargs) if settings.rate_limit > 0 else None
        self.logins = LoginThrottle(settings.login_failures, settings.login_window, **kwargs)
        self.streams = ConnectionCounter(settings.max_streams) if settings.max_streams > 0 else None

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """The ASGI middleware around ``app`` (Litestar calls this once per route handler)."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            await self._check(scope, receive, send, app)

        return guarded

    async def _check(self, scope: HTTPScope, receive: Receive, send: Send, app: ASGIApp) -> None:
        headers = Headers(scope["headers"])  # not from_scope: that caches, and csrf_middleware may still edit them
        if not host_allowed(headers.get("host"), self.patterns):
            shown = (headers.get("host") or "")[:80]
            raise HostRefused(detail=f"this dashboard does not answer to host {shown!r} (DASHBOARD_ALLOWED_HOSTS)")
        client = client_address(scope)
        key = client_key(client)
        if self.rate is not None and (wait := self.rate.take(key)) > 0:
            raise TooManyRequestsException(
                detail="too many requests from this address (DASHBOARD_RATE_LIMIT)",
                headers={"Retry-After": retry_after_header(wait)},
            )
        write = scope["method"] not in SAFE_METHODS
        opt: dict[str, Any] = getattr(scope.get("route_handler"), "opt", {})
        principal = Principal()
        if self.token is not None and (write or (self.auth_reads and not opt.get(PUBLIC))):
            principal = await self._authenticate(scope, receive, headers, client, key, write)
        scope["user"] = principal
        scope["auth"] = principal.scheme
        async with self._holding(scope, opt, key):
            if not write:
                await app(scope, receive, send)
                return
            await self._write(scope, receive, send, app, headers, principal, client)

    async def _authenticate(
        self, scope: HTTPScope, receive: Receive, headers: Headers, client: str, key: str, write: bool
    ) -> Principal:
        assert self.token is not None
        credentials = presented_credentials(headers)
        if credentials is None and write and headers.get("content-type", "").startswith(_FORM_TYPES):
            form = await Request[Any, Any, Any](scope, receive).form()  # kept in the scope for the handler
            token = form.get("token")
            if isinstance(token, str) and token:
                credentials = Credentials("form", token)
        if credentials is None:
            if write:
                audit(
                    "login.refused", Principal(), client, reason="no token", method=scope["method"], path=scope["path"]
                )
            raise NotAuthorizedException("this needs the dashboard's token (DASHBOARD_AUTH_TOKEN)")
        locked = self.logins.retry_after(key)
        if locked > 0:
            audit("login.refused", Principal(user=credentials.user), client, reason="throttled", path=scope["path"])
            raise TooManyRequestsException(
                detail="too many wrong tokens from this address (DASHBOARD_LOGIN_FAILURES); wait before trying again",
                headers={"Retry-After": retry_after_header(locked)},
            )
        if not token_matches(credentials.token, self.token):
            self.logins.failed(key)
            audit(
                "login.refused",
                Principal(user=credentials.user),
                client,
                reason="wrong token",
                scheme=credentials.scheme,
                method=scope["method"],
                path=scope["path"],
            )
            raise NotAuthorizedException("the token is not the dashboard's token (DASHBOARD_AUTH_TOKEN)")
        self.logins.succeeded(key)
        return Principal(self.token_id, credentials.scheme, credentials.user)

    @contextlib.asynccontextmanager
    async def _holding(self, scope: HTTPScope, opt: dict[str, Any], key: str) -> AsyncIterator[None]:
        if self.streams is None or not _held(opt, scope["path"]):
            yield
            return
        if not self.streams.acquire(key):
            raise TooManyRequestsException(
                detail=f"this address holds {self.streams.per_client} event streams or long polls already "
                "(DASHBOARD_MAX_STREAMS)",
                headers={"Retry-After": "5"},
            )
        try:
            yield
        finally:
            self.streams.release(key)

    async def _write(
        self,
        scope: HTTPScope,
        receive: Receive,
        send: Send,
        app: ASGIApp,
        headers: Headers,
        principal: Principal,
        client: str,
    ) -> None:
        answered = _Write()

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.status = message["status"]
                answer = Headers(message.get("headers") or [])
                answered.outcome = answer.get("kvstate-outcome")
            await send(message)

        try:
            site = headers.get("sec-fetch-site")
            if site is not None and site not in _ALLOWED_FETCH_SITES:
                raise PermissionDeniedException(f"a write from another site is refused (Sec-Fetch-Site: {site[:20]})")
            await app(scope, receive, watched)
        except HTTPException as exc:
            answered.status = exc.status_code
            raise
        except Exception:
            answered.status = 500
            raise
        finally:
            audit(
                _action(scope),
                principal,
                client,
                method=scope["method"],
                path=scope["path"],
                operation=_operation(scope),
                status=answered.status,
                outcome=answered.outcome,
            )
