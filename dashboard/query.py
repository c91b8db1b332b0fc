"""Parsing list filters and page tokens from URLs, and writing them back into URLs.

Filters live in the query string so a view can be shared: ``status`` (repeatable or
comma-separated), ``pipeline``, ``stage``, ``stage_status``, ``worker``, ``id`` (a
prefix), ``created_after`` / ``created_before`` (ISO 8601, UTC when no offset),
``meta`` (``key=value`` or ``key``), ``stuck`` (``1``: only operations with a stuck stage,
with ``stage``: that stage stuck), ``order`` (``newest`` or ``oldest``). The JSON API
also takes the same terms as one ``filter`` string: ``status=running AND stage=geo``.

The archive search reads its own filters (``ARCHIVE_FILTERS``) into an ``ArchiveQuery``:
the same for the /archive page and the JSON API.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from dashboard.errors import BadQuery
from dashboard.planner import OperationFilter
from dashboard.summary import CORRUPT
from kvstate import OpStatus, StageStatus
from kvstate.keys import validate_id

__all__ = [
    "ARCHIVE_FILTERS",
    "FILTER_KEYS",
    "ArchiveQuery",
    "archive_query",
    "decode_page_token",
    "encode_page_token",
    "filter_params",
    "parse_filter",
    "parse_filter_expression",
    "parse_time",
]

FILTER_KEYS = (
    "status",
    "pipeline",
    "stage",
    "stage_status",
    "worker",
    "id",
    "created_after",
    "created_before",
    "meta",
    "stuck",
    "order",
)
ARCHIVE_FILTERS = ("status", "failed_stage", "pipeline", "id", "finished_after", "finished_before", "meta")
"""The archive search's filters (the /archive page and /api/archive/operations)."""
_STATUSES = {s.value for s in OpStatus} | {CORRUPT}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TEXT_LIMIT = 128


def _values(params: Mapping[str, Sequence[str]], key: str) -> list[str]:
    return [v.strip() for v in params.get(key, ()) if v.strip()]


def _one(params: Mapping[str, Sequence[str]], key: str) -> str | None:
    values = _values(params, key)
    if len(values) > 1:
        raise BadQuery(key, "give it at most once")
    if values and len(values[0]) > _TEXT_LIMIT:
        raise BadQuery(key, f"longer than {_TEXT_LIMIT} characters")
    return values[0] if values else None


def _name(params: Mapping[str, Sequence[str]], key: str) -> str | None:
    value = _one(params, key)
    if value is not None and _NAME.fullmatch(value) is None:
        raise BadQuery(key, "may only hold A-Z a-z 0-9 _ -")
    return value


def parse_time(value: str, field: str) -> float:
    """An ISO-8601 time (UTC when it has no offset) as epoch seconds; BadQuery otherwise.

    The time must fall within years 1-9999 in UTC too (``0001-01-01T00:00+01:00`` does
    not), so the result always converts back to a ``datetime``.
    """
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadQuery(field, "not an ISO-8601 time such as 2025-01-31T12:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        epoch = when.timestamp()
        datetime.fromtimestamp(epoch, UTC)
    except (ValueError, OverflowError, OSError):
        raise BadQuery(field, "out of range: the time must fall within years 1 to 9999 in UTC") from None
    return epoch


def parse_filter(params: Mapping[str, Sequence[str]]) -> OperationFilter:
    """The filter a query string describes; BadQuery naming the field on bad input."""
    unknown = sorted(set(params) - set(FILTER_KEYS) - {"page_token", "page_size", "filter"})
    if unknown:
        raise BadQuery(unknown[0], f"unknown filter (known: {', '.join(FILTER_KEYS)})")
    statuses = {s.strip() for v in _values(params, "status") for s in v.split(",") if s.strip()}
    bad = sorted(statuses - _STATUSES)
    if bad:
        raise BadQuery("status", f"unknown status {bad[0]!r} (known: {', '.join(sorted(_STATUSES))})")
    stage_status = _one(params, "stage_status")
    try:
        parsed_stage_status = StageStatus(stage_status) if stage_status is not None else None
    except ValueError:
        known = ", ".join(s.value for s in StageStatus)
        raise BadQuery("stage_status", f"unknown stage status (known: {known})") from None
    stage = _name(params, "stage")
    if parsed_stage_status is not None and stage is None:
        raise BadQuery("stage_status", "needs a stage")
    meta = _one(params, "meta")
    meta_key = meta_value = None
    if meta is not None:
        meta_key, sep, rest = meta.partition("=")
        meta_key = meta_key.strip()
        if not meta_key:
            raise BadQuery("meta", "write key=value or key")
        meta_value = rest.strip() if sep else None
    stuck = _one(params, "stuck") or "0"
    if stuck not in ("0", "1", "false", "true"):
        raise BadQuery("stuck", "1 (only operations with a stuck stage) or 0")
    order = _one(params, "order") or "newest"
    if order not in ("newest", "oldest"):
        raise BadQuery("order", "newest or oldest")
    after = _one(params, "created_after")
    before = _one(params, "created_before")
    return OperationFilter(
        statuses=frozenset(statuses),
        pipeline=_name(params, "pipeline"),
        stage=stage,
        stage_status=parsed_stage_status,
        worker=_one(params, "worker"),
        id_prefix=_name(params, "id"),
        created_after=parse_time(after, "created_after") if after else None,
        created_before=parse_time(before, "created_before") if before else None,
        meta_key=meta_key,
        meta_value=meta_value,
        stuck=stuck in ("1", "true"),
        newest_first=order == "newest",
    )


def parse_filter_expression(expression: str) -> dict[str, list[str]]:
    """``status=running AND stage=geo`` as query parameters (AIP-160 style, AND only)."""
    params: dict[str, list[str]] = {}
    for term in re.split(r"\s+AND\s+|\s+", expression.strip()):
        if not term:
            continue
        key, sep, value = term.partition("=")
        if not sep or not key:
            raise BadQuery("filter", f"term {term[:40]!r} is not key=value")
        if key == "meta" or key.startswith("meta."):
            key, value = "meta", (key[5:] + "=" + value if key.startswith("meta.") else value)
        params.setdefault(key, []).append(value)
    return params


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def filter_params(flt: OperationFilter, **overrides: str | Iterable[str] | None) -> list[tuple[str, str]]:
    """The query parameters that reproduce ``flt`` (fields in ``overrides`` replaced or, with None, dropped)."""
    fields: dict[str, list[str]] = {
        "status": sorted(flt.statuses),
        "pipeline": [flt.pipeline] if flt.pipeline else [],
        "stage": [flt.stage] if flt.stage else [],
        "stage_status": [flt.stage_status.value] if flt.stage_status else [],
        "worker": [flt.worker] if flt.worker else [],
        "id": [flt.id_prefix] if flt.id_prefix else [],
        "created_after": [_iso(flt.created_after)] if flt.created_after is not None else [],
        "created_before": [_iso(flt.created_before)] if flt.created_before is not None else [],
        "meta": [flt.meta_key + ("=" + flt.meta_value if flt.meta_value is not None else "")] if flt.meta_key else [],
        "stuck": ["1"] if flt.stuck else [],
        "order": [] if flt.newest_first else ["oldest"],
    }
    for key, value in overrides.items():
        if value is None:
            fields[key] = []
        elif isinstance(value, str):
            fields[key] = [value]
        else:
            fields[key] = list(value)
    return [(key, v) for key, values in fields.items() for v in values]


def query_string(pairs: Iterable[tuple[str, str]]) -> str:
    """URL-encoded query string of ``pairs``."""
    return urlencode(list(pairs))


def encode_page_token(cursor: tuple[float, str]) -> str:
    """An opaque page token for an index cursor (created, id)."""
    created, op_id = cursor
    return base64.urlsafe_b64encode(f"{created!r}|{op_id}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[float, str]:
    """The index cursor in a page token; BadQuery when it was not made by ``encode_page_token``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, op_id = raw.split("|", 1)
        cursor = (float(created), op_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery("page_token", "not a page token this dashboard issued") from None
    if _NAME.fullmatch(op_id) is None:
        raise BadQuery("page_token", "not a page token this dashboard issued")
    return cursor


# ---------------------------------------------------------------------- archive search


def _metadata_filter(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise BadQuery("meta", 'write key=value (the value may be JSON: 42, true, "text")')
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value.strip()
    if _holds_nul(parsed) or "\x00" in key:
        # PostgreSQL's jsonb cannot hold a NUL (\u0000): no archived value has one, and the query would fail
        raise BadQuery("meta", "a NUL character (\\u0000) cannot be in an archived value")
    return {key.strip(): parsed}


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


@dataclass(frozen=True, slots=True)
class ArchiveQuery:
    """An archive search read from the query string: the same for the /archive page and the API."""

    criteria: dict[str, Any]  # keyword arguments of ArchiveAccess.search
    statuses: list[str]
    form: dict[str, str]  # the text fields as given, to fill the page's search form again
    page_token: str | None


def archive_query(params: Mapping[str, Sequence[str]]) -> ArchiveQuery:
    """The archive filters in ``params`` (``page_token`` included); BadQuery names the first unusable one."""

    def one(key: str) -> str | None:
        values = [v.strip() for v in params.get(key, ()) if v.strip()]
        if len(values) > 1:
            raise BadQuery(key, "give it at most once")
        if values and len(values[0]) > 256:
            raise BadQuery(key, "too long")
        return values[0] if values else None

    unknown = sorted(set(params) - {*ARCHIVE_FILTERS, "page_token"})
    if unknown:
        raise BadQuery(unknown[0], "unknown archive filter")
    statuses = sorted({s.strip() for v in params.get("status", ()) for s in v.split(",") if s.strip()})
    terminal = {s.value for s in OpStatus if s.terminal}
    if set(statuses) - terminal:
        raise BadQuery("status", f"archived operations are {', '.join(sorted(terminal))}")
    after, before = one("finished_after"), one("finished_before")
    criteria: dict[str, Any] = {
        "status": statuses,
        "failed_stage": one("failed_stage"),
        "pipeline": one("pipeline"),
        "id_prefix": one("id"),
        "finished_after": datetime.fromtimestamp(parse_time(after, "finished_after"), UTC) if after else None,
        "finished_before": datetime.fromtimestamp(parse_time(before, "finished_before"), UTC) if before else None,
        "metadata": _metadata_filter(one("meta")),
    }
    for key in ("failed_stage", "pipeline", "id_prefix"):
        value = criteria[key]
        if value is not None:
            validate_id(str(value), key.replace("_", " "))
    form = {k: one(k) or "" for k in ARCHIVE_FILTERS if k != "status"}
    return ArchiveQuery(criteria, statuses, form, one("page_token"))
