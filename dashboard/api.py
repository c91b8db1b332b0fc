"""The JSON API, shaped like Google's long-running Operations (google.longrunning).

    GET  /api/operations/{id}          one operation: name, done, metadata, error | result; ETag = revision
                                       (a corrupt stored value: error code 15 DATA_LOSS, as in the list)
    GET  /api/operations               filter (``status=running AND stage=geo``), page_size, page_token
    POST /api/operations/{id}:cancel   revision-checked cancel (write token when configured;
                                       CSRF token unless sent as Authorization: Bearer)
    GET  /api/csrf                     a CSRF token for API writes (send it back as X-CSRFToken)

``metadata`` is the full operation state; ``result`` (succeeded) holds the shared and
per-stage metadata; ``error`` (failed, cancelled) is a google.rpc.Status-like object.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.utils.scope.state import ScopeState

from dashboard.errors import BadQuery
from dashboard.index import CORRUPT, OpSummary
from dashboard.pages import Dashboard, query_params
from dashboard.query import decode_page_token, encode_page_token, parse_filter, parse_filter_expression
from dashboard.security import check_write_access
from kvstate import CorruptValue, Operation, OperationNotFound, OpStatus
from kvstate.keys import validate_id

__all__ = ["OperationsApi"]

_CODE_CANCELLED = 1  # google.rpc.Code.CANCELLED
_CODE_ABORTED = 10  # google.rpc.Code.ABORTED: the pipeline gave up on the operation
_CODE_DATA_LOSS = 15  # google.rpc.Code.DATA_LOSS: the stored value is corrupt


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why an operation did not succeed (google.rpc.Status)."""

    code: int
    message: str
    details: list[dict[str, Any]] = []


class OperationResource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One operation (google.longrunning.Operation)."""

    name: str
    done: bool
    metadata: dict[str, Any]
    error: Status | None = None
    result: dict[str, Any] | None = None


class OperationList(msgspec.Struct, kw_only=True):
    """One page of operations (google.longrunning.ListOperationsResponse)."""

    operations: list[OperationResource]
    next_page_token: str = ""


class CsrfToken(msgspec.Struct, kw_only=True):
    """A CSRF token to send back in the X-CSRFToken header of API writes."""

    csrf_token: str
    header: str = "X-CSRFToken"


def operation_resource(op: Operation, *, archived: bool = False) -> OperationResource:
    """The Google-shaped view of one operation."""
    state = msgspec.to_builtins(msgspec.structs.replace(op, events=[]))
    state.pop("events", None)
    state["@type"] = "kvstate.Operation"
    state["archived"] = archived
    resource = OperationResource(name=f"operations/{op.id}", done=op.done, metadata=state)
    if op.status is OpStatus.SUCCEEDED:
        stages = {name: st.metadata for name, st in op.stages.items() if st.metadata}
        resource.result = {"metadata": op.metadata, "stages": msgspec.to_builtins(stages)}
    elif op.status is OpStatus.FAILED:
        details = [
            {"stage": name, **msgspec.to_builtins(st.error)} for name, st in op.stages.items() if st.error is not None
        ]
        failed = [d["stage"] for d in details if op.stages[d["stage"]].status.value == "failed"]
        message = f"stage {failed[0]} failed: {op.stages[failed[0]].error.message}" if failed else "failed"  # type: ignore[union-attr]
        resource.error = Status(code=_CODE_ABORTED, message=message, details=details)
    elif op.status is OpStatus.CANCELLED:
        reason = op.cancel.reason if op.cancel is not None else None
        resource.error = Status(code=_CODE_CANCELLED, message=f"cancelled: {reason}" if reason else "cancelled")
    return resource


def summary_resource(op: OpSummary) -> OperationResource:
    """The list view of one operation, from the index (no bucket read)."""
    metadata: dict[str, Any] = {
        "@type": "kvstate.OperationSummary",
        "id": op.id,
        "pipeline": op.pipeline,
        "status": op.status,
        "created_at": op.created,
        "updated_at": op.updated,
        "finished_at": op.finished,
        "revision": op.revision,
        "active_stages": op.active_stages,
        "stages": {name: status.value for name, status in op.stages()},
    }
    resource = OperationResource(name=f"operations/{op.id}", done=op.done, metadata=metadata)
    if op.corrupt:
        resource.error = Status(code=_CODE_DATA_LOSS, message=f"corrupt value at revision {op.revision}")
    return resource


def corrupt_resource(op_id: str, exc: CorruptValue) -> OperationResource:
    """A key whose stored value is not a valid operation: DATA_LOSS, as the list reports it."""
    metadata: dict[str, Any] = {
        "@type": "kvstate.CorruptValue",
        "id": op_id,
        "status": CORRUPT,
        "revision": exc.revision,
        "archived": False,
    }
    message = f"corrupt value at revision {exc.revision}: {exc.detail}"
    return OperationResource(
        name=f"operations/{op_id}", done=False, metadata=metadata, error=Status(code=_CODE_DATA_LOSS, message=message)
    )


def _etag(revision: int) -> str:
    return f'"{revision}"'


class OperationsApi(Controller):
    """JSON API under /api."""

    path = "/api"
    tags = ["operations"]

    @get("/operations/{name:str}", summary="Get one operation (ETag = KV revision)")
    async def get_operation(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> Response[OperationResource]:
        op_id = validate_id(name.removeprefix("operations/"))
        try:
            op = await dashboard.client.get(op_id)
            resource, revision = operation_resource(op), op.revision
        except CorruptValue as exc:  # a resource like the list's, not an error: the key exists
            resource, revision = corrupt_resource(op_id, exc), exc.revision
        except OperationNotFound:
            found = await dashboard.archive.get(op_id) if dashboard.archive.enabled else None
            if found is None:
                raise
            resource, revision = operation_resource(found.operation, archived=True), found.operation.revision
        etag = _etag(revision)
        if request.headers.get("if-none-match") == etag:
            return Response(content=None, status_code=304, headers={"ETag": etag})  # type: ignore[arg-type]
        return Response(resource, headers={"ETag": etag, "Cache-Control": "no-cache"})

    @get("/operations", summary="List live operations from the dashboard's index")
    async def list_operations(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> OperationList:
        params = query_params(request)
        expressions = params.pop("filter", [])
        for expression in expressions:
            for key, values in parse_filter_expression(expression).items():
                params.setdefault(key, []).extend(values)
        sizes = params.pop("page_size", [])
        try:
            size = int(sizes[0]) if sizes else dashboard.settings.page_size
        except ValueError:
            raise BadQuery("page_size", "not a number") from None
        if not 1 <= size <= 500:
            raise BadQuery("page_size", "between 1 and 500")
        tokens = params.pop("page_token", [])
        cursor = decode_page_token(tokens[0]) if tokens and tokens[0] else None
        page, next_cursor = dashboard.index.query(parse_filter(params), size, cursor)
        return OperationList(
            operations=[summary_resource(op) for op in page],
            next_page_token=encode_page_token(next_cursor) if next_cursor else "",
        )

    @post(
        "/operations/{name:str}", summary="POST /api/operations/{id}:cancel cancels (revision-checked)", status_code=200
    )
    async def operation_method(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> OperationResource:
        op_id, _, method = name.removeprefix("operations/").partition(":")
        if method != "cancel":
            raise NotFoundException("the only operation method is :cancel")
        validate_id(op_id)
        check_write_access(request, dashboard.settings.auth_token)
        reason = "cancelled through the API"
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.body()
            if body:
                try:
                    data = msgspec.json.decode(body)
                except msgspec.DecodeError:
                    raise BadQuery("body", "not JSON") from None
                if not isinstance(data, dict) or not isinstance(data.get("reason", ""), str):
                    raise BadQuery("body", 'expected {"reason": "..."}')
                reason = data.get("reason") or reason
        if len(reason) > 500:
            raise BadQuery("reason", "at most 500 characters")
        result = await dashboard.client.cancel(op_id, reason=reason, by="api")
        result.raise_for_stale()
        return operation_resource(result.operation)

    @get("/csrf", summary="A CSRF token for API writes")
    async def csrf(self, request: Request[Any, Any, Any]) -> CsrfToken:
        token = ScopeState.from_scope(request.scope).csrf_token
        return CsrfToken(csrf_token=token if isinstance(token, str) else "")
