"""Security headers, the token's credentials, and the CSRF check.

The token (DASHBOARD_AUTH_TOKEN) is presented as ``Authorization: Bearer <token>``, as
HTTP basic auth with the token as password (any user name), or in the cancel form's
``token`` field; ``presented_credentials`` reads the headers and ``token_matches``
compares in constant time. Which requests need it is ``dashboard.guard``'s business.
CSRF (Litestar's CSRF middleware) protects every state-changing request on top of that,
except those the guard authenticated with ``Authorization: Bearer``: no browser sends that
header on its own, so they cannot be forged by another site (scripts and ``curl`` write
without the cookie dance). Without a token configured a bearer header is no credential,
and the CSRF check applies to it like to any other request.

Litestar's middleware reuses any ``csrftoken`` cookie a GET brings without checking its
signature; a cookie signed with another secret (an earlier process with the default
random secret, or another app on the same host) would then be embedded in every page and
every cancel would fail. ``csrf_middleware`` drops such a cookie on safe methods, so the
page gets a fresh token and the cookie is replaced.

Over TLS (the request's scheme is https, directly or through a trusted proxy) every
cookie gets ``Secure`` and the answer ``Strict-Transport-Security``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from litestar.config.csrf import CSRFConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.middleware.csrf import CSRF_SECRET_LENGTH, CSRFMiddleware, generate_csrf_hash
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "STRICT_TRANSPORT_SECURITY",
    "Credentials",
    "add_security_headers",
    "check_write_access",
    "csrf_middleware",
    "csrf_token_is_valid",
    "presented_credentials",
    "token_matches",
]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)

STRICT_TRANSPORT_SECURITY = "max-age=31536000"
"""Sent over https only (a browser ignores it over http, and it must not pin a plain-http dashboard)."""

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "cross-origin-resource-policy": "same-origin",
}
"""The headers of every HTTP answer."""


async def add_security_headers(message: Message, scope: Scope) -> None:
    """Litestar ``before_send`` hook adding the security headers to every HTTP response.

    An app-level hook, not a route middleware, so the framework's own answers get them
    too: the 404 of an unknown path, 405, the CSRF 403 and a 413 raised in middleware.
    (Async so Litestar does not run it in a worker thread for every message.)
    """
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in SECURITY_HEADERS.items():
            headers[name] = value
        if scope.get("scheme") == "https":
            headers["strict-transport-security"] = STRICT_TRANSPORT_SECURITY
            message["headers"] = [_secure_cookie(name, value) for name, value in message["headers"]]


def _secure_cookie(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    if name.lower() != b"set-cookie" or any(part.strip().lower() == b"secure" for part in value.split(b";")[1:]):
        return name, value
    return name, value + b"; Secure"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presents as the token: how (``bearer``, ``basic``, ``form``), the token, the user name."""

    scheme: str
    token: str
    user: str | None = None


def presented_credentials(headers: Mapping[str, str]) -> Credentials | None:
    """The credentials of the ``Authorization`` header (None without one).

    ``Bearer <token>`` and ``Basic`` (the token is the password; the user name is kept
    for the audit log, printable and clipped). Another scheme, or a header that cannot be
    decoded, presents an empty token: a wrong one, not none.
    """
    header = headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return Credentials("bearer", value.strip())
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return Credentials("basic", "")
        user, _, password = decoded.partition(":")
        shown = "".join(c for c in user if c.isprintable())[:64] or None
        return Credentials("basic", password, shown)
    return Credentials(scheme[:16] or "unknown", "")


def token_matches(presented: str, expected: str) -> bool:
    """True when ``presented`` is ``expected``, in time independent of both (their SHA-256s compared)."""
    return hmac.compare_digest(
        hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(expected.encode()).digest(),
    )


def _authenticated_bearer(scope: Scope) -> bool:
    """True when the guard authenticated the request by ``Authorization: Bearer`` with the configured token."""
    return bool(scope.get("auth") == "bearer")


def csrf_token_is_valid(token: str, secret: str) -> bool:
    """True when ``token`` was made by Litestar's ``generate_csrf_token(secret)`` (nonce + its HMAC)."""
    nonce, signature = token[:CSRF_SECRET_LENGTH], token[CSRF_SECRET_LENGTH:]
    if len(nonce) < CSRF_SECRET_LENGTH or not signature or not token.isascii():  # compare_digest: ASCII only
        return False
    return hmac.compare_digest(signature, generate_csrf_hash(token=nonce, secret=secret))


def _without_foreign_csrf_cookie(headers: list[tuple[bytes, bytes]], config: CSRFConfig) -> list[tuple[bytes, bytes]]:
    """``headers`` without ``config.cookie_name`` cookies not signed with ``config.secret``."""
    name = config.cookie_name.encode()
    result: list[tuple[bytes, bytes]] = []
    for header, value in headers:
        if header != b"cookie":
            result.append((header, value))
            continue
        kept = []
        for part in value.split(b";"):
            key, _, token = part.partition(b"=")
            if key.strip() == name and not csrf_token_is_valid(token.strip().decode("latin-1"), config.secret):
                continue
            kept.append(part)
        if any(part.strip() for part in kept):
            result.append((header, b";".join(kept).strip()))
    return result


def csrf_middleware(config: CSRFConfig) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar's CSRF check for every request but those the guard authenticated by ``Authorization: Bearer``.

    A cross-site form cannot set that header, and a cross-site script can only with a
    CORS preflight this app never grants, so a request carrying the right token in it was
    not forged by a browser. Without a token configured no request is authenticated, so
    a bearer header skips nothing.

    On safe methods a ``csrftoken`` cookie that is not signed with this app's secret is
    removed from the request first, so Litestar issues (and sets) a fresh token instead
    of embedding one that every write would then fail.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        checked = CSRFMiddleware(app=app, config=config)

        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await checked(scope, receive, send)
            elif _authenticated_bearer(scope):
                await app(scope, receive, send)
            else:
                if scope["method"] in config.safe_methods:
                    scope["headers"] = _without_foreign_csrf_cookie(list(scope["headers"]), config)
                await checked(scope, receive, send)

        return middleware

    return wrap


def check_write_access(
    connection: ASGIConnection[Any, Any, Any, Any], expected: str | None, form_token: str | None = None
) -> None:
    """Raise NotAuthorizedException (401) unless the request carries the token (when one is set).

    The guard refuses such requests before any handler runs; handlers that write call
    this as well, so a write never depends on the middleware stack alone.
    """
    if expected is None:
        return
    credentials = presented_credentials(connection.headers)
    presented = credentials.token if credentials is not None else form_token
    if presented is None or not token_matches(presented, expected):
        raise NotAuthorizedException("this action needs the dashboard's write token (DASHBOARD_AUTH_TOKEN)")
