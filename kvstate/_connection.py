"""The NATS connection kvstate opens, in one place for every process, and what the server refuses on it.

``connect(settings)`` is how the client, the CLI, the archiver, the dashboard, the demo and
``kvstate up`` reach NATS: credentials (a creds file, an nkey seed, user and password or a
token), TLS with a custom CA, a client certificate (mTLS) and the TLS-first handshake all
come from ``kvstate.Settings``, so every process connects the same way. A wrong password,
a refused certificate or a server without the TLS the settings ask for fails the first
connection at once with a typed error, instead of nats-py retrying it until a timeout.

Permission violations: nats-server answers a publish or subscription the user's
permissions forbid with ``-ERR 'Permissions Violation for Publish to "<subject>"'`` and
drops the message, so the request behind it would only time out. ``Connection`` reads
those errors (nats-py hands them to the error callback, lower-cased) and fails whatever
waits on that subject: a request raises ``SubjectDenied`` as soon as the server's error
arrives (``kvstate._kv.nats_errors`` turns it into ``PermissionDenied``). The server sends
the error in order with everything else on the connection, and under fixed permissions a
subject it refused once gets no answer ever, so a request is never failed after its answer.

The faster header parser: every JetStream message kvstate reads carries headers. nats-py
2.16 (without the optional ``fast-mail-parser``, which measured no faster) checks each
header name for whitespace with a generator over its characters, which was a fifth of the
archiver's CPU when it archived 20,000 operations in a burst. ``Connection`` parses the
same way with C-level string methods; ``tests/test_connection.py`` checks on arbitrary
input that both give the same result, so an upgrade of nats-py that changes the rules
fails there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kvstate.errors import AuthenticationFailed, ConfigurationError, ConnectionLostError, KvstateError
from kvstate.settings import Settings

__all__ = ["Connection", "SubjectDenied", "TLSNotOffered", "Violations", "connect", "connect_options", "violations"]

_CRLF = b"\r\n"
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')
_REFUSED_CREDENTIALS = ("authorization violation", "authentication timeout", "authentication expired", "revoked")
_RECONNECT_WAIT = 1

ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


class SubjectDenied(nats.errors.Error):
    """The server refused this connection a subject (nats-level; ``kvstate._kv`` raises PermissionDenied for it)."""

    def __init__(self, action: str, subject: str, hint: str = "") -> None:
        self.action = action
        """``publish`` or ``subscribe``"""
        self.subject = subject
        """as the server named it, lower-cased by nats-py"""
        self.hint = hint
        """what to change, when kvstate can tell"""
        super().__init__(f"nats: permissions violation for {action} to {subject!r}" + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:
        return str(self.args[0])

    def again(self) -> SubjectDenied:
        """A fresh instance to raise: one violation may fail several waiting calls, each with its own traceback."""
        return SubjectDenied(self.action, self.subject, self.hint)


class TLSNotOffered(nats.errors.Error):
    """The settings ask for TLS and the server offers none: nothing, credentials least of all, is sent."""

    def __str__(self) -> str:
        return "nats: the server does not offer TLS, which the settings require (tls:// or NATS_TLS_*)"


class Violations:
    """The permission violations a connection reported, handed to whoever waits on the subject."""

    def __init__(self) -> None:
        self._exact: dict[str, list[Callable[[SubjectDenied], None]]] = {}
        self._prefixes: list[tuple[str, Callable[[SubjectDenied], None]]] = []
        self.last: SubjectDenied | None = None
        """the latest violation (for logs and tests)"""
        self.inbox_denied: SubjectDenied | None = None
        """set when the server refused a subscription to this connection's inbox: no reply can arrive"""
        self.inbox_prefix = "_inbox."

    def watch(self, subject: str, callback: Callable[[SubjectDenied], None]) -> Callable[[], None]:
        """Call ``callback`` when the server refuses ``subject`` (compared lower-cased); returns the unwatch."""
        key = subject.lower()
        callbacks = self._exact.setdefault(key, [])
        callbacks.append(callback)

        def unwatch() -> None:
            callbacks.remove(callback)
            if not callbacks and self._exact.get(key) is callbacks:
                del self._exact[key]

        return unwatch

    def watch_prefix(self, prefix: str, callback: Callable[[SubjectDenied], None]) -> Callable[[], None]:
        """Call ``callback`` for every refused subject starting with ``prefix``; returns the unwatch."""
        entry = (prefix.lower(), callback)
        self._prefixes.append(entry)
        return lambda: self._prefixes.remove(entry)

    def report(self, denied: SubjectDenied) -> None:
        """One violation from the server: tell those waiting on its subject."""
        self.last = denied
        waiting = list(self._exact.get(denied.subject, ()))
        if denied.action == "subscribe" and denied.subject.startswith(self.inbox_prefix):
            # Replies come to the inbox: if it may not be subscribed, every request is doomed.
            denied = SubjectDenied(
                denied.action,
                denied.subject,
                "this user may not receive replies on its inbox: set NATS_INBOX_PREFIX to the prefix its "
                "permissions allow (deploy/nats/auth.conf gives each role _INBOX_<role>)",
            )
            self.last = self.inbox_denied = denied
            waiting = [callback for callbacks in self._exact.values() for callback in callbacks]
        waiting += [callback for prefix, callback in self._prefixes if denied.subject.startswith(prefix)]
        for callback in waiting:
            callback(denied)


def violations(nc: NATS) -> Violations | None:
    """The violation tracker of ``nc``: None for a connection not opened by ``connect`` (nothing is tracked)."""
    return nc.violations if isinstance(nc, Connection) else None


class Connection(NATS):
    """nats-py's ``Client``, but for permission violations, required TLS and how it parses header lines."""

    def __init__(self, *, tls_required: bool = False) -> None:
        super().__init__()
        self.violations = Violations()
        self._tls_required = tls_required

    def note_error(self, exc: Exception) -> SubjectDenied | None:
        """Record ``exc`` if it is a permission violation the server reported; returns it as SubjectDenied."""
        match = _VIOLATION.search(str(exc))
        if match is None:
            return None
        action = "publish" if match.group(1) == "publish" else "subscribe"
        denied = SubjectDenied(action, match.group(2))
        self.violations.report(denied)
        return denied

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """nats-py's request, raising SubjectDenied as soon as the server refuses ``subject``."""
        tracked = self.violations
        if tracked.inbox_denied is not None:
            raise tracked.inbox_denied.again()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - nats-py requests need a running task anyway
            return await super().request(subject, payload, timeout, old_style, headers)
        caught: list[SubjectDenied] = []

        def denied(error: SubjectDenied) -> None:
            if not caught:
                caught.append(error)
                task.cancel()  # the task waits inside super().request: the only await between watch and unwatch

        unwatch = tracked.watch(subject, denied)
        try:
            return await super().request(subject, payload, timeout, old_style, headers)
        except asyncio.CancelledError:
            if caught and task.uncancel() == 0:  # our cancel, and no one else's pending
                raise caught[0].again() from None
            raise
        finally:
            unwatch()

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # nats-py upgrades to TLS only when the server's INFO says tls_required; a client
        # that requires TLS upgrades whenever the server offers it, and refuses a server
        # that offers none before it sends anything (the CONNECT carries the credentials).
        upgrade = initial_connection and self._tls_required and not self.options.get("tls_handshake_first")
        if upgrade and not info.get("tls_required"):
            if not info.get("tls_available"):
                raise TLSNotOffered
            info["tls_required"] = True
        await super()._process_info(info, initial_connection)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            name = name.strip()
            if not name.isascii():
                continue  # not a token: nats-py skips it too
            key = name.decode("ascii")
            if key and key.split() != [key]:
                continue  # whitespace inside the name
            headers[key] = value.strip().decode("utf-8", "replace")
        return headers


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for (None when they ask for no TLS): the server verified
    against ``NATS_TLS_CA`` (the system's CAs when unset), with the client certificate when given."""
    if not settings.tls_required:
        return None
    ca = settings.nats_tls_ca
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"NATS_TLS_CA={str(ca)!r}: not usable as CA certificates ({exc})") from exc
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        try:
            context.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"NATS_TLS_CERT={str(settings.nats_tls_cert)!r} and NATS_TLS_KEY={str(settings.nats_tls_key)!r}: "
                f"not a certificate and its key ({exc})"
            ) from exc
    return context


def connect_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of nats-py's ``connect`` for ``settings``: servers, credentials, TLS, reconnects.

    Reconnects are unlimited once connected (a NATS restart must not end a service); the
    first connection gets a deadline of its own in ``connect``.
    """
    options: dict[str, Any] = {
        "servers": settings.servers,
        "connect_timeout": max(1, int(settings.timeout)),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": _RECONNECT_WAIT,
        "inbox_prefix": settings.nats_inbox_prefix,
    }
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_token is not None:
        options["token"] = settings.nats_token
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    if settings.nats_nkey_seed is not None:
        options["nkeys_seed"] = str(settings.nats_nkey_seed)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
        options["tls_handshake_first"] = settings.nats_tls_first
    return options


def _refusal(exc: Exception, settings: Settings) -> KvstateError | None:
    """The error that ends a first connection at once (retrying cannot help), or None to go on trying."""
    text = str(exc).lower()
    where = settings.nats_url_redacted
    if isinstance(exc, nats.errors.AuthorizationError) or any(words in text for words in _REFUSED_CREDENTIALS):
        return AuthenticationFailed(f"{where} refused the credentials ({_credentials_in_use(settings)}): {exc}")
    if isinstance(exc, ssl.SSLError):
        if "certificate_required" in text or "certificate required" in text:
            return AuthenticationFailed(
                f"{where} requires a client certificate (set NATS_TLS_CERT and NATS_TLS_KEY): {exc}"
            )
        if "certificate_unknown" in text or "bad_certificate" in text or "unknown_ca" in text:
            return AuthenticationFailed(f"{where} refused the client certificate (NATS_TLS_CERT): {exc}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ConnectionLostError(
                f"the TLS certificate of {where} is not trusted ({exc.verify_message}); "
                "NATS_TLS_CA names the CA that signed it"
            )
        return ConnectionLostError(f"the TLS handshake with {where} failed: {exc}")
    if isinstance(exc, TLSNotOffered):
        return ConnectionLostError(f"{where}: {exc}; nothing was sent")
    return None


def _credentials_in_use(settings: Settings) -> str:
    for env, value in (
        ("NATS_CREDS", settings.nats_creds),
        ("NATS_NKEY_SEED", settings.nats_nkey_seed),
        ("NATS_USER", settings.nats_user),
        ("NATS_TOKEN", settings.nats_token),
    ):
        if value is not None:
            return env
    return "the user in NATS_URL" if "@" in settings.nats_url else "none given"


async def connect(
    settings: Settings,
    *,
    name: str = "kvstate",
    error_cb: ErrorCallback | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
) -> Connection:
    """A NATS connection for ``settings``, the one way every kvstate process connects.

    The first connection must succeed within ``KVSTATE_TIMEOUT``: ConnectionLostError when
    no server answers in time (or TLS fails), AuthenticationFailed at once when the server
    refuses the credentials or the client certificate, ConfigurationError for unusable TLS
    files. Once connected it reconnects forever. Permission violations are tracked on the
    connection (``Connection.violations``) and still reach ``error_cb``.
    """
    options = connect_options(settings)
    nc = Connection(tls_required=settings.tls_required)
    nc.violations.inbox_prefix = settings.nats_inbox_prefix.lower() + "."
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[KvstateError] = loop.create_future()

    async def on_error(exc: Exception) -> None:
        nc.note_error(exc)
        if not refused.done() and not nc.is_connected and (refusal := _refusal(exc, settings)) is not None:
            refused.set_result(refusal)
        if error_cb is not None:
            await error_cb(exc)

    opening = loop.create_task(
        nc.connect(
            name=name,
            error_cb=on_error,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=closed_cb,
            **options,
        )
    )
    first: set[asyncio.Future[Any]] = {opening, refused}
    try:
        done, _ = await asyncio.wait(first, timeout=settings.timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _abandon(nc, opening)
        raise
    if opening in done and opening.exception() is None:
        refused.cancel()
        return nc
    failure = opening.exception() if opening in done else None
    await _abandon(nc, opening)
    if refused.done() and not refused.cancelled():
        raise refused.result()
    if failure is not None:
        reason = repr(failure)
    else:
        reason = f"no answer within {settings.timeout:g}s (KVSTATE_TIMEOUT)"
        if settings.tls_required and not settings.nats_tls_first:
            reason += "; a server with handshake_first in its tls block needs NATS_TLS_FIRST=true"
    raise ConnectionLostError(f"cannot connect to NATS at {settings.nats_url_redacted}: {reason}") from failure


async def _abandon(nc: Connection, opening: asyncio.Task[None]) -> None:
    """Stop a first connection that did not come up, and close what it opened."""
    opening.cancel()
    await asyncio.wait({opening})  # its own outcome does not matter now; a cancel of ours still propagates
    with contextlib.suppress(Exception):
        await nc.close()
