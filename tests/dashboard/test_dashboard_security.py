"""The dashboard's guard (dashboard.guard) and its settings, through the app on real NATS.

Allowed hosts, the token for reads and writes, throttled failed logins, the rate limit and
the stream cap, Sec-Fetch-Site, the audit log, Secure cookies over TLS, the start-up
refusal, and the secrets kept out of the settings' repr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import httpx
import pytest
from dashboard_support import csrf_token
from litestar import Litestar
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.cli import main
from dashboard.settings import DashboardSettings
from kvstate import Client, OpStatus

Http = AsyncTestClient[Litestar]
TOKEN = "a-long-dashboard-token-0123456789"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"alice:{TOKEN}".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class AuditLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        assert message.startswith("audit ")
        self.lines.append(json.loads(message.removeprefix("audit ")))

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in self.lines if line["event"] == name]


@pytest.fixture
def audit_lines() -> Iterator[AuditLines]:
    handler = AuditLines()
    logger = logging.getLogger("dashboard.audit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def secured(dashboard_settings: DashboardSettings) -> DashboardSettings:
    return replace(dashboard_settings, auth_token=TOKEN, auth_reads=True, login_failures=3)


async def serve(settings: DashboardSettings, base_url: str = "http://127.0.0.1") -> AsyncTestClient[Litestar]:
    return AsyncTestClient(app=create_app(settings), base_url=base_url)


def test_settings_repr_masks_the_token_the_secret_and_the_database_password() -> None:
    settings = DashboardSettings.from_env(
        {
            "DASHBOARD_AUTH_TOKEN": TOKEN,
            "DASHBOARD_SECRET": "csrf-secret-0123456789",
            "DATABASE_URL": "postgresql://kvstate:pg-password@db:5432/kvstate",
        }
    )
    shown = repr(settings)
    for secret in (TOKEN, "csrf-secret-0123456789", "pg-password"):
        assert secret not in shown and secret not in str(settings)
    assert "auth_token='***'" in shown and "secret='***'" in shown
    assert "postgresql://kvstate:***@db:5432/kvstate" in shown and "port=8000" in shown
    assert "auth_token=None" in repr(DashboardSettings())  # unset is shown as unset


def test_new_settings_parse_and_refuse_bad_values() -> None:
    from kvstate import ConfigurationError

    settings = DashboardSettings.from_env(
        {
            "DASHBOARD_AUTH_TOKEN": TOKEN,
            "DASHBOARD_AUTH_READS": "yes",
            "DASHBOARD_ALLOWED_HOSTS": "Dash.Example.com., *.internal, ::1",
            "DASHBOARD_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
            "DASHBOARD_RATE_LIMIT": "0",
        }
    )
    assert settings.auth_reads and settings.rate_limit == 0
    assert settings.host_patterns == ("dash.example.com", "*.internal", "::1")
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert DashboardSettings().host_patterns == ("localhost", "127.0.0.1", "::1")
    assert DashboardSettings(host="10.1.2.3").host_patterns[-1] == "10.1.2.3"
    for variable, value in [
        ("DASHBOARD_AUTH_READS", "maybe"),
        ("DASHBOARD_ALLOWED_HOSTS", "dash.example.com:8000"),
        ("DASHBOARD_ALLOWED_HOSTS", "dash.*.com"),
        ("DASHBOARD_TRUSTED_PROXIES", "proxy.example.com"),
        ("DASHBOARD_MAX_STREAMS", "-1"),
    ]:
        with pytest.raises(ConfigurationError, match=variable):
            DashboardSettings.from_env({variable: value, "DASHBOARD_AUTH_TOKEN": TOKEN})
    with pytest.raises(ConfigurationError, match="DASHBOARD_AUTH_READS"):
        DashboardSettings.from_env({"DASHBOARD_AUTH_READS": "true"})  # reads would need a token there is not


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "dashboard.example.com"])
def test_refuses_to_start_on_a_non_loopback_address_without_a_token(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, environ in ((["--host", host], {}), ([], {"DASHBOARD_HOST": host})):
        assert main(argv, environ=environ) == 2
        error = capsys.readouterr().err
        assert error.startswith("kvstate dashboard: refusing to start: DASHBOARD_HOST=")
        assert "DASHBOARD_AUTH_TOKEN" in error and "DASHBOARD_ALLOW_ANONYMOUS" in error


def test_starts_on_loopback_or_with_a_token_or_when_anonymous_use_is_allowed() -> None:
    assert DashboardSettings(host="127.0.0.1").exposure_problem() is None
    assert DashboardSettings(host="::1").exposure_problem() is None
    assert DashboardSettings(host="localhost").exposure_problem() is None
    assert DashboardSettings(host="0.0.0.0", auth_token=TOKEN).exposure_problem() is None
    assert DashboardSettings(host="0.0.0.0", allow_anonymous=True).exposure_problem() is None
    assert DashboardSettings(host="0.0.0.0").exposure_problem() is not None


async def test_only_allowed_host_names_are_answered(client: Client, dashboard_settings: DashboardSettings) -> None:
    async with await serve(dashboard_settings) as http:
        assert (await http.get("/", headers={"Host": "127.0.0.1:8000"})).status_code == 200
        assert (await http.get("/api/overview", headers={"Host": "LOCALHOST"})).status_code == 200
        assert (await http.get("/healthz", headers={"Host": "[::1]:8000"})).status_code == 200
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost.:80x", "[::2]:8000"):
            refused = await http.get("/api/overview", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "DASHBOARD_ALLOWED_HOSTS" in refused.json()["error"]["message"]
            assert refused.headers["content-security-policy"]  # the headers on a refusal too
    wildcard = replace(dashboard_settings, allowed_hosts=("*.example.com",))
    async with await serve(wildcard) as http:
        assert (await http.get("/", headers={"Host": "dash.example.com"})).status_code == 200
        assert (await http.get("/", headers={"Host": "example.com"})).status_code == 400
        assert (await http.get("/", headers={"Host": "evilexample.com"})).status_code == 400


async def test_reads_need_the_token_with_auth_reads_but_health_and_static_do_not(
    client: Client, secured: DashboardSettings
) -> None:
    op = await client.create("orders")
    async with await serve(secured) as http:
        for path in ("/", f"/operations/{op.id}", "/partials/banner", f"/api/operations/{op.id}", "/metrics"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic")
            assert (await http.get(path, headers=BASIC)).status_code == 200, path
            assert (await http.get(path, headers=BEARER)).status_code == 200, path
        assert (await http.get("/schema/openapi.json")).status_code == 401
        schema = (await http.get("/schema/openapi.json", headers=BEARER)).json()
        assert schema["security"] == [{"token": []}, {"basic": []}]
        assert schema["paths"]["/healthz"]["get"]["security"] == [{}]
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/static/dashboard.css")).status_code == 200


async def test_reads_stay_open_without_auth_reads_and_writes_need_the_token(
    client: Client, dashboard_settings: DashboardSettings, audit_lines: AuditLines
) -> None:
    op = await client.create("orders")
    async with await serve(replace(dashboard_settings, auth_token=TOKEN)) as http:
        assert (await http.get(f"/api/operations/{op.id}")).status_code == 200
        refused = await http.post(f"/api/operations/{op.id}:cancel")
        assert refused.status_code == 401
        assert (await client.get(op.id)).status is OpStatus.PENDING
    assert audit_lines.events("login.refused")[-1]["reason"] == "no token"


async def test_a_bearer_header_is_no_credential_without_a_configured_token(
    client: Client, http: Http, audit_lines: AuditLines
) -> None:
    op = await client.create("orders")
    forged = await http.post(f"/api/operations/{op.id}:cancel", headers={"Authorization": "Bearer anything"})
    assert forged.status_code == 403  # the CSRF check still applies
    assert (await client.get(op.id)).status is OpStatus.PENDING
    assert audit_lines.events("cancel")[-1]["who"] == "anonymous" and audit_lines.events("cancel")[-1]["status"] == 403


async def test_wrong_tokens_are_throttled_per_client_and_audited_without_the_token(
    client: Client, secured: DashboardSettings, audit_lines: AuditLines
) -> None:
    wrong = {"Authorization": "Basic " + base64.b64encode(b"mallory:guess-number-1").decode()}
    async with await serve(secured) as http:
        for _ in range(3):
            assert (await http.get("/", headers=wrong)).status_code == 401
        locked = await http.get("/", headers=wrong)
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 200
        # locked out: even the right token is not compared until the window ends
        assert (await http.get("/", headers=BASIC)).status_code == 429
        assert (await http.get("/api/overview", headers=BEARER)).status_code == 429
        assert (await http.get("/api/overview", headers=BEARER)).json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert (await http.get("/healthz")).status_code == 200  # public routes ask for nothing
    refused = audit_lines.events("login.refused")
    assert [line["reason"] for line in refused] == ["wrong token"] * 3 + ["throttled"] * 4
    assert refused[0]["user"] == "mallory" and refused[0]["client"] == "testclient" and refused[0]["path"] == "/"
    assert refused[0]["who"] == "anonymous" and refused[0]["scheme"] == "basic"
    logged = json.dumps(audit_lines.lines)
    assert "guess-number-1" not in logged and TOKEN not in logged


async def test_a_good_login_clears_the_failures(client: Client, secured: DashboardSettings) -> None:
    wrong = {"Authorization": "Bearer not-the-token"}
    async with await serve(secured) as http:
        for _ in range(2):
            assert (await http.get("/api/overview", headers=wrong)).status_code == 401
        assert (await http.get("/api/overview", headers=BEARER)).status_code == 200
        for _ in range(2):
            assert (await http.get("/api/overview", headers=wrong)).status_code == 401  # counting from zero again


async def test_rate_limit_per_client_with_retry_after(client: Client, dashboard_settings: DashboardSettings) -> None:
    async with await serve(replace(dashboard_settings, rate_limit=5)) as http:
        answers = [await http.get("/api/overview") for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[-1].headers["retry-after"] == "12"  # 5 a minute: one every 12 s
    assert answers[-1].json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    async with await serve(replace(dashboard_settings, rate_limit=0)) as http:  # 0: off
        assert all([(await http.get("/static/dashboard.css")).status_code == 200 for _ in range(20)])


async def test_cross_site_writes_are_refused_by_sec_fetch_site(
    client: Client, http: Http, audit_lines: AuditLines
) -> None:
    op = await client.create("orders")
    token = await csrf_token(http)
    for site in ("cross-site", "same-site"):
        refused = await http.post(
            f"/operations/{op.id}/cancel", headers={"X-CSRFToken": token, "Sec-Fetch-Site": site, "HX-Request": "true"}
        )
        assert refused.status_code == 403 and "Sec-Fetch-Site" in refused.text
    assert (await client.get(op.id)).status is OpStatus.PENDING
    # a cross-site read is fine (links from elsewhere), and a same-origin write goes through
    assert (await http.get(f"/operations/{op.id}", headers={"Sec-Fetch-Site": "cross-site"})).status_code == 200
    done = await http.post(
        f"/operations/{op.id}/cancel",
        headers={"X-CSRFToken": token, "Sec-Fetch-Site": "same-origin", "HX-Request": "true"},
    )
    assert done.status_code == 200
    assert [line["status"] for line in audit_lines.events("cancel")] == [403, 403, 200]


async def test_every_write_is_audited_with_who_what_and_where(
    client: Client, dashboard_settings: DashboardSettings, audit_lines: AuditLines
) -> None:
    first, second, third = [await client.create("orders") for _ in range(3)]
    async with await serve(replace(dashboard_settings, auth_token=TOKEN)) as http:
        page = await http.post(
            f"/operations/{first.id}/cancel",
            headers={**BASIC, "X-CSRFToken": await csrf_token(http), "HX-Request": "true"},
            data={"reason": "page"},
        )
        assert page.status_code == 200
        http.cookies.clear()
        api = await http.post(f"/api/operations/{second.id}:cancel", headers=BEARER, json={"reason": "api"})
        assert api.status_code == 200
        applied = await http.post(
            f"/api/operations/{third.id}:apply", headers=BEARER, json={"type": "start", "stage": "ingest"}
        )
        assert applied.status_code == 200
        stale = await http.post(f"/api/operations/{second.id}:cancel", headers=BEARER)
        assert stale.status_code == 409
    cancels, applies = audit_lines.events("cancel"), audit_lines.events("apply")
    assert [(c["operation"], c["status"], c.get("outcome")) for c in cancels] == [
        (first.id, 200, None),
        (second.id, 200, "applied"),
        (second.id, 409, None),
    ]
    assert cancels[0]["user"] == "alice" and cancels[0]["path"] == f"/operations/{first.id}/cancel"
    assert [(a["operation"], a["status"], a["outcome"]) for a in applies] == [(third.id, 200, "applied")]
    for line in (*cancels, *applies):
        assert str(line["who"]).startswith("token:") and line["client"] == "testclient" and line["method"] == "POST"
    assert TOKEN not in json.dumps(audit_lines.lines)


async def test_cookies_are_secure_and_hsts_is_sent_over_tls(
    client: Client, dashboard_settings: DashboardSettings
) -> None:
    async with await serve(dashboard_settings, base_url="https://127.0.0.1") as http:
        answer = await http.get("/api/csrf")
        assert "; Secure" in answer.headers["set-cookie"]
        assert answer.headers["strict-transport-security"] == "max-age=31536000"
    async with await serve(dashboard_settings) as http:
        plain = await http.get("/api/csrf")
        assert "secure" not in plain.headers["set-cookie"].lower()
        assert "strict-transport-security" not in plain.headers


class TestLiveLimits:
    """Limits that need a real server: an event stream held open."""

    @pytest.fixture
    def dashboard_settings(self, settings: object) -> DashboardSettings:
        return DashboardSettings(kv=settings, debounce=0.05, secret="s" * 32, max_streams=2)  # type: ignore[arg-type]

    @pytest.fixture
    async def streams(self, live_server: str) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=live_server, timeout=5) as http:
            yield http

    async def test_event_streams_and_long_polls_are_capped_per_client(
        self, client: Client, live_server: str, streams: httpx.AsyncClient
    ) -> None:
        op = await client.create("orders")
        async with streams.stream("GET", "/events") as one, streams.stream("GET", "/events") as two:
            assert one.status_code == two.status_code == 200
            third = await streams.get("/events")
            assert third.status_code == 429 and third.headers["retry-after"] == "5"
            wait = await streams.get(f"/api/operations/{op.id}:wait", params={"timeout": "1s"})
            assert wait.status_code == 429  # a long poll holds a connection too
            assert (await streams.get(f"/api/operations/{op.id}")).status_code == 200  # a plain read does not
        for _ in range(50):  # the server notices the closed streams
            if (await streams.get(f"/api/operations/{op.id}:wait", params={"timeout": "0s"})).status_code == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the streams were never given back")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:8000", True),
        ("LocalHost:80", True),
        ("localhost.", True),
        ("[::1]", True),
        ("[::1]:8000", True),
        ("::1", True),
        ("dash.example.com", False),
        ("", False),
        (":8000", False),
        ("localhost:", True),
        ("localhost:80x", False),
        ("[::1]x", False),
        ("localhost@evil.example", False),
        ("evil.example#localhost", False),
    ],
)
def test_host_names_are_compared_without_port_case_or_final_dot(host: str, allowed: bool) -> None:
    from dashboard.guard import host_allowed

    assert host_allowed(host, DashboardSettings().host_patterns) is allowed
    assert host_allowed(host, ("*",)) is True
    assert host_allowed("a.dash.example.com:443", ("*.dash.example.com",)) is True
    assert host_allowed("dash.example.com", ("*.dash.example.com",)) is False


def test_allow_anonymous_is_an_option_too() -> None:
    import argparse

    from dashboard.cli import _add_arguments, settings_from

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    assert settings_from(parser.parse_args(["--host", "0.0.0.0", "--allow-anonymous"]), {}).exposure_problem() is None
    assert settings_from(parser.parse_args(["--host", "0.0.0.0"]), {}).exposure_problem() is not None
    assert settings_from(parser.parse_args([]), {"DASHBOARD_ALLOW_ANONYMOUS": "true"}).allow_anonymous
