"""The key scheme of the bucket, and validation of ids and names.

Keys (documented in docs/state-format.md):

    op.<operation id>       one operation's live state (JSON, schema "kvstate.operation")
    pipeline.<name>         one pipeline definition (JSON, schema "kvstate.pipeline")
    job.<job id>            one bulk job (JSON, kvstate.jobs.Job); watchers and the change feed
                            follow ``op.`` keys only, so they never see these

Ids and names are 1-128 characters of ``A-Z a-z 0-9 _ -``: legal in NATS subjects, no
dots (so one id is one subject token) and no wildcards.
"""

from __future__ import annotations

import re

from kvstate.errors import InvalidKey

__all__ = [
    "JOB_PREFIX",
    "OPERATION_PREFIX",
    "PIPELINE_PREFIX",
    "job_key",
    "operation_id_from_key",
    "operation_key",
    "pipeline_key",
    "validate_id",
    "validate_stage_name",
]

OPERATION_PREFIX = "op."
PIPELINE_PREFIX = "pipeline."
JOB_PREFIX = "job."
MAX_ID_LENGTH = 128

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STAGE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_id(value: str, what: str = "operation id") -> str:
    """Return ``value`` when it is a legal id, else raise InvalidKey saying why."""
    if not isinstance(value, str):
        raise InvalidKey(repr(value), f"{what} must be a string")
    if _ID_RE.fullmatch(value) is None:
        if not value:
            reason = f"{what} is empty"
        elif len(value) > MAX_ID_LENGTH:
            reason = f"{what} is {len(value)} characters, the limit is {MAX_ID_LENGTH}"
        else:
            bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "_-"))})
            reason = f"{what} may only hold A-Z a-z 0-9 _ - (found {''.join(bad)!r})"
        raise InvalidKey(value, reason)
    return value


def validate_stage_name(value: str) -> str:
    """Return ``value`` when it is a legal stage name (1-64 of A-Z a-z 0-9 _ -)."""
    if not isinstance(value, str) or _STAGE_RE.fullmatch(value) is None:
        raise InvalidKey(str(value), "stage names are 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def operation_key(op_id: str) -> str:
    """The bucket key holding operation ``op_id``."""
    return OPERATION_PREFIX + validate_id(op_id)


def pipeline_key(name: str) -> str:
    """The bucket key holding pipeline ``name``."""
    return PIPELINE_PREFIX + validate_id(name, "pipeline name")


def job_key(job_id: str) -> str:
    """The bucket key holding bulk job ``job_id``."""
    return JOB_PREFIX + validate_id(job_id, "job id")


def operation_id_from_key(key: str) -> str | None:
    """The operation id in an ``op.<id>`` key, or None for any other key."""
    if key.startswith(OPERATION_PREFIX):
        return key[len(OPERATION_PREFIX) :]
    return None
