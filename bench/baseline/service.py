"""The baseline "Operation" service: Litestar + asyncpg, one PostgreSQL row per operation.

    POST /operations                 create (409 when the id exists)
    GET  /operations/{id}            the whole document
    PUT  /operations/{id}            replace the whole document (naive: last writer wins)
    POST /operations/{id}/events     apply one stage event under SELECT ... FOR UPDATE (careful)
    PATCH /operations/{id}/metadata  merge a metadata patch blindly, in one UPDATE (naive)
    POST /operations/{id}/metadata   merge it under SELECT ... FOR UPDATE unless it is stale (careful)

Built the way a competent team builds it: a connection pool, statements prepared once per
connection (asyncpg's statement cache), a primary key and an index on ``status`` (the
"what is running" query), JSONB codecs set in the pool's ``init``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy
from litestar import Litestar, Request, Response, get, patch, post, put
from litestar.datastructures import State
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_404_NOT_FOUND, HTTP_409_CONFLICT

from bench.baseline.document import (
    CreateOperation,
    MetadataPatch,
    MetadataResult,
    OperationDocument,
    StageEvent,
    WriteResult,
    apply_stage_event,
    guard_metadata_patch,
    merge_metadata_patch,
    new_document,
)
from bench.baseline.settings import BaselineSettings

__all__ = ["SCHEMA", "create_app", "create_schema"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id          text PRIMARY KEY,
    pipeline    text NOT NULL,
    status      text NOT NULL,
    stage       text,
    stages      jsonb NOT NULL,
    metadata    jsonb NOT NULL,
    revision    bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS operations_status ON operations (status);
"""

_COLUMNS = "id, pipeline, status, stage, stages, metadata, revision"
_INSERT = (
    "INSERT INTO operations (id, pipeline, status, stage, stages, metadata) VALUES ($1, $2, $3, $4, $5, $6) "
    "RETURNING revision"
)
_SELECT = f"SELECT {_COLUMNS} FROM operations WHERE id = $1"
_SELECT_FOR_UPDATE = f"SELECT {_COLUMNS} FROM operations WHERE id = $1 FOR UPDATE"
_UPDATE = (
    "UPDATE operations SET status = $2, stage = $3, stages = $4, metadata = $5, "
    "revision = revision + 1, updated_at = now() WHERE id = $1 RETURNING revision"
)

# jsonb || replaces the target's top-level members with the patch's: the shared metadata's, or
# (jsonb_set) those of the stage's namespace.
_MERGE_BLINDLY = (
    "UPDATE operations SET metadata = CASE WHEN $3::text IS NULL THEN metadata || $2::jsonb "
    "ELSE jsonb_set(metadata, ARRAY[$3::text], coalesce(metadata -> $3::text, '{}'::jsonb) || $2::jsonb) END, "
    f"revision = revision + 1, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}"
)


_Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


class OperationMissing(Exception):
    """No row for this operation id."""


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=lambda v: msgspec.json.encode(v).decode(), decoder=msgspec.json.decode
    )


async def create_schema(conn: _Conn) -> None:
    """Create the table and its index (idempotent; serialised so that uvicorn workers starting together agree)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7411)")
        await conn.execute(SCHEMA)


def _document(row: asyncpg.Record) -> OperationDocument:
    return msgspec.convert(dict(row.items()), OperationDocument)


def _pool(state: State) -> asyncpg.Pool[Any]:
    pool: asyncpg.Pool[Any] = state.pool
    return pool


async def _write(conn: _Conn, doc: OperationDocument) -> int:
    revision = await conn.fetchval(_UPDATE, doc.id, doc.status, doc.stage, doc.stages, doc.metadata)
    if revision is None:
        raise OperationMissing(doc.id)
    return int(revision)


@post("/operations", status_code=201)
async def create_operation(data: CreateOperation, state: State) -> OperationDocument:
    """Create an operation with every stage waiting."""
    doc = new_document(data)
    async with _pool(state).acquire() as conn:
        revision = await conn.fetchval(_INSERT, doc.id, doc.pipeline, doc.status, doc.stage, doc.stages, doc.metadata)
    return msgspec.structs.replace(doc, revision=int(revision))


@get("/operations/{op_id:str}")
async def read_operation(op_id: str, state: State) -> OperationDocument:
    """The whole document of one operation."""
    async with _pool(state).acquire() as conn:
        row = await conn.fetchrow(_SELECT, op_id)
    if row is None:
        raise OperationMissing(op_id)
    return _document(row)


@put("/operations/{op_id:str}")
async def replace_operation(op_id: str, data: OperationDocument, state: State) -> WriteResult:
    """Replace the document (the naive service: whoever writes last wins)."""
    async with _pool(state).acquire() as conn:
        revision = await _write(conn, msgspec.structs.replace(data, id=op_id))
    return WriteResult(id=op_id, revision=revision)


@post("/operations/{op_id:str}/events", status_code=200)
async def apply_event(op_id: str, data: StageEvent, state: State) -> OperationDocument:
    """Apply one stage event with the row locked (the careful service: no lost updates)."""
    async with _pool(state).acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_SELECT_FOR_UPDATE, op_id)
        if row is None:
            raise OperationMissing(op_id)
        doc = apply_stage_event(_document(row), data)
        revision = await _write(conn, doc)
    return msgspec.structs.replace(doc, revision=revision)


@patch("/operations/{op_id:str}/metadata")
async def merge_metadata_blindly(op_id: str, data: MetadataPatch, state: State) -> MetadataResult:
    """Merge a metadata patch in one UPDATE, whatever attempt or expectation it names (the naive service)."""
    async with _pool(state).acquire() as conn:
        row = await conn.fetchrow(_MERGE_BLINDLY, op_id, data.patch, data.stage)
    if row is None:
        raise OperationMissing(op_id)
    return MetadataResult(applied=True, document=_document(row))


@post("/operations/{op_id:str}/metadata", status_code=200)
async def merge_metadata_guarded(op_id: str, data: MetadataPatch, state: State) -> MetadataResult:
    """Merge a metadata patch with the row locked, unless its attempt is older than the stage's
    or its ``expect`` does not hold (the careful service: then nothing is written)."""
    async with _pool(state).acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_SELECT_FOR_UPDATE, op_id)
        if row is None:
            raise OperationMissing(op_id)
        doc = _document(row)
        reason = guard_metadata_patch(doc, data)
        if reason is not None:
            return MetadataResult(applied=False, document=doc, reason=reason)
        doc = merge_metadata_patch(doc, data)
        revision = await _write(conn, doc)
    return MetadataResult(applied=True, document=msgspec.structs.replace(doc, revision=revision))


@get("/health")
async def health() -> dict[str, bool]:
    """Liveness."""
    return {"ok": True}


def _error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    if isinstance(exc, OperationMissing):
        return Response({"error": f"operation {exc} not found"}, status_code=HTTP_404_NOT_FOUND)
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Response({"error": "operation exists"}, status_code=HTTP_409_CONFLICT)
    return Response({"error": f"unknown stage {exc}"}, status_code=HTTP_400_BAD_REQUEST)


def create_app(settings: BaselineSettings) -> Litestar:
    """The baseline service; its lifespan opens the pool (and creates the table), then closes it."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with asyncpg.create_pool(
            settings.database_url, min_size=settings.pool_size, max_size=settings.pool_size, init=_init_connection
        ) as pool:
            async with pool.acquire() as conn:
                await create_schema(conn)
            app.state.pool = pool
            yield

    return Litestar(
        route_handlers=[
            create_operation,
            read_operation,
            replace_operation,
            apply_event,
            merge_metadata_blindly,
            merge_metadata_guarded,
            health,
        ],
        lifespan=[lifespan],
        exception_handlers={
            OperationMissing: _error_response,
            asyncpg.UniqueViolationError: _error_response,
            KeyError: _error_response,
        },
        request_max_body_size=1024 * 1024,
        debug=False,
    )
