"""What the operation methods (``:apply``, ``:cancel``, ``:retry``, ``:wait``) read from a request, as pure functions.

The API mirrors the NATS write service (kvstate.service): the same event body, the same
64 KiB limit, ``If-Match`` for the revision. On top of it ``Idempotency-Key`` carries the
event id (draft-ietf-httpapi-idempotency-key-header). Every unusable value raises
BadQuery naming the header or field (400 through dashboard.errors), before anything is
written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import msgspec
from litestar.exceptions import MethodNotAllowedException, NotFoundException

from dashboard.errors import BadQuery
from kvstate import Event
from kvstate.keys import validate_id
from kvstate.service import MAX_REQUEST_BYTES

__all__ = [
    "APPLY_MAX_BODY",
    "DEFAULT_WAIT",
    "MAX_REASON",
    "MAX_WAIT",
    "METHODS",
    "RetryRequest",
    "cancel_reason",
    "decode_event",
    "idempotency_key",
    "if_match",
    "operation_method",
    "retry_request",
    "wait_timeout",
]

APPLY_MAX_BODY = MAX_REQUEST_BYTES
"""Largest body ``:apply`` takes (64 KiB): the write service's limit, whatever DASHBOARD_MAX_BODY says."""
MAX_WAIT = 60.0
"""Longest a ``:wait`` holds the request, in seconds (a larger ``timeout`` is cut to this)."""
DEFAULT_WAIT = 30.0
MAX_REASON = 500
MAX_KEY_LENGTH = 128

METHODS = {"apply": "POST", "cancel": "POST", "retry": "POST", "wait": "GET"}
"""The custom methods of an operation (AIP-136), with the HTTP method each takes."""

_REVISION = re.compile(r'([0-9]{1,19})|"([0-9]{1,19})"')
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)(ms|s)?")

_event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


class _EventId(msgspec.Struct):
    """Only the event id of a body (other members ignored): was one given, and which."""

    event_id: str | None = None


_event_id_decoder = msgspec.json.Decoder(_EventId)


def operation_method(name: str, http_method: str) -> tuple[str, str]:
    """``(operation id, method)`` of the path segment ``ID`` or ``ID:method`` (``operations/`` prefix allowed).

    An unknown method is a 404 and a known one asked with the other HTTP method a 405, as
    for any path; an invalid id is InvalidKey (400).
    """
    op_id, colon, method = name.removeprefix("operations/").partition(":")
    if colon:
        expected = METHODS.get(method)
        if expected is None:
            known = ", ".join(f"{verb} :{m}" for m, verb in METHODS.items())
            raise NotFoundException(f"an operation has no method :{method[:32]} (it has {known})")
        if expected != http_method:
            raise MethodNotAllowedException(f":{method} takes {expected}", headers={"Allow": expected})
    elif http_method != "GET":
        raise MethodNotAllowedException(
            "POST to an operation's method: ID:apply, ID:cancel or ID:retry", headers={"Allow": "GET"}
        )
    return validate_id(op_id), method


def if_match(headers: Mapping[str, str]) -> int | None:
    """The revision ``If-Match`` names (``"7"``, as the ETag gives it, or ``7``); None without one or for ``*``.

    An empty header is refused (BadQuery), not taken as "no condition".
    """
    raw = headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    if not raw.strip():  # as a script sends it when the variable holding the ETag is unset: never unconditional
        raise BadQuery("If-Match", 'empty: send the revision as the ETag gives it ("7"), or leave the header out')
    match = _REVISION.fullmatch(raw.strip())
    if match is None:
        raise BadQuery("If-Match", f'expected one revision as the ETag gives it ("7"), not {raw[:40]!r}')
    return int(match.group(1) or match.group(2))


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The ``Idempotency-Key`` (quoted, as a structured-field string, or bare), the event id of the write."""
    raw = headers.get("idempotency-key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable() or " " in key:
        raise BadQuery("Idempotency-Key", f"1-{MAX_KEY_LENGTH} printable ASCII characters without spaces")
    return key


def decode_event(body: bytes, key: str | None) -> Event:
    """The event of an ``:apply`` body (the tagged JSON of kvstate.events), its id set to ``key`` when given.

    The body's own ``event_id`` must then be absent or the same: two ids for one write
    would make a retry with either one a new event.
    """
    if not body.strip():
        raise BadQuery("body", 'empty: send one event, e.g. {"type": "succeed", "stage": "geo"}')
    try:
        event = _event_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadQuery("body", f"not a kvstate event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadQuery("body", f"not JSON: {exc}") from None
    if key is None:
        return event
    given = _event_id_decoder.decode(body).event_id
    if given is not None and given != key:
        raise BadQuery("Idempotency-Key", f"the body's event_id {given[:MAX_KEY_LENGTH]!r} is another id")
    return msgspec.structs.replace(event, event_id=key)


def cancel_reason(body: bytes, content_type: str, default: str) -> str:
    """The reason of a ``:cancel`` body (``{"reason": "..."}``, optional), ``default`` without one."""
    if not body.strip() or not content_type.startswith("application/json"):
        return default
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise BadQuery("body", "not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("reason", ""), str):
        raise BadQuery("body", 'expected {"reason": "..."}')
    reason: str = data.get("reason") or default
    if len(reason) > MAX_REASON:
        raise BadQuery("reason", f"at most {MAX_REASON} characters")
    return reason


class RetryRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``:retry``: why, the stages to run again (none: the failed stage), who."""

    reason: str
    stages: list[str] = []
    by: str | None = None


_retry_decoder = msgspec.json.Decoder(RetryRequest)


def retry_request(body: bytes) -> RetryRequest:
    """The ``:retry`` body, ``{"reason": "...", "stages": [...], "by": "..."}`` with a reason; else BadQuery."""
    if not body.strip():
        raise BadQuery("body", 'empty: send {"reason": "why", "stages": ["geo"]} (stages optional)')
    try:
        request = _retry_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadQuery("body", f"not a retry request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadQuery("body", f"not JSON: {exc}") from None
    reason = request.reason.strip()
    if not reason:
        raise BadQuery("reason", "say why the operation runs again")
    if len(reason) > MAX_REASON:
        raise BadQuery("reason", f"at most {MAX_REASON} characters")
    if request.by is not None and not 1 <= len(request.by) <= 64:
        raise BadQuery("by", "1-64 characters")
    return msgspec.structs.replace(request, reason=reason)


def wait_timeout(values: Sequence[str]) -> float:
    """Seconds a ``:wait`` may hold the request: ``timeout`` as a Duration (``30s``, ``1.5s``, ``500ms``) or
    seconds (``30``); 30 s when absent, at most 60 s."""
    if not values:
        return DEFAULT_WAIT
    if len(values) > 1:
        raise BadQuery("timeout", "give it at most once")
    match = _DURATION.fullmatch(values[0].strip())
    if match is None:
        raise BadQuery("timeout", f"a duration such as 30s or 500ms, not {values[0][:40]!r}")
    seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    return min(seconds, MAX_WAIT)
