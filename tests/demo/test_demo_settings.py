"""DemoSettings and StackSettings: parsed from an environment mapping, bad values rejected with a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.settings import DemoSettings
from devstack.up import StackSettings
from kvstate import ConfigurationError
from kvstate.settings import env_variables


def test_demo_settings_defaults_and_overrides() -> None:
    default = DemoSettings.from_env({})
    assert (default.rate, default.duration, default.stream) == (5.0, 0.0, "DEMO_WORK")
    assert default.seed is None
    custom = DemoSettings.from_env(
        {"DEMO_RATE": "50", "DEMO_DURATION": "60", "DEMO_SEED": "7", "NATS_URL": "nats://10.0.0.1:4222"}
    )
    assert (custom.rate, custom.duration, custom.seed) == (50.0, 60.0, 7)
    assert custom.kv.nats_url == "nats://10.0.0.1:4222"


def test_demo_settings_env_map_names_every_variable() -> None:
    names = env_variables(DemoSettings)
    assert {"DEMO_RATE", "DEMO_DURATION", "DEMO_STREAM", "DEMO_POISON_RATE"} <= names
    assert all(name.startswith("DEMO_") for name in names)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEMO_RATE", "-1"),
        ("DEMO_RATE", "fast"),
        ("DEMO_DURATION", "inf"),
        ("DEMO_POISON_RATE", "1.5"),
        ("DEMO_LATENCY_SCALE", "0"),
        ("DEMO_CONCURRENCY", "0"),
        ("DEMO_STREAM", "has.dot"),
        ("DEMO_SUBJECT_PREFIX", "demo.>"),
        ("KVSTATE_REPLICAS", "2"),
    ],
)
def test_bad_demo_values_raise_configuration_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        DemoSettings.from_env({variable: value})


def test_out_of_range_values_are_rejected_when_built_in_code() -> None:
    with pytest.raises(ConfigurationError, match="DEMO_CHAOS_RATE"):
        DemoSettings(chaos_rate=2.0)


def test_stack_settings_defaults_and_overrides() -> None:
    default = StackSettings.from_env({})
    assert default.state_dir == Path(".state")
    assert (default.nats_url, default.database_url) == (None, None)
    assert (default.nats_port, default.dashboard_port, default.sync_interval) == (4222, 8000, "1s")
    assert not default.dashboard_port_fixed
    custom = StackSettings.from_env(
        {"KVSTATE_STATE_DIR": "/tmp/x", "DASHBOARD_PORT": "9000", "KVSTATE_SYNC_INTERVAL": "always"}
    )
    assert custom.state_dir == Path("/tmp/x")
    assert custom.dashboard_port == 9000
    assert custom.dashboard_port_fixed
    assert custom.sync_interval == "always"
    assert {"KVSTATE_STATE_DIR", "NATS_URL", "DATABASE_URL", "DASHBOARD_PORT"} <= env_variables(StackSettings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DASHBOARD_PORT", "70000"), ("KVSTATE_NATS_PORT", "x"), ("KVSTATE_SYNC_INTERVAL", "sometimes")],
)
def test_bad_stack_values_raise_configuration_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        StackSettings.from_env({variable: value})
