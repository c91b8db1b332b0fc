"""ArchiverSettings: built from an environment mapping, every variable documented and typed."""

from __future__ import annotations

import pytest

from archiver.settings import ArchiverSettings
from kvstate.errors import ConfigurationError
from kvstate.settings import env_variables, setting_specs, settings_table


def test_defaults_and_every_variable_parsed() -> None:
    assert ArchiverSettings.from_env({}) == ArchiverSettings()
    settings = ArchiverSettings.from_env(
        {
            "NATS_URL": "nats://10.0.0.1:4222",
            "KVSTATE_BUCKET": "ops",
            "DATABASE_URL": "postgresql://u@db/archive",
            "ARCHIVER_BATCH_SIZE": "250",
            "ARCHIVER_BATCH_TIMEOUT": "0.5",
            "ARCHIVER_GRACE_PERIOD": "0",
            "ARCHIVER_CONSUMER": "archiver-b",
            "ARCHIVER_MARKER_TTL": "60",
            "ARCHIVER_ACK_WAIT": "10",
            "ARCHIVER_SWEEP_INTERVAL": "5",
            "ARCHIVER_METRICS_PORT": "0",
            "ARCHIVER_METRICS_HOST": "0.0.0.0",
            "ARCHIVER_STALL_AFTER": "15",
        }
    )
    assert settings.kv.nats_url == "nats://10.0.0.1:4222" and settings.kv.bucket == "ops"
    assert settings.database_url == "postgresql://u@db/archive"
    assert (settings.batch_size, settings.batch_timeout, settings.grace_period) == (250, 0.5, 0.0)
    assert (settings.consumer, settings.marker_ttl, settings.ack_wait, settings.sweep_interval) == (
        "archiver-b",
        60,
        10,
        5,
    )
    assert (settings.metrics_port, settings.metrics_host, settings.stall_after) == (0, "0.0.0.0", 15)


def test_the_documented_variables_are_the_ones_read() -> None:
    names = env_variables(ArchiverSettings)
    assert names == {spec.env for spec in setting_specs(ArchiverSettings).values()}
    table = settings_table(ArchiverSettings)
    assert all(f"`{name}`" in table for name in names)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ARCHIVER_BATCH_SIZE", "0"),
        ("ARCHIVER_BATCH_SIZE", "20000"),
        ("ARCHIVER_BATCH_TIMEOUT", "-1"),
        ("ARCHIVER_GRACE_PERIOD", "soon"),
        ("ARCHIVER_CONSUMER", "has.dot"),
        ("ARCHIVER_MARKER_TTL", "0.5"),
        ("ARCHIVER_METRICS_PORT", "70000"),
        ("ARCHIVER_STALL_AFTER", "0"),
        ("DATABASE_URL", "mysql://x"),
        ("KVSTATE_HISTORY", "0"),
    ],
)
def test_bad_values_are_configuration_errors_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        ArchiverSettings.from_env({variable: value})
