"""Bulk jobs in the bucket: ``JobStore`` reads and writes the records, ``JobRunner`` runs one.

    jobs = JobStore(client)
    job = await jobs.create(new_job(new_ulid(), "cancel", ids, utcnow(), filter=..., reason=..., ...))
    job = await JobRunner(client, owner="ops-1").run(job.id)      # until it ends, or stop is set

Every write of a job record is a compare-and-set on the revision it was computed from, by
the pure transitions of ``kvstate.jobs``; a conflict re-reads the record and decides again.
A runner reads the record before each step, so a cancel (written by anyone) stops it before
the next operation, and a takeover after its lease expired stops it at its next write.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from kvstate._time import new_ulid, utcnow
from kvstate.backoff import Backoff
from kvstate.client import Client
from kvstate.codec import decode_job, encode_job
from kvstate.errors import (
    BucketError,
    ClientClosedError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    InvalidJob,
    JobBusy,
    JobNotFound,
    KvstateError,
    NotRetryable,
    OperationNotFound,
    ValueTooLarge,
)
from kvstate.jobs import (
    Job,
    JobAction,
    StepResult,
    acquire,
    cancel_job,
    event_id_for,
    finish,
    holds_lease,
    next_target,
    pause,
    record,
    release,
    renew,
)
from kvstate.keys import JOB_PREFIX, job_key
from kvstate.model import Outcome

__all__ = ["JobRunner", "JobStore", "runner_name"]

log = logging.getLogger("kvstate.jobs")

T = TypeVar("T")

_TRANSIENT = (ConnectionLostError, ConflictError, BucketError)
"""errors a later try gets past: the step is tried again, the job is not advanced"""
_STEP_BACKOFF = Backoff(first=0.2, cap=5.0)


def runner_name(kind: str) -> str:
    """A lease owner name unique to this process: ``kind@host:pid:ulid``."""
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{new_ulid()[-8:]}"


class JobStore:
    """The job records of the bucket of ``client``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def create(self, job: Job) -> Job:
        """Store a new job (revision-checked creation); InvalidJob when its record is over the bucket's value size."""
        store = self._client._open_store()
        try:
            data = encode_job(job, self._client.settings.max_value_size)
        except ValueTooLarge as exc:
            raise InvalidJob(
                f"a job of {len(job.targets)} operations is {exc.size} bytes, over the bucket's value size of "
                f"{exc.limit}: narrow the filter"
            ) from exc
        revision = await store.create(job_key(job.id), data)
        return _with_revision(job, revision)

    async def get(self, job_id: str) -> Job:
        """The job ``job_id`` read from the stream leader (coherent); JobNotFound when there is none."""
        key = job_key(job_id)
        entry = await self._client._open_store().get(key, leader=True)
        if entry is None or entry.value is None:
            raise JobNotFound(job_id)
        return decode_job(key, entry.revision, entry.value)

    async def list(self) -> builtins.list[Job]:
        """Every job in the bucket, newest first (corrupt records skipped with a warning)."""
        found = []
        async for entry in self._client._open_store().scan(JOB_PREFIX + "*"):
            try:
                found.append(decode_job(entry.key, entry.revision, entry.value or b""))
            except CorruptValue as exc:
                log.warning("skipping corrupt job record: %s", exc)
        found.sort(key=lambda job: (job.created_at, job.id), reverse=True)
        return found

    async def update(self, job_id: str, change: Callable[[Job], Job]) -> Job:
        """Apply the pure ``change`` to the job under compare-and-set (re-read and re-applied on a conflict).

        ``change`` may run several times; returning the same job writes nothing.
        """
        key = job_key(job_id)
        attempts = self._client.settings.max_retries
        for attempt in range(1, attempts + 1):
            job = await self.get(job_id)
            new = change(job)
            if new is job:
                return job
            try:
                revision = await self._client._open_store().update(key, encode_job(new), job.revision)
            except ConflictError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(_STEP_BACKOFF.delay(1) / 10)
                continue
            return _with_revision(new, revision)
        raise ConflictError(key, None, attempts)  # pragma: no cover - the loop returns or raises

    async def cancel(self, job_id: str, *, by: str | None = None, reason: str | None = None) -> Job:
        """Cancel the job (its runner stops before its next operation); JobFinished once it ended."""
        return await self.update(job_id, lambda job: cancel_job(job, utcnow(), by=by, reason=reason))


class JobRunner:
    """Runs jobs of the bucket of ``client`` under the lease owner name ``owner``.

    ``on_step`` (tests and progress displays) is called with the job after each recorded step.
    """

    def __init__(
        self,
        client: Client,
        *,
        owner: str | None = None,
        on_step: Callable[[Job], None] | None = None,
    ) -> None:
        self._client = client
        self.jobs = JobStore(client)
        self.owner = owner or runner_name("kvstate")
        self._on_step = on_step

    async def run(self, job_id: str, stop: asyncio.Event | None = None) -> Job:
        """Run the job from where it is until it ends; returns its final record.

        Takes the lease first (JobFinished once the job ended, JobBusy while another runner's
        lease holds). When ``stop`` is set it leaves the job paused at the next step, resumable.
        It stops as well, leaving the record as it is, when another runner took the job over.
        """
        stop = stop or asyncio.Event()
        owner = self.owner
        job = await self.jobs.update(job_id, lambda j: acquire(j, owner, utcnow()))
        log.info("job %s: running (%s of %d operations done)", job_id, job.cursor, len(job.targets))
        pace = _Pace(job.rate, job.lease_seconds)
        while True:
            current = await self._steady(lambda: self.jobs.get(job_id), stop)
            if current is None:  # stop set during an outage: the lease expires and the job can be resumed
                raise ConnectionLostError(f"job {job_id}: stopped while NATS could not be reached")
            job = current
            if job.done:
                return await self.jobs.update(job_id, lambda j: release(j, owner, utcnow()))
            if not holds_lease(job, owner):
                holder = job.lease.owner if job.lease is not None else "nobody"
                log.warning("job %s: taken over by %s; this runner stops", job_id, holder)
                return job
            if stop.is_set():
                return await self.jobs.update(job_id, lambda j: pause(j, owner, utcnow()))
            op_id = next_target(job)
            if op_id is None:
                done = await self.jobs.update(job_id, lambda j: finish(j, owner, utcnow()))
                log.info("job %s: %s %s", job_id, done.state.value, _counts(done))
                return done
            if await self._step(job, op_id, stop):
                await pace.wait(stop, lambda: self._renew(job_id))

    async def _step(self, job: Job, op_id: str, stop: asyncio.Event) -> bool:
        """Change ``op_id`` and record what that did; False when ``stop`` was set while it could not be done."""
        step = await self._steady(lambda: self._apply(job, op_id), stop)
        if step is None:
            return False  # the next round pauses the job, this operation not counted
        result, message = step
        owner = self.owner
        try:
            recorded = await self._steady(
                lambda: self.jobs.update(job.id, lambda j: record(j, op_id, result, message, owner, utcnow())), stop
            )
        except JobBusy:  # taken over meanwhile: the new runner finds this operation applied (a duplicate)
            return False
        if recorded is None:
            return False  # applied but not recorded: a resumed runner finds it applied (a duplicate)
        if self._on_step is not None:
            self._on_step(recorded)
        return True

    async def _renew(self, job_id: str) -> None:
        """Extend the lease while waiting for the next step; a failure is left to the next round to notice."""
        try:
            await self.jobs.update(job_id, lambda j: j if j.done else renew(j, self.owner, utcnow()))
        except (JobBusy, *_TRANSIENT) as exc:
            log.warning("job %s: could not renew the lease: %s", job_id, exc)

    async def _apply(self, job: Job, op_id: str) -> tuple[StepResult, str | None]:
        """One operation changed under the job's event id for it, and what that did."""
        event_id = event_id_for(job.id, op_id)
        try:
            if job.action is JobAction.CANCEL:
                result = await self._client.cancel(op_id, reason=job.reason, by=job.by, event_id=event_id)
            else:
                result = await self._client.retry(
                    op_id, job.stages or None, reason=job.reason, by=job.by, event_id=event_id
                )
        except OperationNotFound:
            return StepResult.SKIPPED, "not in the bucket any more (archived or removed)"
        except NotRetryable as exc:
            return StepResult.SKIPPED, str(exc)
        except _TRANSIENT:
            raise
        except ClientClosedError:
            raise
        except KvstateError as exc:
            return StepResult.FAILED, str(exc)
        if result.outcome is Outcome.STALE:
            return StepResult.SKIPPED, result.reason
        return StepResult.APPLIED, None  # applied now, or a duplicate: applied by this job before

    async def _steady(self, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
        """``attempt()`` tried again with backoff while NATS cannot be reached; None once ``stop`` is set meanwhile."""
        tries = 0
        while True:
            try:
                return await attempt()
            except _TRANSIENT as exc:
                tries += 1
                if stop.is_set():
                    return None
                log.warning("job step failed (try %d, trying again): %s", tries, exc)
                try:
                    await asyncio.wait_for(stop.wait(), _STEP_BACKOFF.delay(tries))
                except TimeoutError:
                    continue


class _Pace:
    """At most ``rate`` steps per second, waiting on ``stop``, renewing the lease during long waits."""

    def __init__(self, rate: float, lease_seconds: float) -> None:
        self.interval = 1.0 / rate
        self.renew_every = lease_seconds / 3
        self.next_at = time.monotonic()

    async def wait(self, stop: asyncio.Event, renew: Callable[[], Awaitable[None]]) -> None:
        """Wait for the next step's turn, or until ``stop`` is set."""
        self.next_at = max(self.next_at + self.interval, time.monotonic())
        while (left := self.next_at - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(stop.wait(), min(left, self.renew_every))
                return
            except TimeoutError:
                if self.next_at - time.monotonic() > 0:
                    await renew()


def _counts(job: Job) -> str:
    c = job.counts
    return f"matched={c.matched} applied={c.applied} skipped={c.skipped} failed={c.failed}"


def _with_revision(job: Job, revision: int) -> Job:
    return msgspec.structs.replace(job, revision=revision)
