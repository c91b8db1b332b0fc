"""The audit log: one structured line per write and per refused login, on the ``dashboard.audit`` logger.

Each line is ``audit {json}`` with ``event`` (the write's action: ``cancel``, ``apply``,
any later one by its route; or ``login.refused``), ``who`` (``token:<id>``, the
fingerprint of the token used, or ``anonymous``; never a token or a password: a refused
login records only that credentials were wrong), ``user`` (the basic-auth user name, as
given: unverified), ``client`` (the address), ``method`` and ``path``, ``operation``
(the id the path names), and for writes the HTTP ``status`` and, when the API reports it,
``outcome`` (``applied``, ``duplicate``, ``stale``). JSON escapes every control
character, so a hostile path or user name cannot forge a line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Principal", "audit", "audit_log", "token_id"]

audit_log = logging.getLogger("dashboard.audit")

ANONYMOUS = "anonymous"
_MAX_FIELD = 200


def token_id(token: str) -> str:
    """``token:`` and the first 8 hex digits of the token's SHA-256: tells tokens apart in the log (one
    before and one after a rotation) without recording the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: ``who`` as the audit log names it, how they authenticated, the user name given."""

    who: str = ANONYMOUS
    scheme: str | None = None  # "bearer", "basic" or "form"; None: not authenticated
    user: str | None = None

    @property
    def authenticated(self) -> bool:
        """True when the request presented the dashboard's token."""
        return self.scheme is not None


def _clip(value: object) -> object:
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return value[: _MAX_FIELD - 1] + "…"
    return value


def audit(event: str, principal: Principal, client: str, **facts: object) -> None:
    """Write one audit line: ``event`` by ``principal`` from ``client``, with ``facts`` (None values left out)."""
    record: dict[str, object] = {"event": event, "who": principal.who}
    if principal.user is not None:
        record["user"] = principal.user
    record["client"] = client
    record.update((name, value) for name, value in facts.items() if value is not None)
    audit_log.info("audit %s", json.dumps({name: _clip(value) for name, value in record.items()}))
