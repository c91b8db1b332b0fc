"""deploy/nats as shipped: the certificate script, the server configuration and the compose overlay work.

The server runs deploy/nats/nats-server.conf with only its paths and ports changed for this
machine, on certificates deploy/nats/make-certs.sh made; a client connects with them as a
deployment would. The compose overlay is checked against the code's variables and the roles
of auth.conf (no Docker engine is needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from security_support import AUTH_CONF, ROLES, ROOT

from archiver.settings import ArchiverSettings
from dashboard.settings import DashboardSettings
from demo.settings import DemoSettings
from devstack.servers import find_nats_server, free_port
from kvstate import Client, Settings
from kvstate.settings import env_variables

DEPLOY = ROOT / "deploy" / "nats"
SERVER_CONF = DEPLOY / "nats-server.conf"
OVERLAY = DEPLOY / "compose.secure.yml"
PASSWORDS = {f"PASSWORD_{role.upper()}": f"test-{role}-password" for role in ROLES}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("make-certs.sh needs the openssl command")
    folder = tmp_path_factory.mktemp("made-certs") / "tls"
    result = subprocess.run(
        ["sh", str(DEPLOY / "make-certs.sh"), str(folder), "nats", "localhost", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory, certificates: Path) -> Iterator[int]:
    """deploy/nats/nats-server.conf with this machine's paths and free ports; auth.conf beside it, unchanged."""
    folder = tmp_path_factory.mktemp("shipped-nats")
    text = SERVER_CONF.read_text()
    rendered = (
        text.replace("/etc/nats/tls", str(certificates))
        .replace("store_dir: /data", f"store_dir: {folder / 'data'}")
        .replace("listen: 0.0.0.0:4222", "listen: 127.0.0.1:-1")
        .replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{free_port()}")
    )
    assert rendered.count(str(certificates)) == 3 and "127.0.0.1:-1" in rendered
    (folder / "nats-server.conf").write_text(rendered)
    shutil.copyfile(AUTH_CONF, folder / "auth.conf")
    log = folder / "nats-server.log"
    env = {"PATH": "/usr/bin:/bin", **PASSWORDS}
    proc = subprocess.Popen(
        [find_nats_server(), "-c", str(folder / "nats-server.conf"), "-l", str(log)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            content = log.read_text() if log.exists() else ""
            found = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", content)
            if found and "Server is ready" in content:
                port = int(found.group(1))
                break
            time.sleep(0.05)
        assert port is not None, log.read_text() if log.exists() else "no log"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_shipped_server_refuses_to_start_without_the_passwords(tmp_path: Path, certificates: Path) -> None:
    rendered = SERVER_CONF.read_text().replace("/etc/nats/tls", str(certificates))
    (tmp_path / "nats-server.conf").write_text(rendered.replace("/data", str(tmp_path / "data")))
    shutil.copyfile(AUTH_CONF, tmp_path / "auth.conf")
    checked = subprocess.run(
        [find_nats_server(), "-c", str(tmp_path / "nats-server.conf"), "-t"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode != 0 and "PASSWORD_OPERATOR" in checked.stderr


async def test_the_shipped_server_on_the_scripts_certificates_serves_every_role(
    shipped_server: int, certificates: Path
) -> None:
    for role in ("operator", "service", "archiver", "dashboard", "writer"):
        settings = Settings(
            nats_url=f"tls://127.0.0.1:{shipped_server}",
            nats_user=role,
            nats_password=PASSWORDS[f"PASSWORD_{role.upper()}"],
            nats_tls_ca=certificates / "ca.pem",
            nats_tls_cert=certificates / "client-cert.pem",
            nats_tls_key=certificates / "client-key.pem",
            nats_inbox_prefix="_INBOX" if role == "operator" else f"_INBOX_{role}",
        )
        async with Client(settings, create_bucket=role == "operator", name=f"shipped-{role}") as client:
            assert (await client._open_store().info()).config.name == "KV_operations"


def test_the_certificate_script_keeps_the_keys_private(certificates: Path) -> None:
    names = sorted(path.name for path in certificates.iterdir())
    assert names == ["ca-key.pem", "ca.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    for key in ("ca-key.pem", "client-key.pem", "server-key.pem"):
        assert (certificates / key).stat().st_mode & 0o077 == 0, key


# ---------------------------------------------------------------- the compose overlay


@pytest.fixture(scope="module")
def overlay() -> dict[str, Any]:
    data = yaml.safe_load(OVERLAY.read_text())
    assert isinstance(data, dict)
    return data


def test_the_overlay_sets_only_variables_the_code_reads(overlay: dict[str, Any]) -> None:
    known: set[str] = set()
    for cls in (Settings, ArchiverSettings, DashboardSettings, DemoSettings):
        known |= env_variables(cls)
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in overlay["services"].items():
        assert name in base, f"{name} is not a service of docker-compose.yml"
        environment = set(service.get("environment", {}))
        if name == "nats":
            assert environment == set(PASSWORDS)  # the server's, referenced by auth.conf
            continue
        assert environment <= known, f"{name}: {sorted(environment - known)}"
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", OVERLAY.read_text()))
    assert interpolated == set(PASSWORDS)
    assert all(f"${name}" in AUTH_CONF.read_text() for name in PASSWORDS)


def test_each_service_connects_as_a_role_of_auth_conf_with_that_roles_inbox(overlay: dict[str, Any]) -> None:
    auth = AUTH_CONF.read_text()
    expected = {"bucket-init": "operator", "demo": "operator", "archiver": "archiver", "dashboard": "dashboard"}
    for name, role in expected.items():
        environment = overlay["services"][name]["environment"]
        assert environment["NATS_USER"] == role, name
        assert environment["NATS_PASSWORD"].startswith(f"${{PASSWORD_{role.upper()}:?"), name
        assert environment["NATS_URL"].startswith("tls://"), name
        assert f"{{user: {role}, password: $PASSWORD_{role.upper()}" in auth
        prefix = environment.get("NATS_INBOX_PREFIX")
        if role != "operator":
            assert f'"{prefix}.>"' in auth, f"{name}: auth.conf does not let {role} subscribe to {prefix}.>"
        Settings.from_env({k: v for k, v in environment.items() if not k.startswith("NATS_TLS_")})


def test_the_overlay_mounts_what_the_server_configuration_and_the_script_name(overlay: dict[str, Any]) -> None:
    nats = overlay["services"]["nats"]
    config_path = nats["command"][-1]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in nats["volumes"])
    by_target = {target: source for source, target in mounts.items()}
    assert by_target[config_path] == "./deploy/nats/nats-server.conf"
    assert by_target[str(Path(config_path).parent / "auth.conf")] == "./deploy/nats/auth.conf"
    server_conf = SERVER_CONF.read_text()
    for target, source in by_target.items():
        if target.startswith("/etc/nats/tls/"):
            assert f'"{target}"' in server_conf, target
            assert source == f"./deploy/nats/tls/{Path(target).name}"
    client = overlay["x-nats-tls"]
    for variable in ("NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"):
        assert any(volume.endswith(f":{client[variable]}:ro") for volume in overlay["x-client-tls"]), variable
