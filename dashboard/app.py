"""The dashboard application: ``create_app(settings)`` and its lifespan.

The lifespan opens, in order: the kvstate client, the broadcaster and the one watcher
feeding the in-memory index, the archive reader, the supervisor of the bulk jobs run here;
and closes them in reverse order (the jobs are left paused).
Every exception goes through ``dashboard.errors.exception_to_response``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.htmx import HTMXPlugin
from litestar.response import ServerSentEvent
from litestar.static_files import create_static_files_router
from prometheus_client import CONTENT_TYPE_LATEST

from dashboard.action_pages import ActionPages
from dashboard.actions_api import ActionsApi
from dashboard.api import OperationsApi
from dashboard.archive import READER_FALLBACK_WARNING, ArchiveAccess
from dashboard.contexts import DashboardState
from dashboard.errors import exception_to_response
from dashboard.feed import Broadcaster, IndexFeed, running
from dashboard.guard import HOLDS_CONNECTION, PUBLIC, Guard
from dashboard.index import OperationIndex
from dashboard.jobs import JobSupervisor
from dashboard.metrics import DashboardMetrics
from dashboard.pages import Pages
from dashboard.security import add_security_headers, csrf_middleware
from dashboard.settings import DashboardSettings
from dashboard.templating import Renderer, make_environment
from kvstate import Client

__all__ = ["STATIC_DIRECTORY", "create_app"]

log = logging.getLogger("dashboard")

STATIC_DIRECTORY = Path(__file__).parent / "static"


def _state(request: Request[Any, Any, Any]) -> DashboardState:
    state: DashboardState | None = request.app.state.get("dashboard")
    if state is None:
        raise RuntimeError("the dashboard is not started (lifespan not run)")
    return state


def _renderer(request: Request[Any, Any, Any]) -> Renderer:
    renderer: Renderer = request.app.state.renderer
    return renderer


@get("/events", include_in_schema=False, opt={HOLDS_CONNECTION: True})
async def events(request: Request[Any, Any, Any]) -> ServerSentEvent:
    """Change signals for the open pages (server-sent events)."""
    dashboard = _state(request)
    return ServerSentEvent(
        dashboard.broadcaster.stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@get("/healthz", summary="Liveness and readiness", tags=["health"], opt={PUBLIC: True}, security=[{}])
async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """200 when NATS is reachable and the index is loaded, 503 otherwise (with the reason)."""
    dashboard = _state(request)
    nats = dashboard.client.connected
    ready = dashboard.feed.ready.is_set() and dashboard.feed.running
    archive = "disabled" if not dashboard.archive.enabled else (dashboard.archive.problem or "ok")
    body = {
        "status": "ok" if nats and ready else "unavailable",
        "nats": nats,
        "index_ready": ready,
        "operations": len(dashboard.index),
        "archive": archive,
    }
    return Response(body, status_code=200 if nats and ready else 503)


@get("/metrics", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus metrics."""
    registry: DashboardMetrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)


SECURITY_SCHEMES = {
    "token": SecurityScheme(type="http", scheme="bearer", description="DASHBOARD_AUTH_TOKEN"),
    "basic": SecurityScheme(type="http", scheme="basic", description="any user name, DASHBOARD_AUTH_TOKEN as password"),
}


def create_app(settings: DashboardSettings, *, clock: Any = time.time) -> Litestar:
    """The dashboard's ASGI application for ``settings``."""
    guard = Guard(settings)
    index = OperationIndex(stats_window=settings.stats_window)
    broadcaster = Broadcaster(debounce=settings.debounce)
    environment = make_environment()
    # the cancel form asks for the token unless reads need it too: then the browser sends it already (basic auth)
    ask_token = settings.auth_token is not None and not settings.auth_reads
    renderer = Renderer(environment, globals_={"auth_required": ask_token})

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with Client(settings.kv, create_bucket=False, name="kvstate-dashboard") as client:
            feed = IndexFeed(client, index, broadcaster, clock=clock)
            archive = ArchiveAccess(settings.database_url)
            if settings.database_url_fallback:
                log.warning(READER_FALLBACK_WARNING)
            app_metrics = DashboardMetrics(index, feed, broadcaster, lambda: client.connected)
            renderer.observe = lambda view, seconds: app_metrics.render_seconds.labels(view).observe(seconds)
            app.state.metrics = app_metrics
            async with running(feed, broadcaster):
                await archive.open()
                jobs = JobSupervisor(client, on_step=lambda job: broadcaster.notify())
                try:
                    app.state.dashboard = DashboardState(settings, client, index, feed, broadcaster, archive, jobs=jobs)
                    yield
                finally:
                    await jobs.stop()  # the jobs it runs are left paused, resumable
                    app.state.dashboard = None
                    await archive.close()

    return Litestar(
        route_handlers=[
            Pages,
            ActionPages,
            OperationsApi,
            ActionsApi,
            events,
            healthz,
            metrics,
            create_static_files_router(
                path="/static", directories=[STATIC_DIRECTORY], include_in_schema=False, opt={PUBLIC: True}
            ),
        ],
        dependencies={
            "dashboard": Provide(_state, sync_to_thread=False),
            "renderer": Provide(_renderer, sync_to_thread=False),
        },
        lifespan=[lifespan],
        plugins=[HTMXPlugin()],  # request.htmx: which requests htmx sent, and what it targets
        before_send=[add_security_headers],
        middleware=[
            guard.middleware,  # first: outside the CSRF check, which needs to know who authenticated
            csrf_middleware(
                CSRFConfig(
                    secret=settings.secret or secrets.token_hex(32), cookie_samesite="strict", cookie_httponly=False
                )
            ),
        ],
        exception_handlers={Exception: exception_to_response},
        request_max_body_size=settings.max_body,
        openapi_config=OpenAPIConfig(
            title="kvstate dashboard API",
            version="0.1.0",
            path="/schema",
            components=Components(security_schemes=dict(SECURITY_SCHEMES)),
            # the document tells the truth of this process: reads need the token only with DASHBOARD_AUTH_READS
            security=[{"token": []}, {"basic": []}] if settings.auth_reads else None,
        ),
        state=State({"renderer": renderer, "dashboard": None, "guard": guard}),
        debug=False,
    )
