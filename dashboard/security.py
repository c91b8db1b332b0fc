"""Security headers and the optional write token.

Reads are open (bind the dashboard to a trusted network or put it behind a proxy that
authenticates). When DASHBOARD_AUTH_TOKEN is set, every write (the cancel form and the
API's ``:cancel``) must present it: as ``Authorization: Bearer <token>``, as HTTP basic
auth with the token as password (any user name), or in the cancel form's ``token`` field.
CSRF (Litestar's CSRF middleware) protects every POST on top of that, except requests
that carry ``Authorization: Bearer``: no browser sends that header on its own, so they
cannot be forged by another site (scripts and ``curl`` write without the cookie dance).
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
from litestar.middleware.csrf import CSRFMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "check_write_access", "csrf_middleware", "security_headers_middleware"]

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


def security_headers_middleware(app: ASGIApp) -> ASGIApp:
    """ASGI middleware adding the security headers to every HTTP response."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                for name, value in _HEADERS.items():
                    headers[name] = value
            await send(message)

        await app(scope, receive, send_with_headers)

    return middleware


def _has_bearer(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value[:7].lower() == b"bearer "
    return False


def csrf_middleware(config: CSRFConfig) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar's CSRF check for every request without ``Authorization: Bearer``.

    A cross-site form cannot set that header, and a cross-site script can only with a
    CORS preflight this app never grants, so a request carrying it was not forged by a
    browser; whether it may write is then up to the write token alone.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        checked = CSRFMiddleware(app=app, config=config)

        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP and _has_bearer(scope):
                await app(scope, receive, send)
            else:
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
