"""The three systems under comparison, each behind the workload's ``System`` protocol.

- ``NaiveBaseline``: a worker GETs the whole operation, applies its event and PUTs it back;
  a metadata patch is one blind ``jsonb ||`` UPDATE.
- ``CarefulBaseline``: a worker POSTs the event; the service applies it under ``SELECT ... FOR
  UPDATE``; a metadata patch too, refused when its attempt is older than the stage's in the row
  or its ``expect`` does not hold.
- ``KvstateSystem``: a worker calls its stage service's own kvstate client (compare-and-set
  on the KV bucket, event ids, forward-only state machine, group commit within one client);
  a metadata patch is ``merge_metadata`` with the stage's ``attempt`` or the shared patch's
  ``expect``.

Each returns, for every acknowledged write, the state that write produced as a ``View``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import asyncpg
import msgspec

from bench.baseline.document import (
    CreateOperation,
    EventKind,
    MetadataPatch,
    MetadataResult,
    OperationDocument,
    StageEvent,
    WriteResult,
    apply_stage_event,
    shared_metadata,
)
from bench.compare_http import HttpPool
from bench.workload import Message, MessageKind, StageView, View
from kvstate import Client, Operation, OperationNotFound, Outcome, Pipeline, UpdateResult

__all__ = ["CarefulBaseline", "KvstateSystem", "NaiveBaseline", "document_view", "operation_view"]

_document_decoder = msgspec.json.Decoder(OperationDocument)
_write_decoder = msgspec.json.Decoder(WriteResult)
_metadata_decoder = msgspec.json.Decoder(MetadataResult)
_METADATA_KINDS = (MessageKind.STAGE_METADATA, MessageKind.SHARED_METADATA)
_EVENT_KINDS: dict[MessageKind, EventKind] = {
    MessageKind.START: "start",
    MessageKind.FAIL: "fail",
    MessageKind.SUCCEED: "succeed",
    MessageKind.SKIP: "skip",
}
"""the stage event each status message becomes (metadata patches go to their own endpoints)"""


def document_view(doc: OperationDocument) -> View:
    """The baseline document in the checker's vocabulary."""
    stages = {}
    for name, row in doc.stages.items():
        metadata = doc.metadata.get(name)
        stages[name] = StageView(row.status, row.attempt, metadata if isinstance(metadata, dict) else None)
    return View(doc.revision, doc.status, stages, shared_metadata(doc))


def operation_view(op: Operation) -> View:
    """A kvstate operation in the checker's vocabulary."""
    stages = {
        name: StageView(state.status.value, state.attempt, dict(state.metadata) or None)
        for name, state in op.stages.items()
    }
    return View(op.revision, op.status.value, stages, dict(op.metadata))


class _HttpBaseline:
    """Shared by both baseline variants: an HTTP client to the service and the row reader."""

    name = "baseline"

    def __init__(self, base_url: str, database_url: str, pipeline: Pipeline, concurrency: int) -> None:
        self._base_url = base_url
        self._database_url = database_url
        self._pipeline = pipeline
        # Enough connections for every request in flight: three parallel stages per operation.
        host, _, port = base_url.removeprefix("http://").partition(":")
        self._http = HttpPool(host, int(port), concurrency * 4)
        self._stages = {spec.name: spec.optional for spec in pipeline.stages}
        self.counters: Counter[str] = Counter()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create(self, key: str) -> None:
        body = CreateOperation(id=key, pipeline=self._pipeline.name, stages=self._stages)
        await self._http.request("POST", "/operations", msgspec.json.encode(body))

    async def final_views(self) -> dict[str, View]:
        conn = await asyncpg.connect(self._database_url)
        try:
            rows = await conn.fetch(
                "SELECT id, pipeline, status, stage, stages::text AS stages, metadata::text AS metadata, revision "
                "FROM operations"
            )
        finally:
            await conn.close()
        views = {}
        for row in rows:
            fields = {**dict(row.items()), "stages": msgspec.json.decode(row["stages"])}
            fields["metadata"] = msgspec.json.decode(row["metadata"])
            doc = msgspec.convert(fields, OperationDocument)
            views[doc.id] = document_view(doc)
        return views


def _patch(message: Message, *, guarded: bool) -> bytes:
    """The body of a metadata patch; only a guarded service gets the attempt and the expectation."""
    assert message.metadata is not None  # every metadata message carries its patch
    stage = message.stage if message.kind is MessageKind.STAGE_METADATA else None
    body = MetadataPatch(patch=message.metadata, stage=stage)
    if guarded:
        attempt = message.attempt if stage is not None else None
        body = msgspec.structs.replace(body, attempt=attempt, expect=message.expect)
    return msgspec.json.encode(body)


def _written(result: MetadataResult, counters: Counter[str]) -> View | None:
    counters["written" if result.applied else "stale_metadata"] += 1
    return document_view(result.document) if result.applied else None


def _event(message: Message) -> StageEvent:
    return StageEvent(
        stage=message.stage,
        kind=_EVENT_KINDS[message.kind],
        attempt=message.attempt,
        worker=message.worker,
        metadata=message.metadata,
    )


class NaiveBaseline(_HttpBaseline):
    """GET the whole state, change it, PUT it back: the last writer wins. A metadata patch is
    merged blindly in one UPDATE (``jsonb ||``), whatever attempt it came from."""

    name = "naive"

    async def deliver(self, key: str, message: Message) -> View | None:
        if message.kind in _METADATA_KINDS:
            body = await self._http.request("PATCH", f"/operations/{key}/metadata", _patch(message, guarded=False))
            return _written(_metadata_decoder.decode(body), self.counters)
        current = _document_decoder.decode(await self._http.request("GET", f"/operations/{key}"))
        doc = apply_stage_event(current, _event(message))
        written = _write_decoder.decode(await self._http.request("PUT", f"/operations/{key}", msgspec.json.encode(doc)))
        self.counters["written"] += 1
        return document_view(msgspec.structs.replace(doc, revision=written.revision))


class CarefulBaseline(_HttpBaseline):
    """POST the event; the service locks the row, applies it and writes it back in one transaction.
    A metadata patch likewise, unless the row shows it stale (then nothing is written)."""

    name = "careful"

    async def deliver(self, key: str, message: Message) -> View | None:
        if message.kind in _METADATA_KINDS:
            body = await self._http.request("POST", f"/operations/{key}/metadata", _patch(message, guarded=True))
            return _written(_metadata_decoder.decode(body), self.counters)
        body = await self._http.request("POST", f"/operations/{key}/events", msgspec.json.encode(_event(message)))
        self.counters["written"] += 1
        return document_view(_document_decoder.decode(body))


class KvstateSystem:
    """kvstate on an open bucket holding ``pipeline``, one client per stage service.

    ``client`` creates the operations (the producer) and reads the final states;
    ``stage_clients`` maps each stage to the client of its service, with its own NATS
    connection, group committer and revision cache, as separate services have (a stage
    left out uses ``client``). Updates of parallel stages to one operation therefore race
    as compare-and-set conflicts instead of being merged in one process.
    """

    name = "kvstate"

    def __init__(self, client: Client, pipeline: Pipeline, stage_clients: Mapping[str, Client] | None = None) -> None:
        self._client = client
        self._pipeline = pipeline
        self._stage_clients = {spec.name: (stage_clients or {}).get(spec.name, client) for spec in pipeline.stages}
        self.counters: Counter[str] = Counter()

    @property
    def clients(self) -> list[Client]:
        """Every distinct client: the producer's first, then the stage services'."""
        found = {id(self._client): self._client}
        for client in self._stage_clients.values():
            found.setdefault(id(client), client)
        return list(found.values())

    def kv_stats(self) -> dict[str, int]:
        """``Client.stats`` summed over every client (writes, conflicts, cached), and the number of clients."""
        total: Counter[str] = Counter()
        for client in self.clients:
            total.update(client.stats)
        return dict(total) | {"clients": len(self.clients)}

    async def create(self, key: str) -> None:
        await self._client.create(self._pipeline.name, op_id=key, event_id=f"{key}.create")

    async def deliver(self, key: str, message: Message) -> View | None:
        client = self._stage_clients[message.stage]
        stage, attempt, worker, event_id = message.stage, message.attempt, message.worker, message.event_id
        result: UpdateResult
        try:
            if message.kind is MessageKind.START:
                result = await client.start(key, stage, attempt=attempt, worker=worker, event_id=event_id)
            elif message.kind is MessageKind.FAIL:
                result = await client.fail(
                    key, stage, "transient error", attempt=attempt, worker=worker, event_id=event_id
                )
            elif message.kind is MessageKind.SUCCEED:
                result = await client.succeed(
                    key, stage, metadata=message.metadata, attempt=attempt, worker=worker, event_id=event_id
                )
            elif message.kind is MessageKind.STAGE_METADATA:
                assert message.metadata is not None  # every metadata message carries its patch
                result = await client.merge_metadata(
                    key, message.metadata, stage=stage, attempt=attempt, worker=worker, event_id=event_id
                )
            elif message.kind is MessageKind.SHARED_METADATA:
                assert message.metadata is not None
                result = await client.merge_metadata(
                    key, message.metadata, expect=message.expect, worker=worker, event_id=event_id
                )
            else:
                result = await client.skip(key, stage, reason="not needed", worker=worker, event_id=event_id)
        except OperationNotFound:
            # Only the archiver removes an operation, and only once it finished: this message
            # came after the operation was archived (a late or redelivered one). A stage
            # service acks and drops it; counted apart, and the checker reads the archive.
            self.counters["not_found"] += 1
            return None
        self.counters[result.outcome.value] += 1
        return operation_view(result.operation) if result.outcome is Outcome.APPLIED else None

    async def final_views(self) -> dict[str, View]:
        """The operations still in the bucket (archived ones are read from the archive instead)."""
        return {op.id: operation_view(op) async for op in self._client.scan()}
