"""Trace links (DASHBOARD_TRACE_URL): the detail page and the JSON resource link the operation's trace and each
stage's latest attempt's; the setting is checked; the link is built by one quoting function."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.formatting import trace_link
from dashboard.settings import DashboardSettings
from kvstate import Client, ConfigurationError

OP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GEO_TRACE = "0af7651916cd43dd8448eb211c80319c"
TEMPLATE = "https://jaeger.example/trace/{trace_id}?from=kvstate&x=<1>"


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-00f067aa0ba902b7-01"


async def traced_operation(client: Client) -> str:
    op = await client.create("orders", traceparent=traceparent(OP_TRACE))
    await client.start(op.id, "ingest")  # no trace: no link
    await client.succeed(op.id, "ingest")
    await client.start(op.id, "validate")
    await client.succeed(op.id, "validate")
    await client.start(op.id, "geo", traceparent=traceparent("1" * 32))
    await client.fail(op.id, "geo", "timeout", retryable=True)
    await client.start(op.id, "geo", traceparent=traceparent(GEO_TRACE))  # attempt 2 ran in another trace
    return op.id


async def test_detail_page_and_api_link_the_operation_and_attempt_traces(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    op_id = await traced_operation(client)
    app = create_app(replace(dashboard_settings, trace_url=TEMPLATE))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        html = (await http.get(f"/operations/{op_id}")).text
        fragment = (await http.get(f"/partials/operations/{op_id}", headers={"HX-Request": "true"})).text
        body = (await http.get(f"/api/operations/{op_id}")).json()
    escaped = "https://jaeger.example/trace/{}?from=kvstate&amp;x=&lt;1&gt;"  # autoescaped, never |safe
    for page in (html, fragment):
        link = re.search(r'<a href="([^"]+)" rel="noopener noreferrer" target="_blank" data-testid="trace-link">', page)
        assert link is not None and link.group(1) == escaped.format(OP_TRACE)
        geo = re.search(r'<a href="([^"]+)"[^>]*data-testid="trace-link-geo"[^>]*>trace of attempt 2</a>', page)
        assert geo is not None and geo.group(1) == escaped.format(GEO_TRACE)
        assert 'data-testid="trace-link-ingest"' not in page  # ingest's start carried no trace
        assert "<1>" not in page
    metadata = body["metadata"]
    assert metadata["trace_id"] == OP_TRACE
    assert metadata["trace_url"] == TEMPLATE.replace("{trace_id}", OP_TRACE)
    assert metadata["stages"]["geo"]["trace_url"] == TEMPLATE.replace("{trace_id}", GEO_TRACE)
    assert "trace_url" not in metadata["stages"]["ingest"]


async def test_without_a_trace_url_the_trace_id_is_shown_without_a_link(
    client: Client, http: AsyncTestClient[Litestar]
) -> None:
    op_id = await traced_operation(client)
    html = (await http.get(f"/operations/{op_id}")).text
    assert "<dt>trace</dt>" in html and OP_TRACE[:15] in html
    assert "trace-link" not in html and "jaeger" not in html
    body = (await http.get(f"/api/operations/{op_id}")).json()
    assert body["metadata"]["trace_id"] == OP_TRACE and "trace_url" not in body["metadata"]


async def test_a_finished_attempt_keeps_its_trace_link(client: Client, dashboard_settings: DashboardSettings) -> None:
    op = await client.create("orders")
    await client.start(op.id, "ingest", traceparent=traceparent(GEO_TRACE))
    await client.fail(op.id, "ingest", "bad input", retryable=False)  # the failed attempt is the one to look at
    app = create_app(replace(dashboard_settings, trace_url=TEMPLATE))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        body = (await http.get(f"/api/operations/{op.id}")).json()
    assert body["metadata"]["stages"]["ingest"]["trace_url"] == TEMPLATE.replace("{trace_id}", GEO_TRACE)


def test_trace_link_quotes_and_refuses_what_is_not_a_trace_id() -> None:
    template = "https://tempo.example/explore?q={trace_id}"
    assert trace_link(template, OP_TRACE) == f"https://tempo.example/explore?q={OP_TRACE}"
    assert (
        trace_link(None, OP_TRACE) is None and trace_link("", OP_TRACE) is None and trace_link(template, None) is None
    )
    for hostile in ('"><script>', "javascript:alert(1)", "../../admin", OP_TRACE.upper(), OP_TRACE + "0"):
        assert trace_link(template, hostile) is None  # a raw writer's value: no link, whatever it holds
    braces = 'https://grafana.example/explore?left={"queries":[{"query":"{trace_id}"}]}'
    assert trace_link(braces, OP_TRACE) == braces.replace("{trace_id}", OP_TRACE)  # no str.format on the template


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("ftp://jaeger.example/{trace_id}", "http"),
        ("javascript:alert('{trace_id}')", "http"),
        ("https://jaeger.example/trace/", "{trace_id}"),
        ("/trace/{trace_id}", "http"),
        ("https://jaeger.example/trace/{trace_id} x", "spaces"),
    ],
)
def test_trace_url_setting_is_an_http_url_with_the_placeholder(value: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match="DASHBOARD_TRACE_URL") as raised:
        DashboardSettings.from_env({"DASHBOARD_TRACE_URL": value})
    assert words in str(raised.value)
    with pytest.raises(ConfigurationError, match="DASHBOARD_TRACE_URL"):
        DashboardSettings(trace_url=value)


def test_trace_url_setting_read_from_the_environment() -> None:
    assert DashboardSettings.from_env({}).trace_url is None
    assert DashboardSettings.from_env({"DASHBOARD_TRACE_URL": " "}).trace_url is None  # blank: no links
    url = "https://jaeger.example/trace/{trace_id}"
    assert DashboardSettings.from_env({"DASHBOARD_TRACE_URL": url}).trace_url == url
