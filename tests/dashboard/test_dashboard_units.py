"""Pure pieces: untrusted values on display (dashboard.formatting), settings, filters, the broadcaster."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.middleware.csrf import generate_csrf_token

from dashboard.cli import register, settings_from
from dashboard.errors import BadQuery
from dashboard.feed import Broadcaster
from dashboard.formatting import show
from dashboard.methods import decode_event, idempotency_key, if_match, operation_method, wait_timeout
from dashboard.query import decode_page_token, encode_page_token, filter_params, parse_filter, parse_filter_expression
from dashboard.security import csrf_token_is_valid
from dashboard.settings import DashboardSettings
from dashboard.templating import make_environment, template_directory
from kvstate import ConfigurationError, CorruptValue
from kvstate.settings import env_variables


def test_show_pretty_prints_json_and_escapes_controls() -> None:
    assert show({"a": [1, 2]}) == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert show("bell\x07 and \u202egnp.exe") == "bell\\x07 and \\u202egnp.exe"
    assert show(b"\x00ab").startswith("0000  00 61 62 ") and show(b"\x00ab").endswith("  .ab")


def test_show_corrupt_value_previews_its_first_512_bytes() -> None:
    raw = b"<script>" + b"x" * 1000
    text = show(CorruptValue("op.x", 42, "JSON is malformed", raw))
    assert text.startswith("corrupt, revision 42, first 512 of 1008 bytes")
    assert text.count("\n") == 1 + 512 // 16  # header line (detail line included) and 32 hex lines


@given(
    st.recursive(
        st.none() | st.booleans() | st.text() | st.integers(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_rendered_untrusted_values_never_contain_markup(value: object) -> None:
    env = make_environment()
    html = env.from_string("<pre>{{ v|show }}</pre>").render(v=value)
    inner = html[len("<pre>") : -len("</pre>")]
    assert "<" not in inner and ">" not in inner and '"' not in inner


def test_every_template_autoescapes() -> None:
    env = make_environment()
    assert env.autoescape is True
    assert template_directory().joinpath("base.html").is_file()
    for name in env.list_templates():
        assert "|safe" not in (template_directory() / name).read_text(), name


def test_settings_from_env_and_their_variables() -> None:
    settings = DashboardSettings.from_env(
        {
            "DASHBOARD_PORT": "9000",
            "DASHBOARD_AUTH_TOKEN": "longenough",
            "DATABASE_URL": "postgresql://x/y",
            "NATS_URL": "nats://h:1",
        }
    )
    assert settings.port == 9000 and settings.auth_token == "longenough" and settings.kv.nats_url == "nats://h:1"
    assert settings.database_url == "postgresql://x/y"
    assert DashboardSettings.from_env({}).auth_token is None
    assert "DASHBOARD_AUTH_TOKEN" in env_variables(DashboardSettings)
    with pytest.raises(ConfigurationError, match="DASHBOARD_PORT"):
        DashboardSettings.from_env({"DASHBOARD_PORT": "http"})
    with pytest.raises(ConfigurationError, match="DASHBOARD_AUTH_TOKEN"):
        DashboardSettings.from_env({"DASHBOARD_AUTH_TOKEN": "short"})


def test_cli_registers_the_subcommand_with_nats_url() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "--nats-url", "nats://a:1", "--port", "8123"])
    settings = settings_from(args, {"DASHBOARD_HOST": "0.0.0.0"})
    assert settings.kv.nats_url == "nats://a:1" and settings.port == 8123 and settings.host == "0.0.0.0"
    assert callable(args.handler)
    # an option is parsed and checked like its variable: the same error, naming the variable
    bad = parser.parse_args(["dashboard", "--port", "70000"])
    with pytest.raises(ConfigurationError, match="DASHBOARD_PORT"):
        settings_from(bad, {})
    bucket = parser.parse_args(["dashboard", "--bucket", "a.b"])
    with pytest.raises(ConfigurationError, match="KVSTATE_BUCKET"):
        settings_from(bucket, {})


def test_the_archive_url_is_the_dashboards_own_and_falls_back_to_database_url() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    environ = {"DATABASE_URL": "postgresql://kvstate:owner@db/kvstate"}
    fallback = settings_from(parser.parse_args(["dashboard"]), environ)
    assert (fallback.database_url, fallback.database_url_fallback) == (environ["DATABASE_URL"], True)
    own = settings_from(parser.parse_args(["dashboard"]), {**environ, "DASHBOARD_DATABASE_URL": "postgresql://r@db/k"})
    assert (own.database_url, own.database_url_fallback) == ("postgresql://r@db/k", False)
    option = settings_from(parser.parse_args(["dashboard", "--database-url", "postgresql://o@db/k"]), environ)
    assert (option.database_url, option.database_url_fallback) == ("postgresql://o@db/k", False)
    assert settings_from(parser.parse_args(["dashboard"]), {}).database_url is None
    assert "DASHBOARD_DATABASE_URL" in env_variables(DashboardSettings)


def test_filters_round_trip_through_the_url() -> None:
    params = {
        "status": ["running,failed"],
        "stage": ["geo"],
        "meta": ["k=v"],
        "order": ["oldest"],
        "id": ["01"],
        "stuck": ["1"],
    }
    flt = parse_filter(params)
    assert flt.stuck and not parse_filter({"stuck": ["0"]}).stuck
    again = parse_filter({k: [v for key, v in filter_params(flt) if key == k] for k, _ in filter_params(flt)})
    assert again == flt
    assert parse_filter_expression("status=running AND meta.customer=42") == {
        "status": ["running"],
        "meta": ["customer=42"],
    }
    assert decode_page_token(encode_page_token((1.5, "abc"))) == (1.5, "abc")
    with pytest.raises(BadQuery, match="page_token"):
        decode_page_token("bm90IGEgdG9rZW4")


def test_csrf_token_check_accepts_only_tokens_signed_with_the_secret() -> None:
    token = generate_csrf_token("a" * 32)
    assert csrf_token_is_valid(token, "a" * 32)
    assert not csrf_token_is_valid(token, "b" * 32)
    assert not csrf_token_is_valid(token[:64], "a" * 32) and not csrf_token_is_valid("", "a" * 32)
    assert not csrf_token_is_valid(token[:-1] + "é", "a" * 32)  # a cookie is any bytes: no TypeError
    assert not csrf_token_is_valid(token[:-1] + ("0" if token[-1] != "0" else "1"), "a" * 32)


async def test_broadcaster_debounces_and_drops_for_slow_clients() -> None:
    broadcaster = Broadcaster(debounce=0.05, queue_size=2)
    broadcaster.start()
    slow = broadcaster.subscribe()
    for _ in range(3):
        for _ in range(50):
            broadcaster.notify()  # fifty changes in a burst make one signal
        await asyncio.sleep(0.12)
    assert slow.qsize() == 2 and broadcaster.sent == 2 and broadcaster.dropped == 1
    stream = broadcaster.stream(max_age=5)
    assert (await anext(stream)).comment == "connected"
    await broadcaster.stop()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert broadcaster.clients == 1  # the slow queue never read; the stream unsubscribed itself


def test_method_inputs_parse_as_documented() -> None:
    from kvstate import Cancel, SucceedStage

    assert if_match({}) is None and if_match({"if-match": "*"}) is None
    assert if_match({"if-match": '"12"'}) == 12 and if_match({"if-match": "12"}) == 12
    # weak, unbalanced, list, negative, non-ASCII digits, empty (an unset variable in a script: never unconditional)
    for bad in ('W/"12"', '"12', "12a", '"1", "2"', "-1", "١٢", "", " "):
        with pytest.raises(BadQuery, match="If-Match"):
            if_match({"if-match": bad})
    assert idempotency_key({"idempotency-key": '"abc-1"'}) == "abc-1" and idempotency_key({}) is None
    assert wait_timeout([]) == 30.0 and wait_timeout(["1.5s"]) == 1.5 and wait_timeout(["500ms"]) == 0.5
    assert wait_timeout(["45"]) == 45.0 and wait_timeout(["3600s"]) == 60.0  # capped, not refused
    with pytest.raises(BadQuery, match="timeout"):
        wait_timeout(["1s", "2s"])
    event = decode_event(b'{"type": "succeed", "stage": "geo", "metadata": {"n": 1}}', "key-1")
    assert event == SucceedStage(stage="geo", metadata={"n": 1}, event_id="key-1")
    assert decode_event(b'{"type": "cancel", "event_id": "mine"}', None) == Cancel(event_id="mine")
    assert decode_event(b'{"type": "cancel"}', None).event_id  # a fresh ULID, as kvstate.events gives
    assert operation_method("operations/abc:wait", "GET") == ("abc", "wait")
    assert operation_method("abc", "GET") == ("abc", "")
