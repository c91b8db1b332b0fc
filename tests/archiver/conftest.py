"""Fixtures of the archiver tests: archiver settings on the test's bucket and database."""

from __future__ import annotations

import pytest

from archiver.settings import ArchiverSettings
from kvstate import Settings


@pytest.fixture
def archiver_settings(settings: Settings, database_url: str) -> ArchiverSettings:
    """Archive everything at once: no grace period, short batches, no metrics port, fast redelivery."""
    return ArchiverSettings(
        kv=settings,
        database_url=database_url,
        batch_size=100,
        batch_timeout=0.05,
        grace_period=0.0,
        ack_wait=2.0,
        marker_ttl=300.0,
        metrics_port=0,
    )
