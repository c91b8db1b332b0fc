"""How kvstate connects: TLS, mTLS, TLS first, nkeys, creds files, tokens, and typed, fast failures.

Every server here is a real nats-server with certificates made by the test; every client
connects through ``kvstate.connect`` (what Client, the CLI, the archiver, the dashboard,
the demo and ``kvstate up`` use), configured by ``kvstate.Settings`` only.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nkeys
import pytest
from security_support import Decentralized, Pki, tls_block

import kvstate
from devstack.servers import NatsServer, free_port
from kvstate import AuthenticationFailed, Client, ConnectionLostError, Settings

RoleSettings = Callable[..., Settings]
FAST = 2.0
"""seconds within which a refused connection must fail (KVSTATE_TIMEOUT is 5 s here)"""


def started(server: NatsServer) -> Iterator[NatsServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def tls_first_nats(tmp_path_factory: pytest.TempPathFactory, pki: Pki, token: str) -> Iterator[NatsServer]:
    """TLS before the INFO (handshake_first), token authentication."""
    extra = tls_block(pki, extra="  handshake_first: true") + f'\nauthorization {{ token: "{token}" }}'
    yield from started(NatsServer(tmp_path_factory.mktemp("tls-first"), die_with_parent=True, extra_config=extra))


@pytest.fixture(scope="module")
def user_nkey() -> nkeys.KeyPair:
    import os

    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


@pytest.fixture(scope="module")
def alice_password() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def mixed_nats(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, user_nkey: nkeys.KeyPair, alice_password: str
) -> Iterator[NatsServer]:
    """TLS offered but not required (allow_non_tls); an nkey user and a password user; monitoring on."""
    extra = "\n".join(
        [
            tls_block(pki),
            "allow_non_tls: true",
            "authorization { users = [",
            f"  {{nkey: {user_nkey.public_key.decode()}}}",
            f'  {{user: alice, password: "{alice_password}"}}',
            "] }",
        ]
    )
    server = NatsServer(
        tmp_path_factory.mktemp("mixed"), die_with_parent=True, extra_config=extra, http_port=free_port()
    )
    yield from started(server)


@pytest.fixture(scope="module")
def traced_plain_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """No TLS at all; every protocol line logged (to see what a client sent)."""
    yield from started(NatsServer(tmp_path_factory.mktemp("plain"), die_with_parent=True, extra_config="trace: true"))


@pytest.fixture(scope="module")
def decentralized_nats(tmp_path_factory: pytest.TempPathFactory, decentralized: Decentralized) -> Iterator[NatsServer]:
    """Operator mode (JWTs, a memory resolver), as nsc would set it up."""
    server = NatsServer(
        tmp_path_factory.mktemp("operator-mode"), die_with_parent=True, extra_config=decentralized.server_config
    )
    yield from started(server)


def url(server: NatsServer, scheme: str = "nats", userinfo: str = "") -> str:
    assert server.port is not None
    return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{server.port}"


async def round_trip(settings: Settings) -> None:
    """Connect as a kvstate client, create the bucket if needed, write and read one pipeline."""
    from tests.conftest import PIPELINE

    async with Client(settings, create_bucket=True, name="security-test") as client:
        await client.set_pipeline(PIPELINE)
        assert (await client.refresh_pipeline(PIPELINE.name)).name == PIPELINE.name


async def connect_and_close(settings: Settings) -> None:
    nc = await kvstate.connect(settings)
    await nc.close()


async def fails_fast(settings: Settings, error: type[Exception]) -> Exception:
    started_at = time.monotonic()
    with pytest.raises(error) as info:
        await connect_and_close(settings)
    elapsed = time.monotonic() - started_at
    assert elapsed < FAST, f"failed only after {elapsed:.2f}s"
    return info.value


def connections(server: NatsServer) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/connz?auth=1", timeout=5) as response:
        data = json.loads(response.read())
    return list(data.get("connections") or [])


# ---------------------------------------------------------------- TLS and mTLS


async def test_mtls_without_a_client_certificate_is_refused_at_once(role_settings: RoleSettings, pki: Pki) -> None:
    settings = role_settings("service", nats_tls_cert=None, nats_tls_key=None)
    error = await fails_fast(settings, AuthenticationFailed)
    assert "client certificate" in str(error) and "NATS_TLS_CERT" in str(error)


async def test_mtls_with_a_certificate_of_another_ca_is_refused_at_once(role_settings: RoleSettings, pki: Pki) -> None:
    settings = role_settings("service", nats_tls_cert=pki.other_client_cert, nats_tls_key=pki.other_client_key)
    await fails_fast(settings, AuthenticationFailed)


async def test_a_server_certificate_the_ca_did_not_sign_is_refused_at_once(
    role_settings: RoleSettings, pki: Pki
) -> None:
    settings = role_settings("service", nats_tls_ca=pki.other_ca)
    error = await fails_fast(settings, ConnectionLostError)
    assert "not trusted" in str(error) and "NATS_TLS_CA" in str(error)


async def test_wrong_password_is_refused_at_once(role_settings: RoleSettings) -> None:
    settings = role_settings("service", nats_password="not-the-password")
    error = await fails_fast(settings, AuthenticationFailed)
    assert "NATS_USER" in str(error) and "not-the-password" not in str(error)


async def test_tls_first_connects_when_asked_and_says_why_when_not(
    tls_first_nats: NatsServer, pki: Pki, token: str
) -> None:
    settings = Settings(
        nats_url=url(tls_first_nats, "tls"), nats_token=token, nats_tls_ca=pki.ca, nats_tls_first=True, bucket="first"
    )
    await round_trip(settings)
    # Without NATS_TLS_FIRST the client waits for an INFO the server never sends in plaintext.
    waiting = Settings(nats_url=url(tls_first_nats, "tls"), nats_token=token, nats_tls_ca=pki.ca, timeout=1.0)
    with pytest.raises(ConnectionLostError) as info:
        await connect_and_close(waiting)
    assert "NATS_TLS_FIRST" in str(info.value) and token not in str(info.value)


async def test_wrong_token_is_refused_at_once(tls_first_nats: NatsServer, pki: Pki) -> None:
    settings = Settings(
        nats_url=url(tls_first_nats, "tls"), nats_token="wrong-token", nats_tls_ca=pki.ca, nats_tls_first=True
    )
    error = await fails_fast(settings, AuthenticationFailed)
    assert "NATS_TOKEN" in str(error) and "wrong-token" not in str(error)


async def test_tls_is_used_whenever_asked_for_even_where_the_server_makes_it_optional(
    mixed_nats: NatsServer, pki: Pki, alice_password: str
) -> None:
    """nats-py alone upgrades only when the server requires TLS: a nats:// URL with NATS_TLS_CA must not go plain."""
    settings = Settings(
        nats_url=url(mixed_nats), nats_user="alice", nats_password=alice_password, nats_tls_ca=pki.ca, bucket="mixed"
    )
    nc = await kvstate.connect(settings, name="wants-tls")
    try:
        plain = await kvstate.connect(
            Settings(nats_url=url(mixed_nats), nats_user="alice", nats_password=alice_password), name="plain"
        )
        try:
            by_name = {str(c.get("name")): c for c in connections(mixed_nats)}
            assert by_name["wants-tls"].get("tls_version"), by_name["wants-tls"]
            assert not by_name["plain"].get("tls_version")  # the same server, a client that did not ask
        finally:
            await plain.close()
    finally:
        await nc.close()


async def test_tls_asked_for_and_not_offered_fails_before_anything_is_sent(
    traced_plain_nats: NatsServer, pki: Pki
) -> None:
    secret = "do-not-send-" + secrets.token_hex(4)
    settings = Settings(nats_url=url(traced_plain_nats), nats_user="u", nats_password=secret, nats_tls_ca=pki.ca)
    error = await fails_fast(settings, ConnectionLostError)
    assert "does not offer TLS" in str(error)
    log = traced_plain_nats.log_path.read_text()
    assert "CONNECT" not in log and secret not in log  # not even the CONNECT with the password


# ---------------------------------------------------------------- nkeys and creds files


async def test_nkey_seed_file_authenticates(mixed_nats: NatsServer, user_nkey: nkeys.KeyPair, tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_bytes(user_nkey.seed + b"\n")
    seed.chmod(0o600)
    await round_trip(Settings(nats_url=url(mixed_nats), nats_nkey_seed=seed, bucket="nkey"))


async def test_an_unknown_nkey_is_refused_at_once(mixed_nats: NatsServer, tmp_path: Path) -> None:
    import os

    stranger = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    seed = tmp_path / "stranger.nk"
    seed.write_bytes(stranger.seed)
    error = await fails_fast(Settings(nats_url=url(mixed_nats), nats_nkey_seed=seed), AuthenticationFailed)
    assert "NATS_NKEY_SEED" in str(error)


async def test_creds_file_authenticates_against_an_operator_mode_server(
    decentralized_nats: NatsServer, decentralized: Decentralized
) -> None:
    await round_trip(Settings(nats_url=url(decentralized_nats), nats_creds=decentralized.creds, bucket="creds"))


async def test_creds_of_a_user_the_server_does_not_know_are_refused_at_once(
    decentralized_nats: NatsServer, decentralized: Decentralized, tmp_path: Path
) -> None:
    import os

    text = decentralized.creds.read_text()
    stranger = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    old_seed = text.split("-----BEGIN USER NKEY SEED-----\n", 1)[1].split("\n", 1)[0]
    forged = tmp_path / "forged.creds"
    forged.write_text(text.replace(old_seed, stranger.seed.decode()))  # the JWT of one user, the key of another
    error = await fails_fast(Settings(nats_url=url(decentralized_nats), nats_creds=forged), AuthenticationFailed)
    assert "NATS_CREDS" in str(error)


# ---------------------------------------------------------------- secrets stay secret


async def test_a_password_in_the_url_authenticates_and_never_appears_in_errors_or_logs(
    mixed_nats: NatsServer, alice_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    await round_trip(Settings(nats_url=url(mixed_nats, userinfo=f"alice:{alice_password}"), bucket="inurl"))
    closed = f"nats://alice:{alice_password}@127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionLostError) as info:
        async with Client(Settings(nats_url=closed, timeout=1.0)):
            pass
    assert "alice:***@" in str(info.value)
    wrong = Settings(nats_url=url(mixed_nats, userinfo=f"alice:{alice_password}x"))
    refused = await fails_fast(wrong, AuthenticationFailed)
    assert "alice:***@" in str(refused)
    assert alice_password not in str(info.value) + str(refused) + caplog.text
