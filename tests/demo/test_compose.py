"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine needed)."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml

from demo.settings import DemoSettings
from devstack.servers import NatsServer, PostgresServer
from devstack.up import StackSettings
from kvstate import Settings
from kvstate.settings import env_variables

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = {"archiver", "dashboard", "demo"}
INIT_SERVICES = {"bucket-init"}
NATS_NODES = {"nats", "nats-1", "nats-2", "nats-3"}
# variables of the official images and of the postgres-roles init script, not of our code
IMAGE_VARIABLES = {
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_HOST_AUTH_METHOD",
    "ARCHIVE_OWNER_PASSWORD",
    "ARCHIVE_READER_PASSWORD",
}
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(:?-[^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def settings_classes() -> list[type]:
    """Every settings class of the system; the archiver's and the dashboard's must exist by now."""
    classes: list[type] = [Settings, DemoSettings, StackSettings]
    for module, name in (("archiver.settings", "ArchiverSettings"), ("dashboard.settings", "DashboardSettings")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pytest.skip(f"{module}.{name} is not built yet")
    return classes


def read_variables() -> set[str]:
    found: set[str] = set()
    for cls in settings_classes():
        found |= env_variables(cls)
    return found


def test_compose_has_every_service_from_official_images_and_one_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == NATS_NODES | APP_SERVICES | INIT_SERVICES | {"postgres"}
    for name in NATS_NODES:
        assert services[name]["image"].startswith("nats:"), name
        assert "healthcheck" in services[name], name
    assert services["postgres"]["image"].startswith("postgres:")
    for name in APP_SERVICES:
        assert services[name]["build"] == ".", name
        assert services[name]["command"][0] == name, name  # the kvstate subcommand
        assert "healthcheck" in services[name], name
        # nothing starts before the bucket exists: the archiver and the dashboard never create it
        assert services[name]["depends_on"]["bucket-init"] == {"condition": "service_completed_successfully"}
    init = services["bucket-init"]
    assert (init["build"], init["command"][:2], init["restart"]) == (".", ["bucket", "init"], "no")
    assert "--wait" in init["command"]  # retries while NATS or a forming cluster is not ready
    assert init["depends_on"] == {"nats": {"condition": "service_healthy"}}
    assert "healthcheck" in services["postgres"]
    assert (ROOT / "Dockerfile").exists()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kvstate"]' in dockerfile
    for package in ("kvstate", "archiver", "dashboard", "demo", "templates"):
        assert f"COPY {package} " in dockerfile, package


def test_cluster_profile_has_three_nodes_with_their_own_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = [name for name, svc in services.items() if "cluster" in svc.get("profiles", [])]
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    volumes = set()
    for name in nodes:
        assert services[name]["command"][-2:] == ["--server_name", name]
        volumes |= {v.split(":")[0] for v in services[name]["volumes"]}
    assert len(volumes) == 3
    cluster_config = compose["configs"]["nats-cluster"]["content"]
    for name in nodes:
        assert f"nats-route://{name}:6222" in cluster_config
    for name in APP_SERVICES | INIT_SERVICES:
        environment = services[name]["environment"]
        assert environment["KVSTATE_REPLICAS"] == "${KVSTATE_REPLICAS:-1}"  # 3 for the cluster (docs/deploy.md)
        assert environment["NATS_URL"] == "${NATS_URL:-nats://nats:4222}"


def test_every_nats_config_states_its_sync_interval_and_is_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    import subprocess

    binary = NatsServer(tmp_path).binary
    for name, config in compose["configs"].items():
        if not name.startswith("nats-"):
            continue  # postgres-roles: test_the_postgres_init_script_makes_an_owner_and_a_read_only_login
        text = config["content"]
        assert re.search(r"^\s*sync_interval: (always|\d+(ms|s|m))$", text, re.M), name
        path = tmp_path / f"{name}.conf"
        path.write_text(text.replace("/data", str(tmp_path / name)))
        result = subprocess.run([binary, "-c", str(path), "-t"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    mounted = {c["source"] for svc in compose["services"].values() for c in svc.get("configs", [])}
    assert mounted == set(compose["configs"])


def test_ports_match_the_code_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "4222:4222" in services["nats"]["ports"]
    dashboard_port = services["dashboard"]["environment"]["DASHBOARD_PORT"]
    assert f"{dashboard_port}:{dashboard_port}" in services["dashboard"]["ports"]
    metrics_port = services["archiver"]["environment"]["ARCHIVER_METRICS_PORT"]
    assert f"{metrics_port}:{metrics_port}" in services["archiver"]["ports"]
    assert f":{metrics_port}/" in " ".join(services["archiver"]["healthcheck"]["test"])
    assert f":{dashboard_port}/healthz" in " ".join(services["dashboard"]["healthcheck"]["test"])
    assert services["dashboard"]["environment"]["DASHBOARD_HOST"] == "0.0.0.0"  # reachable through the port map
    assert Settings().nats_url.endswith(":4222")


def test_every_variable_compose_sets_is_read_by_a_settings_class(compose: dict[str, Any]) -> None:
    known = read_variables()
    set_here: set[str] = set()
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), name
        if name in APP_SERVICES | INIT_SERVICES:
            set_here |= set(environment)
        else:
            assert set(environment) <= IMAGE_VARIABLES, name
    expected = {"NATS_URL", "DATABASE_URL", "DASHBOARD_DATABASE_URL", "DASHBOARD_PORT", "DEMO_RATE", "KVSTATE_REPLICAS"}
    assert expected <= set_here
    assert set_here - known == set()
    interpolated = set(_INTERPOLATION.findall((ROOT / "docker-compose.yml").read_text()))
    names = {var for var, _ in interpolated}
    assert names - known - IMAGE_VARIABLES == set()


def test_the_postgres_init_script_makes_an_owner_and_a_read_only_login(compose: dict[str, Any], tmp_path: Path) -> None:
    """The postgres-roles config, run as the image runs it (sh, psql as the superuser), on a real PostgreSQL;
    then the archiver and the dashboard connect with the URLs the compose file gives them."""
    from archiver.store import ArchiveStore

    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    (mount,) = postgres["configs"]
    assert mount == {"source": "postgres-roles", "target": "/docker-entrypoint-initdb.d/kvstate-roles.sh"}
    script = tmp_path / "kvstate-roles.sh"
    script.write_text(compose["configs"]["postgres-roles"]["content"].replace("$$", "$"))  # compose's escape
    passwords = {"ARCHIVE_OWNER_PASSWORD": "owner-secret-1", "ARCHIVE_READER_PASSWORD": "reader-secret-2"}
    server = PostgresServer(tmp_path / "pg", settings={"fsync": "off"}, password="super-secret-0").start()
    try:
        env = {
            **os.environ,
            **passwords,
            "POSTGRES_USER": "postgres",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(server.port),
            "PGPASSWORD": "super-secret-0",
            "PATH": f"{server.bin_dir}:{os.environ['PATH']}",
        }
        result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

        def url(service: str, variable: str) -> str:
            """The service's URL from the compose file, pointed at this server, with the test's password."""
            parts = urlsplit(services[service]["environment"][variable])
            secret = passwords["ARCHIVE_OWNER_PASSWORD" if service == "archiver" else "ARCHIVE_READER_PASSWORD"]
            return f"postgresql://{parts.username}:{secret}@127.0.0.1:{server.port}{parts.path}"

        archiver_url, dashboard_url = url("archiver", "DATABASE_URL"), url("dashboard", "DASHBOARD_DATABASE_URL")

        async def check() -> None:
            async with ArchiveStore.open(archiver_url) as store:  # migrations and grants as a plain owner
                assert store.reader_access is not None and store.reader_access.problems == ()
            owner = await asyncpg.connect(archiver_url)
            try:
                assert not await owner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            finally:
                await owner.close()
            reader = await asyncpg.connect(dashboard_url)
            try:
                assert await reader.fetchval("SELECT count(*) FROM archived_operations") == 0
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute("DELETE FROM archived_operations")
            finally:
                await reader.close()

        asyncio.run(check())
    finally:
        server.stop()
    assert "DATABASE_URL" not in services["dashboard"]["environment"]  # the dashboard never gets the owner's password
