"""Security headers and the optional write token.

Reads are open (bind the dashboard to a trusted network or put it behind a proxy that
authenticates). When DASHBOARD_AUTH_TOKEN is set, every write (the cancel form and the
API's ``:cancel`` and ``:apply``) must present it: as ``Authorization: Bearer <token>``, as HTTP basic
auth with the token as password (any user name), or in the cancel form's ``token`` field.
CSRF (Litestar's CSRF middleware) protects every POST on top of that, except requests
that carry ``Authorization: Bearer``: no browser sends that header on its own, so they
cannot be forged by another site (scripts and ``curl`` write without the cookie dance).

Litestar's middleware reuses any ``csrftoken`` cookie a GET brings without checking its
signature; a cookie signed with another secret (an earlier process with the default
random secret, or another app on the same host) would then be embedded in every page and
every cancel would fail. ``csrf_middleware`` drops such a cookie on safe methods, so the
page gets a fresh token and the cookie is replaced.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
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
    "add_security_headers",
    "check_write_access",
    "csrf_middleware",
    "csrf_token_is_valid",
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
    ]
)

_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


async def add_security_headers(message: Message, scope: Scope) -> None:
    """Litestar ``before_send`` hook adding the security headers to every HTTP response.

    An app-level hook, not a route middleware, so the framework's own answers get them
    too: the 404 of an unknown path, 405, the CSRF 403 and a 413 raised in middleware.
    (Async so Litestar does not run it in a worker thread for every message.)
    """
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in _HEADERS.items():
            headers[name] = value


def _has_bearer(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value[:7].lower() == b"bearer "
    return False


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
    """Litestar's CSRF check for every request without ``Authorization: Bearer``.

    A cross-site form cannot set that header, and a cross-site script can only with a
    CORS preflight this app never grants, so a request carrying it was not forged by a
    browser; whether it may write is then up to the write token alone.

    On safe methods a ``csrftoken`` cookie that is not signed with this app's secret is
    removed from the request first, so Litestar issues (and sets) a fresh token instead
    of embedding one that every write would then fail.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        checked = CSRFMiddleware(app=app, config=config)

        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await checked(scope, receive, send)
            elif _has_bearer(scope):
                await app(scope, receive, send)
            else:
                if scope["method"] in config.safe_methods:
                    scope["headers"] = _without_foreign_csrf_cookie(list(scope["headers"]), config)
                await checked(scope, receive, send)

        return middleware

    return wrap


def _presented_token(connection: ASGIConnection[Any, Any, Any, Any], form_token: str | None) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return form_token


def check_write_access(
    connection: ASGIConnection[Any, Any, Any, Any], expected: str | None, form_token: str | None = None
) -> None:
    """Raise NotAuthorizedException (401) unless the request carries the write token (when one is set)."""
    if expected is None:
        return
    presented = _presented_token(connection, form_token)
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise NotAuthorizedException("this action needs the dashboard's write token (DASHBOARD_AUTH_TOKEN)")
