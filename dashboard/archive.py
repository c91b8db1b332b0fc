"""Read access to the PostgreSQL archive, through ``archiver.read`` and ``archiver.errors`` only.

The archive is optional: without DASHBOARD_DATABASE_URL (or DATABASE_URL) the archive
pages say it is not configured; when PostgreSQL cannot be reached, or refuses the
dashboard's role, they say so and the dashboard tries to connect again on a later request
(at most every ``retry_after`` seconds). The reader raises only archiver errors: its
``ArchiveUnavailable`` becomes ``dashboard.errors.ArchiveUnavailable`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from archiver import errors as archiver_errors
from dashboard.errors import ArchiveUnavailable, BadQuery

if TYPE_CHECKING:
    from archiver.read import ArchivedOperation, ArchivePage, ArchiveReader
    from kvstate import Client, UpdateResult

__all__ = ["READER_FALLBACK_WARNING", "ArchiveAccess"]

log = logging.getLogger("dashboard.archive")

READER_FALLBACK_WARNING = (
    "DASHBOARD_DATABASE_URL is unset: the dashboard reads the archive with DATABASE_URL, the archiver's role, "
    "which may write; give it a read-only role (docs/security.md#postgresql)"
)

_UNREACHABLE = (
    TimeoutError,  # the connect timeout of this module
    archiver_errors.ArchiveUnavailable,
)


class ArchiveAccess:
    """The dashboard's handle on the archive: connects lazily, reports why it cannot."""

    def __init__(self, dsn: str | None, *, connect_timeout: float = 5.0, retry_after: float = 15.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._reader: ArchiveReader | None = None
        self._stack = contextlib.AsyncExitStack()
        self._problem: str | None = None if dsn else "the archive is not configured (set DASHBOARD_DATABASE_URL)"
        self._last_attempt = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        """True when DATABASE_URL is set."""
        return self.dsn is not None

    @property
    def problem(self) -> str | None:
        """Why the archive cannot be read right now (None when it can)."""
        return self._problem

    async def open(self) -> None:
        """Try to connect now (a failure is remembered, not raised)."""
        if self.dsn is None:
            return
        async with self._lock:
            await self._connect()

    async def _connect(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            from archiver.read import ArchiveReader  # the archiver extra may be missing
        except ImportError as exc:
            self._problem = f"the archive reader is not installed ({exc})"
            return
        assert self.dsn is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader = await self._stack.enter_async_context(ArchiveReader.connect(self.dsn))
            self._problem = None
        except _UNREACHABLE as exc:
            self._reader = None
            self._problem = _describe(exc)
            log.warning("archive unavailable: %s", self._problem)

    async def close(self) -> None:
        """Close the reader's pool."""
        self._reader = None
        await self._stack.aclose()

    async def _ready(self) -> ArchiveReader:
        if self._reader is not None:
            return self._reader
        if self.dsn is not None and time.monotonic() - self._last_attempt >= self.retry_after:
            async with self._lock:
                if self._reader is None:
                    await self._connect()
        if self._reader is None:
            raise ArchiveUnavailable(self._problem or "the archive is unavailable")
        return self._reader

    async def get(self, op_id: str) -> ArchivedOperation | None:
        """The archived operation ``op_id`` (None when it is not archived)."""
        reader = await self._ready()
        try:
            return await reader.get(op_id)
        except _UNREACHABLE as exc:
            raise self._lost(exc) from exc

    async def search(
        self,
        *,
        status: Sequence[str] | None,
        failed_stage: str | None,
        pipeline: str | None,
        id_prefix: str | None,
        finished_after: datetime | None,
        finished_before: datetime | None,
        metadata: Mapping[str, Any] | None,
        limit: int,
        page_token: str | None,
    ) -> ArchivePage:
        """One page of archived operations, newest first (keyset pagination); BadQuery names an unusable filter."""
        reader = await self._ready()
        try:
            return await reader.search(
                status=list(status) if status else None,
                failed_stage=failed_stage,
                pipeline=pipeline,
                id_prefix=id_prefix,
                finished_after=finished_after,
                finished_before=finished_before,
                metadata=dict(metadata) if metadata else None,
                limit=limit,
                page_token=page_token,
            )
        except archiver_errors.InvalidPageToken as exc:
            raise BadQuery("page_token", str(exc)) from exc
        except archiver_errors.InvalidQuery as exc:
            raise BadQuery("archive search", str(exc)) from exc
        except _UNREACHABLE as exc:
            raise self._lost(exc) from exc

    async def redrive(
        self,
        client: Client,
        op_id: str,
        stages: Sequence[str] | None,
        *,
        reason: str,
        by: str | None,
        event_id: str | None = None,
    ) -> UpdateResult:
        """Put archived ``op_id`` back into the bucket (``archiver.read.redrive``, the same refusals)."""
        from archiver.read import redrive

        reader = await self._ready()
        try:
            return await redrive(reader, client, op_id, stages, reason=reason, by=by, event_id=event_id)
        except _UNREACHABLE as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: BaseException) -> ArchiveUnavailable:
        self._problem = _describe(exc)
        return ArchiveUnavailable(self._problem)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, archiver_errors.ArchiveAccessDenied):
        return f"PostgreSQL refused the dashboard's role ({exc}); see docs/security.md#postgresql"
    return f"PostgreSQL is unreachable ({exc or type(exc).__name__})"
