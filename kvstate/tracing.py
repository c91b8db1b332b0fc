"""Trace context: the W3C ``traceparent`` a service passes in, reduced to the trace id kvstate records.

An operation records the trace it was created in (``Operation.trace_id``) and each stage
attempt the trace it ran in (``StageState.trace_id``), so the dashboard can link an
operation and each attempt to a tracing backend (DASHBOARD_TRACE_URL).
"""

from __future__ import annotations

import re

from kvstate.errors import ValidationError

__all__ = ["trace_id_from"]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32


def trace_id_from(value: str) -> str:
    """The trace id of a W3C ``traceparent`` header (``00-<trace id>-<parent id>-<flags>``), or of a bare
    32-hex-digit trace id; ValidationError for anything else (W3C Trace Context: version ff and an
    all-zero trace id are invalid)."""
    text = value.strip().lower()
    if _TRACE_ID.fullmatch(text):
        trace = text
    else:
        match = _TRACEPARENT.fullmatch(text)
        if match is None or match.group(1) == "ff" or match.group(3) == "0" * 16:
            raise ValidationError(f"not a W3C traceparent or trace id: {value[:80]!r}")
        trace = match.group(2)
    if trace == _ZERO_TRACE:
        raise ValidationError("the all-zero trace id is invalid (W3C Trace Context)")
    return trace
