"""Passwords and TLS: the URL's parameters reach PostgreSQL unchanged; refusals are archiver errors.

A private PostgreSQL with scram-sha-256 passwords that takes TLS connections only (a
self-signed certificate for 127.0.0.1, pg_hba.conf ``hostssl`` only), and the shared test
server, which speaks no TLS at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from archiver.errors import ArchiveAccessDenied, ArchiveUnavailable
from archiver.read import ArchiveReader
from archiver.settings import ArchiverSettings
from archiver.store import ArchiveStore
from devstack.servers import PostgresServer
from kvstate import ConfigurationError

PASSWORD = "correct-horse-battery"
_OPENSSL_REQ = (
    *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
    *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
)
_TLS_ONLY_HBA = """\
local    all  all                scram-sha-256
hostssl  all  all  127.0.0.1/32  scram-sha-256
"""


def _for_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    """A password-protected PostgreSQL that refuses connections without TLS, and its certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    base = tmp_path_factory.mktemp("pgtls")
    tls = base / "tls"
    tls.mkdir()
    cert, key = tls / "server.crt", tls / "server.key"
    for certificate, private_key in ((cert, key), (tls / "other.crt", tls / "other.key")):
        subprocess.run(
            [*_OPENSSL_REQ, "-keyout", str(private_key), "-out", str(certificate)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    key.chmod(0o600)
    for path in (tls, cert, key):
        _for_postgres(path)
    server = PostgresServer(
        base / "pg",
        password=PASSWORD,
        settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key), "fsync": "off"},
    )
    server.init()
    (server.data_dir / "pg_hba.conf").write_text(_TLS_ONLY_HBA)  # before the first start: TLS or nothing
    server.start()
    try:
        yield server, cert
    finally:
        server.stop()


def tls_url(server: PostgresServer, cert: Path, *, password: str = PASSWORD) -> str:
    return server.dsn("postgres", password=password) + f"?sslmode=verify-full&sslrootcert={cert}"


async def test_sslmode_and_sslrootcert_of_the_url_reach_the_reader_and_the_archiver(
    tls_server: tuple[PostgresServer, Path],
) -> None:
    server, cert = tls_server
    url = tls_url(server, cert)
    async with ArchiveStore.open(url, reader_role=None) as store:  # migrations and a pool over verified TLS
        await store.ping()
    async with ArchiveReader.connect(url) as archive:
        assert (await archive.search(limit=1)).items == []
    # the same server, trusting another certificate: verify-full refuses the server's
    other = cert.with_name("other.crt")
    with pytest.raises(ArchiveUnavailable) as unverified:
        async with ArchiveReader.connect(server.dsn("postgres") + f"?sslmode=verify-full&sslrootcert={other}"):
            pass
    assert "certificate verify failed" in str(unverified.value)
    # and sslmode=disable is really sent: pg_hba.conf admits TLS connections only
    with pytest.raises(ArchiveAccessDenied) as plain:
        async with ArchiveReader.connect(server.dsn("postgres") + "?sslmode=disable"):
            pass
    assert "no encryption" in str(plain.value)


async def test_a_wrong_password_is_archive_access_denied_and_never_shown(
    tls_server: tuple[PostgresServer, Path],
) -> None:
    server, cert = tls_server
    with pytest.raises(ArchiveAccessDenied) as info:
        async with ArchiveReader.connect(tls_url(server, cert, password="not-the-password-xyz")):
            pass
    assert isinstance(info.value.__cause__, asyncpg.InvalidPasswordError)
    assert "password authentication failed" in str(info.value)
    assert "not-the-password-xyz" not in str(info.value) and PASSWORD not in str(info.value)
    with pytest.raises(ArchiveAccessDenied):
        async with ArchiveStore.open(tls_url(server, cert, password="not-the-password-xyz")):
            pass


async def test_sslmode_disable_works_and_require_fails_fast_against_a_server_without_tls(database_url: str) -> None:
    async with ArchiveStore.open(database_url + "?sslmode=disable") as store:
        await store.ping()
    async with ArchiveReader.connect(database_url + "?sslmode=disable") as archive:
        assert (await archive.search(limit=1)).items == []
    async with asyncio.timeout(15):  # a clear error, not a hang
        with pytest.raises(ArchiveUnavailable) as reader:
            async with ArchiveReader.connect(database_url + "?sslmode=require"):
                pass
        with pytest.raises(ArchiveUnavailable) as store:
            async with ArchiveStore.open(database_url + "?sslmode=require"):
                pass
        with pytest.raises(ArchiveUnavailable) as no_root:  # verify-full without sslrootcert: libpq's default file
            async with ArchiveReader.connect(database_url + "?sslmode=verify-full"):
                pass
    for error in (reader.value, store.value):
        assert "rejected SSL upgrade" in str(error) and not isinstance(error, ArchiveAccessDenied)
        assert isinstance(error.__cause__, OSError)
    assert "root certificate file" in str(no_root.value)


def test_an_unknown_sslmode_or_a_missing_certificate_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="sslmode=on is not one of disable, allow, prefer, require"):
        ArchiverSettings.from_env({"DATABASE_URL": "postgresql://a@h/db?sslmode=on"})
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigurationError, match=f"sslrootcert={missing}: no such file"):
        ArchiverSettings.from_env({"DATABASE_URL": f"postgresql://a@h/db?sslmode=verify-ca&sslrootcert={missing}"})
    with pytest.raises(ConfigurationError) as quoted:
        ArchiverSettings.from_env({"DATABASE_URL": "postgresql://a:s3cr3t-pw@h/db?sslmode=bogus"})
    assert "s3cr3t-pw" not in str(quoted.value) and "postgresql://a:***@h/db" in str(quoted.value)
    missing.write_text("a certificate")
    url = f"postgresql://a@h/db?sslmode=verify-ca&sslrootcert={missing}"
    assert ArchiverSettings.from_env({"DATABASE_URL": url}).database_url == url  # unchanged
