"""Every route of the app, enumerated from Litestar: authentication, CSRF and the security headers.

The routes come from ``app.routes``, not from a list kept here, so a route someone adds is
checked by these tests the day it is added: it needs the token (reads with
DASHBOARD_AUTH_READS, writes always when a token is set), its state-changing methods need
the CSRF token and a same-origin ``Sec-Fetch-Site``, and every answer carries the headers.
Only the routes in ``PUBLIC`` may answer without the token.
"""

from __future__ import annotations

import base64
import re
from dataclasses import replace

import pytest
from litestar import Litestar, post
from litestar.params import FromPath
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.guard import SAFE_METHODS
from dashboard.security import SECURITY_HEADERS
from dashboard.settings import DashboardSettings
from kvstate import Client, OpStatus

TOKEN = "route-protection-token-0123456789"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()}
PUBLIC = {
    ("GET", "/healthz"),  # the load balancer's and compose's health check
    ("GET", "/static/{file_path:path}"),  # the vendored htmx and the stylesheet: public code
    ("HEAD", "/static/{file_path:path}"),
    ("OPTIONS", "/static/{file_path:path}"),
}
_PARAM = re.compile(r"\{([a-z_]+)(?::[a-z]+)?\}")


def endpoints(app: Litestar) -> list[tuple[str, str]]:
    """(method, route path) of every handler of the app."""
    found = []
    for route in app.routes:
        assert isinstance(route, HTTPRoute), f"{route.path}: a route kind these tests do not know"
        for handler in route.route_handlers:
            found.extend((method, route.path) for method in sorted(handler.http_methods))
    return sorted(set(found))


def concrete(path: str, op_id: str) -> str:
    values = {"op_id": op_id, "name": op_id, "job_id": "nojob", "file_path": "dashboard.css", "path": "nothing"}
    return _PARAM.sub(lambda m: values[m.group(1)], path)


def assert_headers(response: object, where: str) -> None:
    headers = response.headers  # type: ignore[attr-defined]
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (where, name)
    assert "object-src 'none'" in headers["content-security-policy"]
    assert "base-uri 'none'" in headers["content-security-policy"]


@pytest.fixture
def secured(dashboard_settings: DashboardSettings) -> DashboardSettings:
    return replace(dashboard_settings, auth_token=TOKEN, auth_reads=True)


def test_the_app_has_the_routes_these_tests_expect_to_find(secured: DashboardSettings) -> None:
    found = endpoints(create_app(secured))
    assert len(found) > 40  # the enumeration sees the whole app: pages, API, schema, static
    assert ("POST", "/operations/{op_id:str}/cancel") in found and ("GET", "/events") in found
    assert set(found) >= PUBLIC


async def test_every_route_needs_the_token_with_auth_reads_except_the_public_ones(
    client: Client, secured: DashboardSettings
) -> None:
    op = await client.create("orders")
    app = create_app(secured)
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        public = set()
        for method, path in endpoints(app):
            if path == "/events" and method == "GET":
                continue  # a stream: checked with the token below, and by the live test of the cap
            where = f"{method} {path}"
            answer = await http.request(method, concrete(path, op.id))
            assert_headers(answer, where)
            if answer.status_code != 401:
                public.add((method, path))
            else:
                assert answer.headers["www-authenticate"].startswith("Basic"), where
        assert public == PUBLIC
        events = await http.get("/events")
        assert events.status_code == 401
        assert_headers(events, "GET /events")
    assert (await client.get(op.id)).status is OpStatus.PENDING


async def test_every_state_changing_route_needs_the_token_csrf_and_a_same_origin_fetch(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    op = await client.create("orders")
    app = create_app(replace(dashboard_settings, auth_token=TOKEN))  # reads open, writes need the token
    writes = [(method, path) for method, path in endpoints(app) if method not in SAFE_METHODS]
    assert ("POST", "/api/operations/{name:str}") in writes and ("POST", "/operations/{op_id:str}/cancel") in writes
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        csrf = (await http.get("/api/csrf")).json()["csrf_token"]
        for method, path in writes:
            url = concrete(path, op.id)
            where = f"{method} {path}"
            anonymous = await http.request(method, url, headers={"X-CSRFToken": csrf})
            assert anonymous.status_code == 401, where
            assert_headers(anonymous, where)
            no_csrf = await http.request(method, url, headers=BASIC)
            assert no_csrf.status_code == 403, where  # basic auth is resent by browsers: it needs CSRF
            assert_headers(no_csrf, where)
            cross_site = await http.request(
                method, url, headers={**BASIC, "X-CSRFToken": csrf, "Sec-Fetch-Site": "cross-site"}
            )
            assert cross_site.status_code == 403 and "Sec-Fetch-Site" in cross_site.text, where
    assert (await client.get(op.id)).status is OpStatus.PENDING


async def test_a_route_added_later_is_guarded_too(client: Client, dashboard_settings: DashboardSettings) -> None:
    """The protections are app-level middleware, not a per-handler habit: a new write route gets them."""
    calls: list[str] = []

    @post("/operations/{op_id:str}/archive-again", status_code=200)
    async def archive_again(op_id: FromPath[str]) -> dict[str, str]:
        calls.append(op_id)
        return {"archived again": op_id}

    app = create_app(replace(dashboard_settings, auth_token=TOKEN))
    app.register(archive_again)
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        assert (await http.post("/operations/x/archive-again")).status_code == 401
        assert (await http.post("/operations/x/archive-again", headers=BASIC)).status_code == 403  # CSRF
        csrf = (await http.get("/api/csrf")).json()["csrf_token"]
        ok = await http.post("/operations/x/archive-again", headers={**BASIC, "X-CSRFToken": csrf})
        assert ok.status_code == 200 and calls == ["x"]
        assert_headers(ok, "POST /operations/x/archive-again")
