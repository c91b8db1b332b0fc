"""Configuration: every variable the docs and the deployment name is read by a settings class,
and every variable a settings class reads is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from archiver.settings import ArchiverSettings
from dashboard.settings import DashboardSettings
from demo.settings import DemoSettings
from devstack.up import StackSettings
from kvstate import ConfigurationError, Settings
from kvstate.settings import env_variables, setting_specs, settings_table

SETTINGS = (Settings, ArchiverSettings, DashboardSettings, DemoSettings, StackSettings)
HARNESS = {"NATS_SERVER_BIN", "PG_BIN"}  # paths read by devstack.servers, documented beside the settings
NAMES_NOT_VARIABLES = {"DEMO_WORK"}  # the demo's stream name
NOT_OURS = {
    "PYTHONASYNCIODEBUG",
    "CI",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_HOST_AUTH_METHOD",
    "ARCHIVE_OWNER_PASSWORD",  # of docker-compose.yml's postgres init script
    "ARCHIVE_READER_PASSWORD",
    "PGDATA",
    "PATH",
    "HOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
}
VARIABLE = re.compile(r"`((?:NATS|KVSTATE|DATABASE|ARCHIVER|DASHBOARD|DEMO)_[A-Z_]+)")


def read_by_code() -> set[str]:
    names: set[str] = set()
    for cls in SETTINGS:
        names |= env_variables(cls)
    return names


def test_every_variable_in_readme_and_docs_is_read_by_the_code() -> None:
    known = read_by_code() | HARNESS | NAMES_NOT_VARIABLES
    for path in [Path("README.md"), *Path("docs").glob("*.md")]:
        named = set(VARIABLE.findall(path.read_text()))
        assert named <= known, f"{path} names variables no settings class reads: {sorted(named - known)}"


def test_every_variable_in_docker_compose_is_read_by_the_code() -> None:
    compose = yaml.safe_load(Path("docker-compose.yml").read_text())
    known = read_by_code()
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        keys = set(env) if isinstance(env, dict) else {item.split("=", 1)[0] for item in env}
        unknown = keys - known - NOT_OURS
        assert not unknown, f"service {name} sets variables no settings class reads: {sorted(unknown)}"


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = set(VARIABLE.findall(Path("docs/operations.md").read_text()))
    missing = read_by_code() - documented
    assert not missing, f"docs/operations.md#configuration lacks {sorted(missing)}"


@pytest.mark.parametrize("cls", [cls for cls in SETTINGS if setting_specs(cls)], ids=lambda cls: cls.__name__)
def test_the_docs_table_is_the_one_the_declarations_render(cls: type) -> None:
    """Each setting is declared once (kvstate.settings.setting); the docs hold the rows it renders."""
    docs = Path("docs/operations.md").read_text()
    table = settings_table(cls)
    missing = [row for row in table.splitlines()[2:] if row not in docs]
    assert not missing, f"docs/operations.md#configuration differs from the declarations of {cls.__name__}:\n{table}"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KVSTATE_HISTORY", "65"),
        ("KVSTATE_REPLICAS", "2"),
        ("KVSTATE_TIMEOUT", "-1"),
        ("KVSTATE_BUCKET", "a.b"),
        ("KVSTATE_MAX_RETRIES", "many"),
    ],
)
def test_bad_values_are_a_configuration_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        Settings.from_env({variable: value})


def test_defaults_and_overrides() -> None:
    assert Settings.from_env({}) == Settings()
    custom = Settings.from_env({"NATS_URL": "nats://a:1, nats://b:2", "KVSTATE_BUCKET": "ops", "KVSTATE_HISTORY": ""})
    assert custom.servers == ["nats://a:1", "nats://b:2"]
    assert custom.bucket == "ops"
    assert custom.history == 1
