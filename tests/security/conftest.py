"""Fixtures of the NATS security tests: certificates made here, servers with the shipped permissions.

- ``pki``: a CA (trustme), a server certificate for 127.0.0.1 and a client certificate,
  written as PEM files; a second CA nobody trusts.
- ``secured_nats``: a nats-server requiring TLS with client certificates (mTLS) whose users
  and permissions are deploy/nats/auth.conf itself (included, not copied), passwords from
  its environment as in production; the bucket ``operations`` and ``PIPELINE`` are stored by
  the operator.
- ``role_settings(role)``: kvstate Settings of one role on it (user, password, CA, client
  certificate, the role's own inbox prefix).
- ``mint_user_creds``: a decentralized-auth setup made here (operator, account and user
  JWTs signed with nkeys, a memory resolver) and the user's creds file.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import nkeys
import pytest
import trustme
from security_support import AUTH_CONF, BUCKET, ROLES, Decentralized, Pki, include_line, jwt, keypair, tls_block

from devstack.servers import NatsServer
from kvstate import Client, Settings
from tests.conftest import PIPELINE


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("kvstate-service", common_name="kvstate-service")
    stranger = other.issue_cert("kvstate-stranger")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "other_ca": other.cert_pem,
        "other_client_cert": stranger.cert_chain_pems[0],
        "other_client_key": stranger.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = folder / f"{name}.pem"
        blob.write_to_path(str(path))
        path.chmod(0o600)
        paths[name] = path
    return Pki(**paths)


@pytest.fixture(scope="session")
def role_passwords() -> dict[str, str]:
    # nats-server parses an environment variable's value as a configuration value: a
    # token_urlsafe password such as "10k..." or "2026-..." stopped it (docs/security.md)
    return {role: "pw" + secrets.token_hex(16) for role in ROLES}


@pytest.fixture(scope="session")
def secured_nats(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, role_passwords: dict[str, str]
) -> Iterator[NatsServer]:
    directory = tmp_path_factory.mktemp("secured-nats")
    server = NatsServer(
        directory,
        die_with_parent=True,
        extra_config=tls_block(pki, verify=True) + "\n" + include_line(directory, AUTH_CONF),
        environment={f"PASSWORD_{role.upper()}": password for role, password in role_passwords.items()},
    )
    server.start()
    try:
        asyncio.run(_store_bucket(settings_for(server, pki, role_passwords, "operator")))
        yield server
    finally:
        server.stop()


async def _store_bucket(settings: Settings) -> None:
    async with Client(settings, create_bucket=True, name="security-operator") as client:
        await client.set_pipeline(PIPELINE)


def settings_for(server: NatsServer, pki: Pki, passwords: dict[str, str], role: str, **overrides: object) -> Settings:
    assert server.port is not None
    values: dict[str, object] = {
        "nats_url": f"tls://127.0.0.1:{server.port}",
        "nats_user": role,
        "nats_password": passwords[role],
        "nats_tls_ca": pki.ca,
        "nats_tls_cert": pki.client_cert,
        "nats_tls_key": pki.client_key,
        "nats_inbox_prefix": "_INBOX" if role == "operator" else f"_INBOX_{role}",
        "bucket": BUCKET,
        "timeout": 5.0,
        "deadline": 10.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def role_settings(secured_nats: NatsServer, pki: Pki, role_passwords: dict[str, str]) -> Callable[..., Settings]:
    """``role_settings("service", timeout=2.0)``: Settings of that role on the secured server."""

    def make(role: str, **overrides: object) -> Settings:
        return settings_for(secured_nats, pki, role_passwords, role, **overrides)

    return make


@pytest.fixture(scope="session")
def decentralized(tmp_path_factory: pytest.TempPathFactory) -> Decentralized:
    operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = jwt(operator.public_key.decode(), operator, "kvstate-test", {"type": "operator", "version": 2})
    account_jwt = jwt(
        account.public_key.decode(),
        operator,
        "kvstate",
        {"type": "account", "version": 2, "limits": {**unlimited, "leaf": -1, **jetstream}},
    )
    system_jwt = jwt(
        system.public_key.decode(), operator, "SYS", {"type": "account", "version": 2, "limits": {**unlimited}}
    )
    user_jwt = jwt(
        user.public_key.decode(),
        account,
        "service",
        {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = tmp_path_factory.mktemp("creds") / "service.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    creds.chmod(0o600)
    config = "\n".join(
        [
            f"operator: {operator_jwt}",
            f"system_account: {system.public_key.decode()}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {account.public_key.decode()}: {account_jwt}",
            f"  {system.public_key.decode()}: {system_jwt}",
            "}",
        ]
    )
    return Decentralized(config, creds, user.public_key.decode())
