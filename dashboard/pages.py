"""HTML pages and their live fragments. Handlers stay thin: build a context, render, return.

Every page ``/x`` has a fragment ``/partials/x`` rendered from the same context builder
and the same partial template; htmx re-fetches the fragment on each change signal.
Errors are never caught here: ``dashboard.errors.exception_to_response`` maps them.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect

from dashboard.contexts import (
    DashboardState,
    archive_context,
    banner_context,
    operation_context,
    operations_context,
    overview_context,
)
from dashboard.errors import BadQuery, is_htmx
from dashboard.security import check_write_access
from dashboard.templating import Renderer
from kvstate.keys import validate_id

__all__ = ["Dashboard", "Pages", "pipeline_param", "query_params"]

MAX_REASON = 500

HtmlResponse = Response[str]
Dashboard = NamedDependency[DashboardState]
Templates = NamedDependency[Renderer]


MAX_QUERY_VALUES = 8
"""Values one query parameter may have (``status=a&status=b``...); more is 400."""
MAX_QUERY_VALUE = 128
"""Characters of one query value (page tokens and filter expressions: ``LONG_QUERY_VALUES``); more is 400."""
LONG_QUERY_VALUES = {"page_token": 512, "filter": 512}


def query_params(request: Request[Any, Any, Any]) -> dict[str, list[str]]:
    """The query string as lists of values per key; BadQuery past the limits above (as the OpenAPI document
    states them), so no filter is ever handed an unbounded value."""
    params = {key: request.query_params.getall(key) for key in request.query_params}
    for key, values in params.items():
        if len(values) > MAX_QUERY_VALUES:
            raise BadQuery(key[:40], f"at most {MAX_QUERY_VALUES} values")
        limit = LONG_QUERY_VALUES.get(key, MAX_QUERY_VALUE)
        if any(len(value) > limit for value in values):
            raise BadQuery(key[:40], f"at most {limit} characters")
        if any("\x00" in value for value in values):  # no id, name or stored text has one; PostgreSQL refuses it
            raise BadQuery(key[:40], "a NUL character is no filter value")
    return params


def pipeline_param(request: Request[Any, Any, Any]) -> str | None:
    """The overview's ``pipeline`` (None: the busiest one)."""
    values = query_params(request).get("pipeline", [])
    if len(values) > 1:
        raise BadQuery("pipeline", "give it at most once")
    return values[0] if values and values[0] else None


class Pages(Controller):
    """The dashboard's HTML."""

    include_in_schema = False

    @get("/", name="overview")
    async def overview(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = overview_context(dashboard, pipeline_param(request), now) | banner_context(dashboard, now)
        return renderer.response(request, "overview.html", context, started=started)

    @get("/partials/overview")
    async def overview_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = overview_context(dashboard, pipeline_param(request), now)
        return renderer.response(request, "partials/overview.html", context, started=started)

    @get("/operations", name="operations")
    async def operations(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = operations_context(dashboard, query_params(request), now) | banner_context(dashboard, now)
        return renderer.response(request, "operations.html", context, started=started)

    @get("/partials/operations")
    async def operations_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = operations_context(dashboard, query_params(request), now)
        return renderer.response(request, "partials/operations.html", context, started=started)

    @get("/operations/{op_id:str}", name="operation")
    async def operation(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, op_id: FromPath[str]
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await operation_context(dashboard, op_id, now) | banner_context(dashboard, now)
        # NATS unreachable: the page says so (banner) and fills in by itself once it is back
        status = 503 if context["unreachable"] else 200
        return renderer.response(request, "operation.html", context, status_code=status, started=started)

    @get("/partials/operations/{op_id:str}")
    async def operation_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, op_id: FromPath[str]
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await operation_context(dashboard, op_id, now)
        if context["unreachable"]:  # nothing newer to show: 204 makes htmx keep what the page shows
            return Response("", status_code=204)
        return renderer.response(request, "partials/operation.html", context, started=started)

    @post("/operations/{op_id:str}/cancel", status_code=200)
    async def cancel(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, op_id: FromPath[str]
    ) -> Response[Any]:
        validate_id(op_id)
        form = await request.form()
        reason = str(form.get("reason") or "").strip()
        if len(reason) > MAX_REASON:
            raise BadQuery("reason", f"at most {MAX_REASON} characters")
        token = form.get("token")
        check_write_access(request, dashboard.settings.auth_token, token if isinstance(token, str) else None)
        result = await dashboard.client.cancel(op_id, reason=reason or "cancelled in the dashboard", by="dashboard")
        result.raise_for_stale()
        if not is_htmx(request):  # a plain form post (no JavaScript): back to the page
            return Redirect(f"/operations/{op_id}", status_code=303)
        return renderer.response(request, "partials/cancel_result.html", {"result": result, "op_id": op_id})

    @get("/archive", name="archive")
    async def archive(self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await archive_context(dashboard, query_params(request), now) | banner_context(dashboard, now)
        return renderer.response(request, "archive.html", context, started=started)

    @get("/partials/archive")
    async def archive_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await archive_context(dashboard, query_params(request), now)
        return renderer.response(request, "partials/archive.html", context, started=started)

    @get("/partials/banner")
    async def banner(self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates) -> HtmlResponse:
        return renderer.response(request, "partials/banner.html", banner_context(dashboard, time.time()))
