"""Settings of NATS security combine sensibly, and no secret is ever printed.

A password in NATS_URL or DATABASE_URL, NATS_PASSWORD or NATS_TOKEN never appears in a
settings repr, an error message, what ``kvstate up`` prints or its ``stack.json`` (mode
0600 from the moment it exists).
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
from security_support import Decentralized, Pki

from archiver.settings import ArchiverSettings
from dashboard.settings import DashboardSettings
from devstack.up import Stack, StackSettings
from kvstate import ConfigurationError, Settings
from kvstate.cli import main as kvstate_main
from kvstate.settings import redact_url

SECRET = "hunter2-s3cr3t"
_SEED = "SUAJ7TU3HYJ3JCZMT3M7QV3JTLFDXAFBZRUKTHX2XNY3DURYWJ3ZRJ4NGA"  # a syntactically valid user seed, used nowhere


# ---------------------------------------------------------------- redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        (f"nats://alice:{SECRET}@nats:4222", "nats://alice:***@nats:4222"),
        (f"nats://{SECRET}@nats:4222", "nats://***@nats:4222"),  # a lone NATS URL user is a token
        (f"tls://a:{SECRET}@n1:4222, tls://a:{SECRET}@n2:4222", "tls://a:***@n1:4222, tls://a:***@n2:4222"),
        (f"postgresql://kvstate:{SECRET}@db:5432/kvstate", "postgresql://kvstate:***@db:5432/kvstate"),
        (f"postgresql://kv:p@ss{SECRET}@db/kv", "postgresql://kv:***@db/kv"),  # an unescaped @ in the password
        ("postgresql://kvstate@db/kvstate", "postgresql://kvstate@db/kvstate"),  # a user name alone is no secret
        (
            f"postgresql://db/kv?user=k&password={SECRET}&sslmode=require",
            "postgresql://db/kv?user=k&password=***&sslmode=require",
        ),
        (f"host=db user=kvstate password={SECRET} dbname=kv", "host=db user=kvstate password=*** dbname=kv"),
    ],
)
def test_redact_url_masks_passwords_and_tokens(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


# ---------------------------------------------------------------- what settings accept


def test_settings_read_the_security_variables(pki: Pki) -> None:
    settings = Settings.from_env(
        {
            "NATS_URL": "tls://nats:4222",
            "NATS_USER": "service",
            "NATS_PASSWORD": SECRET,
            "NATS_TLS_CA": str(pki.ca),
            "NATS_TLS_CERT": str(pki.client_cert),
            "NATS_TLS_KEY": str(pki.client_key),
            "NATS_TLS_FIRST": "yes",
            "NATS_INBOX_PREFIX": "_INBOX_service",
        }
    )
    assert (settings.nats_user, settings.nats_password, settings.nats_tls_first) == ("service", SECRET, True)
    assert settings.nats_tls_ca == pki.ca and settings.tls_required
    assert not Settings().tls_required and Settings(nats_url="tls://n:4222").tls_required


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NATS_TLS_CERT": "{client_cert}"}, "NATS_TLS_CERT and NATS_TLS_KEY go together"),
        ({"NATS_TLS_KEY": "{client_key}"}, "NATS_TLS_CERT and NATS_TLS_KEY go together"),
        ({"NATS_USER": "service"}, "NATS_USER and NATS_PASSWORD go together"),
        ({"NATS_PASSWORD": SECRET}, "NATS_USER and NATS_PASSWORD go together"),
        ({"NATS_USER": "a", "NATS_PASSWORD": "b", "NATS_TOKEN": "c"}, "more than one way"),
        ({"NATS_URL": "nats://a:b@nats:4222", "NATS_TOKEN": "c"}, "more than one way"),
        ({"NATS_TLS_CA": "/nonexistent/ca.pem"}, "NATS_TLS_CA='/nonexistent/ca.pem': no such file"),
        ({"NATS_CREDS": "/nonexistent/x.creds"}, "NATS_CREDS='/nonexistent/x.creds': no such file"),
        ({"NATS_NKEY_SEED": "/nonexistent/x.nk"}, "NATS_NKEY_SEED='/nonexistent/x.nk': no such file"),
        ({"NATS_TLS_FIRST": "maybe"}, "NATS_TLS_FIRST"),
        ({"NATS_INBOX_PREFIX": "_INBOX.>"}, "NATS_INBOX_PREFIX"),
    ],
)
def test_settings_that_do_not_combine_are_a_configuration_error_naming_the_variable(
    pki: Pki, environ: dict[str, str], message: str
) -> None:
    paths = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    environ = {name: value.format(**paths) for name, value in environ.items()}
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(environ)


def test_an_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    key.chmod(0)
    if os.geteuid() == 0:  # root reads every file: let os.access answer as for anyone else
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigurationError, match=r"NATS_TLS_CA=.*not readable by this process"):
        Settings.from_env({"NATS_TLS_CA": str(key)})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nothing here\n", "no -----BEGIN NATS USER JWT----- section"),
        # a seed and no JWT: nats-py 2.16 would read the file for a JWT forever, inside the event loop
        (f"-----BEGIN USER NKEY SEED-----\n{_SEED}\n------END USER NKEY SEED------\n", "no -----BEGIN NATS USER JWT"),
        ("-----BEGIN NATS USER JWT-----\nhead.@@@.sig\n------END NATS USER JWT------\n", "claims that are not"),
        ("-----BEGIN NATS USER JWT-----\nhead.e30.sig\n------END NATS USER JWT------\n", "is not a user JWT"),
        ("-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n", "three dot-separated parts"),
    ],
)
def test_a_creds_file_without_its_sections_is_refused_before_nats_py_would_hang_on_it(
    tmp_path: Path, content: str, message: str
) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text(content)
    with pytest.raises(ConfigurationError, match=rf"NATS_CREDS=.*{message}"):
        Settings.from_env({"NATS_CREDS": str(creds)})


def test_a_creds_file_without_its_seed_and_a_seed_file_that_is_no_user_seed_are_refused(
    tmp_path: Path, decentralized: Decentralized
) -> None:
    creds_text = decentralized.creds.read_text()
    jwt_only = tmp_path / "jwt-only.creds"
    jwt_only.write_text(creds_text.split("****")[0])
    with pytest.raises(ConfigurationError, match=r"NATS_CREDS=.*no -----BEGIN USER NKEY SEED----- section"):
        Settings.from_env({"NATS_CREDS": str(jwt_only)})
    account_seed = tmp_path / "account.nk"
    account_seed.write_text("SAAGNJOZTRPYYXG2NJX3ZNGXYUSDYX2BWO447W3SHG6XQ7U66RWHQ3JUXM\n")
    with pytest.raises(ConfigurationError, match=r"NATS_NKEY_SEED=.*no user nkey seed"):
        Settings.from_env({"NATS_NKEY_SEED": str(account_seed)})
    broken = tmp_path / "broken.nk"
    broken.write_text("SUAbroken\n")
    with pytest.raises(ConfigurationError, match=r"NATS_NKEY_SEED=.*not valid"):
        Settings.from_env({"NATS_NKEY_SEED": str(broken)})


# ---------------------------------------------------------------- no secret printed


def test_no_settings_repr_shows_a_secret() -> None:
    environ = {
        "NATS_URL": f"nats://alice:{SECRET}@nats:4222",
        "DATABASE_URL": f"postgresql://kvstate:{SECRET}@db:5432/kvstate",
        "DASHBOARD_AUTH_TOKEN": SECRET,
        "DASHBOARD_SECRET": SECRET * 3,
    }
    shown = [
        repr(Settings(nats_user="alice", nats_password=SECRET)),
        repr(Settings(nats_token=SECRET)),
        repr(ArchiverSettings.from_env(environ)),
        repr(DashboardSettings.from_env(environ)),
        repr(StackSettings.from_env(environ)),
    ]
    for text in shown:
        assert SECRET not in text, text
    assert "alice:***@nats" in shown[2] and "kvstate:***@db" in shown[2]


def test_a_rejected_value_is_named_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        ArchiverSettings.from_env({"DATABASE_URL": f"mysql://kvstate:{SECRET}@db/kvstate"})
    assert "DATABASE_URL" in str(info.value) and SECRET not in str(info.value)


def test_kvstate_up_writes_stack_json_private_and_prints_no_password(tmp_path: Path) -> None:
    env = {
        "NATS_URL": f"nats://alice:{SECRET}@127.0.0.1:4222",
        "DATABASE_URL": f"postgresql://kvstate:{SECRET}@127.0.0.1:5432/kvstate",
        "DASHBOARD_HOST": "127.0.0.1",
        "DASHBOARD_PORT": "8000",
        "ARCHIVER_METRICS_PORT": "0",
    }
    out = io.StringIO()
    stack = Stack(StackSettings.from_env({"KVSTATE_STATE_DIR": str(tmp_path)}), env, demo=False, out=out)
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    previous = os.umask(0)  # even a umask that takes nothing away leaves the file private
    try:
        stack._write_pids(env)
    finally:
        os.umask(previous)
    stack._announce(env)
    path = tmp_path / "stack.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["nats_url"] == "nats://alice:***@127.0.0.1:4222"
    assert data["database_url"] == "postgresql://kvstate:***@127.0.0.1:5432/kvstate"
    assert SECRET not in path.read_text() and SECRET not in out.getvalue()
    assert "alice:***@" in out.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]  # no staging file left


def test_the_archive_command_names_an_unreachable_database_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from devstack.servers import free_port

    url = f"postgresql://kvstate:{SECRET}@127.0.0.1:{free_port()}/kvstate"
    code = kvstate_main(["archive", "get", "someid"], environ={"DATABASE_URL": url})
    err = capsys.readouterr().err
    assert code == 1 and "kvstate:***@127.0.0.1" in err and SECRET not in err
