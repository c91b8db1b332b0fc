"""Fixtures of the demo tests: demo settings on the test's own bucket and work stream."""

from __future__ import annotations

import pytest

from demo.settings import DemoSettings
from kvstate import Settings


@pytest.fixture
def demo_settings(settings: Settings) -> DemoSettings:
    """A fast, misbehaving demo on this test's bucket, with a stream and subjects of its own."""
    return DemoSettings(
        kv=settings,
        rate=25.0,
        duration=4.0,
        latency_scale=0.3,
        poison_rate=0.1,
        stuck_rate=0.02,
        chaos_rate=0.3,
        seed=20251125,
        drain_timeout=60.0,
        stream=f"DEMO_{settings.bucket}",
        subject_prefix=f"demo.{settings.bucket}",
    )
