"""The kvstate client: what pipeline services import to report and read operation state.

    async with kvstate.Client(Settings.from_env(os.environ)) as client:
        op = await client.create("orders", metadata={"customer": 42})
        await client.start(op.id, "ingest", worker="ingest-1")
        await client.succeed(op.id, "ingest", metadata={"bytes": 1234})

Every write after creation is a compare-and-set on the revision it was computed from,
through the group committer (kvstate._committer). Each update returns an UpdateResult
saying whether it was applied, a duplicate (same event id seen before) or stale (too
late for the state machine); only real errors raise.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version as package_version
from types import TracebackType
from typing import Self

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from kvstate._committer import GroupCommitter, Mutation, RevisionCache
from kvstate._connection import connect
from kvstate._kv import BucketConfig, KvStore, nats_errors
from kvstate._time import new_ulid, utcnow
from kvstate.backoff import Backoff
from kvstate.codec import (
    decode_operation,
    decode_pipeline,
    encode_operation,
    encode_pipeline,
    normalize_json_object,
)
from kvstate.errors import (
    ClientClosedError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    KvstateError,
    OperationExists,
    OperationNotFound,
    RevisionMismatch,
    ServerVersionError,
    UnknownPipeline,
    ValidationError,
    WaitTimeout,
)
from kvstate.events import (
    Cancel,
    Event,
    FailStage,
    Heartbeat,
    MergeMetadata,
    Reopen,
    SkipStage,
    StartStage,
    SucceedStage,
)
from kvstate.feed import ChangeFeed
from kvstate.keys import OPERATION_PREFIX, PIPELINE_PREFIX, operation_key, pipeline_key, validate_id
from kvstate.machine import Decision, already_applied, apply_event, new_operation, redrive, retry
from kvstate.metrics import ClientMetrics
from kvstate.model import BucketInfo, JSONObject, Operation, OpStatus, Outcome, StageStatus, UpdateResult
from kvstate.pipeline import Pipeline
from kvstate.settings import Settings
from kvstate.tracing import trace_id_from
from kvstate.watch import Watcher

__all__ = ["Client", "Revision"]

log = logging.getLogger("kvstate.client")

_TRANSIENT_BACKOFF = Backoff(first=0.1, cap=1.0)
"""between two tries of a creation NATS did not answer"""

MIN_SERVER_VERSION = (2, 11, 0)
MIN_NATS_PY_VERSION = (2, 15, 0)


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Revision:
    """One stored revision of an operation key (``kvstate history``)."""

    revision: int
    created: datetime | None
    operation: Operation | None
    deleted: bool = False
    error: CorruptValue | None = None


def _check_nats_py() -> None:
    found = package_version("nats-py")
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    if parts < MIN_NATS_PY_VERSION:
        raise ServerVersionError("nats-py", found, ".".join(map(str, MIN_NATS_PY_VERSION)))


class Client:
    """Async client for operation state in a NATS KV bucket.

    Use it as an async context manager; it refuses use before ``__aenter__`` and after
    ``__aexit__``. Pass ``nc`` to reuse a NATS connection you own (it is then not closed);
    open it with ``kvstate.connect(settings)``, so that what the server's permissions refuse
    raises PermissionDenied at once (on another connection it only times out).
    ``create_bucket=True`` creates the bucket when it is missing (otherwise BucketError).
    ``metrics`` (``kvstate.metrics.ClientMetrics``) counts updates for Prometheus.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        nc: NATS | None = None,
        create_bucket: bool = False,
        name: str = "kvstate",
        cache_size: int = 10_000,
        metrics: ClientMetrics | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self._metrics = metrics
        if metrics is not None:
            metrics.watch(lambda: self.stats)
        self._nc = nc
        self._owns_nc = nc is None
        self._create_bucket = create_bucket
        self._name = name
        self._state = _State.UNOPENED
        self._store: KvStore | None = None
        self._committer: GroupCommitter | None = None
        self._cache = RevisionCache(cache_size)
        self._pipelines: dict[str, Pipeline] = {}
        self._watchers: set[Watcher] = set()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise ClientClosedError(f"a kvstate Client cannot be reopened (it is {self._state.value})")
        _check_nats_py()
        if self._nc is None:
            self._nc = await self._connect()
        try:
            self._check_server_version(self._nc)
            config = BucketConfig(
                name=self.settings.bucket,
                replicas=self.settings.replicas,
                history=self.settings.history,
                max_value_size=self.settings.max_value_size,
            )
            self._store = await KvStore.open(
                self._nc,
                config,
                create=self._create_bucket,
                timeout=self.settings.timeout,
                deadline=self.settings.deadline,
            )
        except BaseException:
            if self._owns_nc:
                await self._nc.close()
            self._state = _State.CLOSED
            raise
        self._committer = GroupCommitter(
            self._store,
            self._cache,
            self.pipeline,
            self._pipelines,
            max_attempts=self.settings.max_retries,
            max_value_size=self.settings.max_value_size,
            deadline=self.settings.deadline,
        )
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watchers, finish queued writes, then drain the NATS connection (if ours)."""
        if self._state is not _State.OPEN:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        for watcher in list(self._watchers):
            await watcher.stop()
        if self._committer is not None:
            await self._committer.wait_idle()
        if self._owns_nc and self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except (nats.errors.ConnectionClosedError, nats.errors.TimeoutError):
                await self._nc.close()

    async def _connect(self) -> NATS:
        async def on_error(exc: Exception) -> None:
            log.warning("NATS error: %s", exc)

        async def on_disconnect() -> None:
            if self._state is _State.OPEN:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        return await connect(
            self.settings,
            name=self._name,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )

    @staticmethod
    def _check_server_version(nc: NATS) -> None:
        version = nc.connected_server_version
        found = (version.major, version.minor, version.patch)
        if found < MIN_SERVER_VERSION:
            raise ServerVersionError(
                "nats-server",
                f"{version.major}.{version.minor}.{version.patch}",
                ".".join(map(str, MIN_SERVER_VERSION)),
            )
        if not nc._server_info.get("jetstream"):
            raise ServerVersionError("nats-server", "without JetStream", "JetStream enabled (-js)")

    def _open_store(self) -> KvStore:
        if self._state is not _State.OPEN or self._store is None:
            raise ClientClosedError(f"the kvstate Client is {self._state.value}; use it inside `async with`")
        return self._store

    async def bucket_info(self) -> BucketInfo:
        """The bucket's configuration and size (``kvstate bucket info``)."""
        store = self._open_store()
        info = await store.info()
        cfg, state = info.config, info.state
        return BucketInfo(
            bucket=self.settings.bucket,
            stream=str(cfg.name),
            storage=str(getattr(cfg.storage, "value", cfg.storage)),
            replicas=int(cfg.num_replicas or 1),
            history=int(cfg.max_msgs_per_subject or 1),
            max_value_size=int(cfg.max_msg_size or -1),
            direct_get=bool(cfg.allow_direct),
            msg_ttl=bool(cfg.allow_msg_ttl),
            values=int(state.messages),
            bytes=int(state.bytes),
            last_revision=int(state.last_seq),
            consumers=int(state.consumer_count),
        )

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up."""
        return self._nc is not None and self._nc.is_connected

    @property
    def stats(self) -> dict[str, int]:
        """Counters: compare-and-set writes and conflicts, transient failures retried, cached revisions."""
        committer = self._committer
        return {
            "writes": committer.writes if committer else 0,
            "conflicts": committer.conflicts if committer else 0,
            "transient_retries": committer.transient_retries if committer else 0,
            "cached": len(self._cache),
        }

    # ----------------------------------------------------------------- pipelines

    async def set_pipeline(self, pipeline: Pipeline) -> int:
        """Store ``pipeline`` in the bucket (revision-checked); returns the new revision."""
        store = self._open_store()
        key = pipeline_key(pipeline.name)
        data = encode_pipeline(pipeline)
        for attempt in range(1, self.settings.max_retries + 1):
            current = await store.get(key, leader=True)
            try:
                if current is None:
                    revision = await store.create(key, data)
                elif current.value == data:
                    revision = current.revision
                else:
                    revision = await store.update(key, data, current.revision)
            except ConflictError:
                if attempt == self.settings.max_retries:
                    raise
                continue
            self._pipelines[pipeline.name] = pipeline
            return revision
        raise ConflictError(key, None, self.settings.max_retries)  # pragma: no cover - loop returns or raises

    async def pipeline(self, name: str) -> Pipeline:
        """The pipeline ``name`` (cached after the first read); UnknownPipeline when absent."""
        cached = self._pipelines.get(name)
        if cached is not None:
            return cached
        return await self.refresh_pipeline(name)

    async def refresh_pipeline(self, name: str) -> Pipeline:
        """Read pipeline ``name`` from the bucket again."""
        store = self._open_store()
        key = pipeline_key(name)
        entry = await store.get(key)
        if entry is None or entry.value is None:
            raise UnknownPipeline(name)
        pipeline = decode_pipeline(key, entry.revision, entry.value)
        self._pipelines[name] = pipeline
        return pipeline

    async def pipelines(self) -> builtins.list[Pipeline]:
        """Every pipeline stored in the bucket (corrupt ones are skipped with a warning)."""
        found = []
        async for entry in self._open_store().scan(PIPELINE_PREFIX + "*"):
            try:
                pipeline = decode_pipeline(entry.key, entry.revision, entry.value or b"")
            except CorruptValue as exc:
                log.warning("skipping corrupt pipeline: %s", exc)
                continue
            self._pipelines[pipeline.name] = pipeline
            found.append(pipeline)
        return found

    # ----------------------------------------------------------------- operations

    async def create(
        self,
        pipeline: str,
        *,
        op_id: str | None = None,
        metadata: JSONObject | None = None,
        event_id: str | None = None,
        traceparent: str | None = None,
    ) -> Operation:
        """Create a pending operation of ``pipeline``; returns it with its revision.

        ``op_id`` defaults to a new ULID. When the id exists: with the same ``event_id``
        (a retried creation) the existing operation is returned, otherwise OperationExists.
        ``traceparent`` (W3C, or a bare trace id) records the trace the operation began in.
        """
        store = self._open_store()
        definition = await self.pipeline(pipeline)
        op_id = validate_id(op_id) if op_id is not None else new_ulid()
        key = operation_key(op_id)
        given_event = event_id
        event_id = event_id or new_ulid()
        initial = normalize_json_object(metadata) if metadata is not None else {}
        op = new_operation(op_id, definition, utcnow(), initial, event_id, traceparent)
        data = encode_operation(op, self.settings.max_value_size)
        give_up = time.monotonic() + self.settings.deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                revision = await store.create(key, data)
                break
            except ConflictError:
                # The key exists: read it from the stream leader, which has it (a replica
                # answering a direct get may not have the creation yet).
                existing = await self._read(op_id, leader=True)
                if existing.origin == event_id and (given_event is not None or attempt > 1):
                    return existing  # an idempotent retry, or our own earlier attempt landed
                raise OperationExists(op_id, existing.revision) from None
            except ConnectionLostError:
                # It may have landed: the next attempt then conflicts and finds our event id.
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(_TRANSIENT_BACKOFF.delay(attempt))
        created = _with_revision(op, revision)
        self._cache.remember(key, created)
        return created

    async def get(self, op_id: str) -> Operation:
        """The current state of ``op_id``; OperationNotFound when it is not in the bucket."""
        return await self._read(op_id)

    async def _read(self, op_id: str, *, leader: bool = False) -> Operation:
        store = self._open_store()
        key = operation_key(op_id)
        entry = await store.get(key, leader=leader)
        if entry is None or entry.value is None:
            raise OperationNotFound(op_id, await self._not_found_hint(key))
        op = decode_operation(key, entry.revision, entry.value)
        self._cache.remember(key, op)
        return op

    async def _not_found_hint(self, key: str) -> str:
        history = await self._open_store().history(key)
        if history and history[-1].deleted:
            return (
                f"it was removed from the bucket at revision {history[-1].revision}, most likely after "
                "archiving: look it up with `kvstate archive get ID`"
            )
        return "finished operations are archived and removed: try `kvstate archive get ID`"

    async def apply(self, op_id: str, event: Event, *, expected_revision: int | None = None) -> UpdateResult:
        """Apply one event (compare-and-set, batched with concurrent updates of the same operation).

        With ``expected_revision`` the event applies only to that revision of the operation
        (RevisionMismatch otherwise, nothing written): the conditional write behind HTTP
        ``If-Match``. Without it the state machine alone decides, which is what services want.
        """

        def mutation(op: Operation, pipeline: Pipeline) -> Decision:
            # A retry of a conditional write that landed (its answer lost) is a duplicate,
            # not a mismatch: the event id decides before the revision does.
            if expected_revision is not None and op.revision != expected_revision and event.event_id not in op.events:
                raise RevisionMismatch(op.id, expected_revision, op.revision)
            return apply_event(op, pipeline, event, utcnow())

        return await self._submit(op_id, mutation, alone=expected_revision is not None)

    async def update(self, op_id: str, fn: Callable[[Operation], Operation]) -> UpdateResult:
        """Apply a custom pure function to the operation under compare-and-set.

        ``fn`` may run several times (after conflicts) and must not mutate its argument;
        returning the same object means no change (outcome ``stale``, nothing written).
        """

        def mutation(op: Operation, pipeline: Pipeline) -> Decision:
            new = fn(op)
            if new is op:
                return Decision(Outcome.STALE, op, "update function made no change")
            if new.id != op.id:
                raise KvstateError(f"update function changed the operation id {op.id!r} to {new.id!r}")
            return Decision(Outcome.APPLIED, new)

        return await self._submit(op_id, mutation)

    async def _submit(self, op_id: str, mutation: Mutation, *, alone: bool = False) -> UpdateResult:
        self._open_store()
        assert self._committer is not None
        if self._metrics is None:
            return await self._committer.submit(operation_key(op_id), mutation, alone=alone)
        started = time.perf_counter()
        try:
            result = await self._committer.submit(operation_key(op_id), mutation, alone=alone)
        except KvstateError:
            self._metrics.observe("error", time.perf_counter() - started)
            raise
        self._metrics.observe(result.outcome.value, time.perf_counter() - started)
        return result

    async def start(
        self,
        op_id: str,
        stage: str,
        *,
        worker: str | None = None,
        attempt: int | None = None,
        metadata: JSONObject | None = None,
        event_id: str | None = None,
        traceparent: str | None = None,
    ) -> UpdateResult:
        """An attempt of ``stage`` began (``attempt`` defaults to the next one); ``metadata``
        is merged into the stage's own namespace; ``traceparent`` records the attempt's trace."""
        patch = normalize_json_object(metadata) if metadata is not None else None
        if traceparent is not None:
            trace_id_from(traceparent)  # ValidationError before anything is sent
        event = StartStage(
            stage=stage, worker=worker, attempt=attempt, metadata=patch, traceparent=traceparent, **_eid(event_id)
        )
        return await self.apply(op_id, event)

    async def heartbeat(
        self, op_id: str, stage: str, *, worker: str | None = None, attempt: int | None = None
    ) -> UpdateResult:
        """The running attempt of ``stage`` is alive (refreshes ``heartbeat_at``)."""
        return await self.apply(op_id, Heartbeat(stage=stage, worker=worker, attempt=attempt))

    async def succeed(
        self,
        op_id: str,
        stage: str,
        *,
        metadata: JSONObject | None = None,
        worker: str | None = None,
        attempt: int | None = None,
        event_id: str | None = None,
    ) -> UpdateResult:
        """``stage`` finished well; ``metadata`` is merged into the stage's own namespace."""
        patch = normalize_json_object(metadata) if metadata is not None else None
        event = SucceedStage(stage=stage, metadata=patch, worker=worker, attempt=attempt, **_eid(event_id))
        return await self.apply(op_id, event)

    async def fail(
        self,
        op_id: str,
        stage: str,
        error: str,
        *,
        retryable: bool = True,
        code: str | None = None,
        metadata: JSONObject | None = None,
        worker: str | None = None,
        attempt: int | None = None,
        event_id: str | None = None,
    ) -> UpdateResult:
        """An attempt of ``stage`` failed; retried while ``retryable`` and attempts remain."""
        patch = normalize_json_object(metadata) if metadata is not None else None
        event = FailStage(
            stage=stage,
            error=str(error),
            retryable=retryable,
            code=code,
            metadata=patch,
            worker=worker,
            attempt=attempt,
            **_eid(event_id),
        )
        return await self.apply(op_id, event)

    async def skip(
        self,
        op_id: str,
        stage: str,
        *,
        reason: str | None = None,
        metadata: JSONObject | None = None,
        worker: str | None = None,
        event_id: str | None = None,
    ) -> UpdateResult:
        """An optional ``stage`` will not run; ``metadata`` is merged into its own namespace."""
        patch = normalize_json_object(metadata) if metadata is not None else None
        event = SkipStage(stage=stage, reason=reason, metadata=patch, worker=worker, **_eid(event_id))
        return await self.apply(op_id, event)

    async def merge_metadata(
        self,
        op_id: str,
        patch: JSONObject,
        *,
        stage: str | None = None,
        worker: str | None = None,
        event_id: str | None = None,
        attempt: int | None = None,
        expect: JSONObject | None = None,
    ) -> UpdateResult:
        """Merge ``patch`` (RFC 7386: null removes) into the shared metadata or ``stage``'s namespace.

        ``attempt`` (with ``stage``): a patch from an older attempt of the stage comes back
        stale instead of overwriting what the current attempt wrote. ``expect``: the patch
        applies only while these members hold these values (null: absent), else stale.
        """
        normalized = normalize_json_object(patch, "metadata patch")
        expected = normalize_json_object(expect, "metadata expectation") if expect is not None else None
        if stage is not None:  # UnknownStage before anything is written
            pipeline = await self._pipeline_of(op_id)
            if stage not in pipeline.stage_names:
                (await self.refresh_pipeline(pipeline.name)).stage(stage)
        event = MergeMetadata(
            patch=normalized, stage=stage, worker=worker, attempt=attempt, expect=expected, **_eid(event_id)
        )
        return await self.apply(op_id, event)

    async def cancel(
        self, op_id: str, *, reason: str | None = None, by: str | None = None, event_id: str | None = None
    ) -> UpdateResult:
        """Cancel the operation (stale when it already finished)."""
        return await self.apply(op_id, Cancel(reason=reason, worker=by, **_eid(event_id)))

    async def reopen(
        self, op_id: str, stages: builtins.list[str] | tuple[str, ...], *, event_id: str | None = None
    ) -> UpdateResult:
        """Put ``stages``, every stage after them and every cancelled stage back to waiting
        (also un-cancels). InvalidTransition when the operation would stay failed."""
        return await self.apply(op_id, Reopen(stages=tuple(stages), **_eid(event_id)))

    async def retry(
        self,
        op_id: str,
        stages: builtins.list[str] | tuple[str, ...] | None = None,
        *,
        reason: str | None = None,
        by: str | None = None,
        event_id: str | None = None,
        expected_revision: int | None = None,
    ) -> UpdateResult:
        """Run a finished operation again from ``stages`` (default: ``kvstate.derive.retry_stages``).

        A reopen that only a finished operation takes, decided inside the compare-and-set
        (``kvstate.machine.retry``): NotRetryable while it is pending or running, UnknownStage
        for a stage its pipeline lacks, InvalidTransition when it would stay failed, nothing
        written in each case. ``by`` and ``reason`` are recorded in its actions and history.
        With ``expected_revision`` it applies only at that revision (RevisionMismatch). A
        retry with the ``event_id`` of one that landed comes back ``duplicate``.
        """
        event_id = event_id or new_ulid()
        named = tuple(stages) if stages else None

        def mutation(op: Operation, pipeline: Pipeline) -> Decision:
            if expected_revision is not None and op.revision != expected_revision and not already_applied(op, event_id):
                raise RevisionMismatch(op.id, expected_revision, op.revision)
            return retry(op, pipeline, named, utcnow(), event_id=event_id, reason=reason, by=by)

        return await self._submit(op_id, mutation, alone=expected_revision is not None)

    async def redrive(
        self,
        snapshot: Operation,
        stages: builtins.list[str] | tuple[str, ...] | None = None,
        *,
        archived_source: int = 0,
        redrives: int | None = None,
        reason: str | None = None,
        by: str | None = None,
        event_id: str | None = None,
    ) -> UpdateResult:
        """Put the archived ``snapshot`` back into the bucket, ``stages`` reopened (``kvstate.machine.redrive``).

        Created with the revision check of a creation, so it never overwrites: OperationExists
        while the bucket holds the id, unless it holds this very re-drive (same ``event_id``:
        a retried call, answered ``duplicate``). ``redrives`` numbers the operation's lives
        for the archive (default: the snapshot's plus one); ``archived_source`` is the archive
        source of the snapshot. The archiver's ``kvstate archive redrive`` reads the snapshot.
        """
        store = self._open_store()
        definition = await self.pipeline(snapshot.pipeline)
        event_id = event_id or new_ulid()
        key = operation_key(snapshot.id)
        op = redrive(
            snapshot,
            definition,
            tuple(stages) if stages else None,
            utcnow(),
            event_id=event_id,
            archived_source=archived_source,
            redrives=snapshot.redrives + 1 if redrives is None else redrives,
            reason=reason,
            by=by,
        )
        data = encode_operation(op, self.settings.max_value_size)
        give_up = time.monotonic() + self.settings.deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                revision = await store.create(key, data)
                break
            except ConflictError:
                existing = await self._read(snapshot.id, leader=True)
                if already_applied(existing, event_id):
                    if attempt > 1:  # this call's earlier write landed, its acknowledgement was lost
                        return UpdateResult(Outcome.APPLIED, existing)
                    return UpdateResult(Outcome.DUPLICATE, existing, f"event {event_id} was already applied")
                raise OperationExists(snapshot.id, existing.revision) from None
            except ConnectionLostError:
                if time.monotonic() >= give_up:  # it may have landed: the next try conflicts and finds our event
                    raise
                await asyncio.sleep(_TRANSIENT_BACKOFF.delay(attempt))
        created = _with_revision(op, revision)
        self._cache.remember(key, created)
        return UpdateResult(Outcome.APPLIED, created)

    async def _pipeline_of(self, op_id: str) -> Pipeline:
        key = operation_key(op_id)
        op = self._cache.get(key) or await self._read(op_id)
        return await self.pipeline(op.pipeline)

    async def remove(self, op_id: str, revision: int, *, marker_ttl: float | None = 300.0) -> int:
        """Remove the operation only if it is still at ``revision`` (ConflictError otherwise).

        Used by the archiver after a snapshot. Every kept revision goes; one removal marker
        stays for watchers and expires after ``marker_ttl`` seconds.
        """
        key = operation_key(op_id)
        result = await self._open_store().remove(key, revision, marker_ttl)
        self._cache.discard(key)
        return result

    async def remove_many(
        self, items: builtins.list[tuple[str, int]], *, marker_ttl: float | None = 300.0
    ) -> builtins.list[int | KvstateError]:
        """``remove`` for many ``(op_id, revision)`` pairs at once, pipelined; one result per pair, in order.

        A result is the marker's revision, ConflictError when that operation changed after
        ``revision`` (or is already gone), or the error that kept it from being removed:
        the caller decides per operation. Only an invalid id raises (InvalidKey), before
        anything is sent.
        """
        keys = [operation_key(op_id) for op_id, _ in items]
        results = await self._open_store().remove_many(
            [(key, revision) for key, (_, revision) in zip(keys, items, strict=True)], marker_ttl
        )
        for key in keys:
            self._cache.discard(key)
        return results

    # ----------------------------------------------------------------- reading many

    def watch(
        self, op_id: str | None = None, *, include_existing: bool = True, include_corrupt: bool = False
    ) -> Watcher:
        """Changes of every operation (or of ``op_id``), as ``async with client.watch() as changes``.

        With ``include_existing`` the current state of every key comes first (marked
        ``initial``). Corrupt values are skipped with a warning unless ``include_corrupt``.
        """
        if op_id is not None:
            validate_id(op_id)
        watcher = Watcher(
            self._open_store(),
            op_id=op_id,
            include_existing=include_existing,
            include_corrupt=include_corrupt,
            on_stop=self._watchers.discard,
        )
        self._watchers.add(watcher)
        return watcher

    def feed(
        self,
        name: str,
        *,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        stall_after: float = 20.0,
        on_stall: Callable[[str], None] | None = None,
        description: str = "kvstate change feed",
    ) -> ChangeFeed:
        """The durable, shared change feed ``name``, as ``async with client.feed(name) as feed`` (kvstate.feed).

        Every process opening a feed of the same name shares its deliveries; a message
        not acknowledged within ``ack_wait`` seconds is delivered again.
        """
        validate_id(name, "feed name")
        return ChangeFeed(
            self._open_store(),
            name,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            stall_after=stall_after,
            on_stall=on_stall,
            description=description,
        )

    async def wait(self, op_id: str, timeout: float | None = None) -> Operation:
        """Wait until the operation reaches a terminal status and return it.

        OperationNotFound when there is no such operation in the bucket (or it is removed
        while waiting), WaitTimeout after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        current = await self.get(op_id)  # OperationNotFound rather than a wait for nothing
        if current.done:
            return current
        last: Operation | None = current
        async with self.watch(op_id) as changes:
            try:
                async with asyncio.timeout_at(None if deadline is None else _loop_deadline(deadline)):
                    async for change in changes:
                        if change.operation is not None:
                            last = change.operation
                            if last.done:
                                return last
                        elif change.deleted:
                            if last is not None and last.done:
                                return last
                            raise OperationNotFound(op_id, "it was removed from the bucket while waiting")
            except TimeoutError:
                raise WaitTimeout(op_id, timeout or 0.0, last.status.value if last else None) from None
        raise ClientClosedError("the client closed while waiting")

    async def list(
        self,
        *,
        status: OpStatus | str | list[OpStatus | str] | None = None,
        stage: str | None = None,
        pipeline: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Operation]:
        """Operations in the bucket, oldest first, filtered by status, active stage and pipeline.

        Reads every key (use the dashboard's index for frequent queries). Corrupt values
        are skipped with a logged warning.
        """
        wanted = None
        if status is not None:
            items = status if isinstance(status, list) else [status]
            try:
                wanted = {OpStatus(s) for s in items}
            except ValueError:
                known = ", ".join(s.value for s in OpStatus)
                raise ValidationError(f"unknown status in {items!r}; a status is one of {known}") from None
        found: builtins.list[Operation] = []
        async for op in self.scan():
            if wanted is not None and op.status not in wanted:
                continue
            if pipeline is not None and op.pipeline != pipeline:
                continue
            if stage is not None and op.stage(stage).status not in (StageStatus.RUNNING, StageStatus.RETRYING):
                continue
            found.append(op)
        found.sort(key=lambda o: (o.created_at, o.id))
        return found[:limit] if limit is not None else found

    async def scan(self) -> AsyncIterator[Operation]:
        """Every operation in the bucket, in key order, corrupt values skipped with a warning."""
        async for entry in self._open_store().scan(OPERATION_PREFIX + "*"):
            try:
                yield decode_operation(entry.key, entry.revision, entry.value or b"")
            except CorruptValue as exc:
                log.warning("skipping corrupt value: %s", exc)

    async def history(self, op_id: str) -> builtins.list[Revision]:
        """Every revision of the operation key still stored (the bucket keeps ``history`` per key)."""
        key = operation_key(op_id)
        revisions = []
        for entry in await self._open_store().history(key):
            if entry.value is None:
                revisions.append(Revision(entry.revision, entry.created, None, deleted=True))
                continue
            try:
                revisions.append(
                    Revision(entry.revision, entry.created, decode_operation(key, entry.revision, entry.value))
                )
            except CorruptValue as exc:
                revisions.append(Revision(entry.revision, entry.created, None, error=exc))
        if not revisions:
            raise OperationNotFound(op_id)
        return revisions

    async def raw(self, op_id: str) -> tuple[int, bytes] | None:
        """The stored bytes and revision of an operation key, undecoded (for tools)."""
        with nats_errors(op_id):
            entry = await self._open_store().get(operation_key(op_id))
        return None if entry is None or entry.value is None else (entry.revision, entry.value)


def _eid(event_id: str | None) -> dict[str, str]:
    return {"event_id": event_id} if event_id is not None else {}


def _with_revision(op: Operation, revision: int) -> Operation:
    return msgspec.structs.replace(op, revision=revision)


def _loop_deadline(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
