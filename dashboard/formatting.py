"""Display text for templates: untrusted values (``show``), durations, ages, times, trace links.

Everything read from the bucket or the archive is untrusted: other services wrote it.
``show`` is the one function that turns such a value into text. It returns a plain str
(never Markup), which Jinja2's autoescape then escapes; on top of that it replaces
control and bidirectional-override characters with visible escapes, so a value can
neither inject markup nor disguise itself on screen. Pure functions only.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from kvstate import CorruptValue

__all__ = [
    "CORRUPT_PREVIEW_BYTES",
    "clip",
    "corrupt_text",
    "format_age",
    "format_duration",
    "format_time",
    "show",
    "trace_link",
]

CORRUPT_PREVIEW_BYTES = 512

# C0/C1 controls except tab and newline, DEL, and the Unicode bidi controls (Trojan Source).
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _printable(text: str) -> str:
    return _UNSAFE.sub(_escape_char, text)


def show(value: object) -> str:
    """Display text for any untrusted value.

    dicts and lists become pretty-printed JSON, strings stay as they are, bytes become
    a hex preview, a CorruptValue becomes "corrupt, revision N, first 512 bytes: ...".
    Control and bidi characters are shown escaped in every case.
    """
    if isinstance(value, CorruptValue):
        return corrupt_text(value.revision, value.raw, value.detail)
    if isinstance(value, bytes | bytearray | memoryview):
        return _hex_preview(bytes(value))
    if isinstance(value, str):
        return _printable(value)
    if value is None:
        return "null"
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=_json_default)
    except (TypeError, ValueError):
        text = repr(value)
    return _printable(text)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _hex_preview(data: bytes) -> str:
    head = data[:CORRUPT_PREVIEW_BYTES]
    lines = []
    for offset in range(0, len(head), 16):
        chunk = head[offset : offset + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:04x}  {chunk.hex(' '):<47}  {text}")
    return "\n".join(lines)


def corrupt_text(revision: int, raw: bytes, detail: str | None = None) -> str:
    """The display of a value that is not an operation: its revision and its first 512 bytes."""
    shown = min(len(raw), CORRUPT_PREVIEW_BYTES)
    head = f"corrupt, revision {revision}, first {shown} of {len(raw)} bytes"
    if detail:
        head += f"\n({_printable(clip(detail, 300))})"
    return head + ":\n" + _hex_preview(raw)


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_duration(seconds: float | timedelta | None) -> str:
    """A short human duration: 850ms, 4.2s, 3m 10s, 2h 5m; "-" when unknown."""
    if seconds is None:
        return "-"
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    return f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"


def format_age(then: float | datetime | None, now: float) -> str:
    """How long ago ``then`` was, as a short duration."""
    if then is None:
        return "-"
    if isinstance(then, datetime):
        then = then.timestamp()
    return format_duration(now - then)


def format_time(when: float | datetime | None) -> str:
    """An ISO-8601 UTC timestamp to the second ("-" when unknown)."""
    if when is None:
        return "-"
    if isinstance(when, float | int):
        when = datetime.fromtimestamp(when, UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def trace_link(template: str | None, trace_id: str | None) -> str | None:
    """The tracing backend's URL of ``trace_id`` from DASHBOARD_TRACE_URL's ``template`` (None: no link).

    The trace id comes from the bucket, so it is untrusted: only a W3C trace id (32 lowercase
    hex digits, what kvstate records) gets a link, and it is percent-quoted into the template
    all the same. ``str.replace``, not ``str.format``: a template may hold other braces.
    """
    if not template or not trace_id or _TRACE_ID.fullmatch(trace_id) is None:
        return None
    return template.replace("{trace_id}", quote(trace_id, safe=""))
