"""Every exception the archiver adds to kvstate's tree.

kvstate.KvstateError
├── ArchiverError                 base of the archiver's own errors
│   ├── ArchiveUnavailable        PostgreSQL could not be reached or refused the batch
│   │   └── ArchiveAccessDenied   PostgreSQL refused this role: a wrong password or user, or a missing grant
│   └── MigrationError            the archive schema is newer than this archiver, or a migration failed
└── kvstate.ValidationError
    ├── InvalidPageToken          a page token that this archive did not hand out
    └── InvalidQuery              a search argument out of range (status, limit, ...)
"""

from __future__ import annotations

from kvstate.errors import KvstateError, ValidationError

__all__ = [
    "ArchiveAccessDenied",
    "ArchiveUnavailable",
    "ArchiverError",
    "InvalidPageToken",
    "InvalidQuery",
    "MigrationError",
]


class ArchiverError(KvstateError):
    """Base class of the archiver's own errors."""


class ArchiveUnavailable(ArchiverError):
    """PostgreSQL could not be reached, or the transaction failed; nothing was acknowledged."""

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        self.detail = detail
        self.hint = hint
        extra = "".join(f" ({label}: {text})" for label, text in (("detail", detail), ("hint", hint)) if text)
        super().__init__(message + extra)


class ArchiveAccessDenied(ArchiveUnavailable):
    """PostgreSQL refused this role: a wrong password or user name, or a privilege it lacks (a reader
    that is not a member of the reader role, a write through a read-only role)."""


class MigrationError(ArchiverError):
    """The archive schema could not be brought to the version this archiver needs."""


class InvalidPageToken(ValidationError):
    """A page token that is not one the archive handed out (or was altered)."""

    def __init__(self, token: str, reason: str) -> None:
        self.token = token
        self.reason = reason
        super().__init__(f"invalid page token {token[:40]!r}: {reason}")


class InvalidQuery(ValidationError):
    """A search argument the archive cannot use (unknown status, limit out of range, bad metadata)."""
