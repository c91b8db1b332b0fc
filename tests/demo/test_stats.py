"""The progress line and its rate."""

from __future__ import annotations

import pytest

from demo.stats import DemoStats
from kvstate import Outcome


def test_progress_rate_counts_operations_created_in_the_last_window() -> None:
    stats = DemoStats(started_at=100.0)
    stats.created = 50
    assert stats.rate(now=105.0) == pytest.approx(10.0)
    stats.created = 80
    assert stats.rate(now=110.0) == pytest.approx(6.0)  # 50 -> 80 over the last 5 s
    assert stats.rate(now=120.0) == pytest.approx(0.0)
    line = stats.line(now=120.0)
    assert "in flight" in line
    assert "done" in line
    assert "failed" in line


def test_outcomes_are_counted_by_kind() -> None:
    stats = DemoStats()
    for outcome in (Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE):
        stats.record(outcome)
    assert (stats.applied, stats.duplicate, stats.stale) == (2, 1, 1)
    assert stats.as_dict()["applied"] == 2


def test_transient_and_rejected_messages_are_shown_and_reported() -> None:
    stats = DemoStats(started_at=0.0)
    stats.transient, stats.rejected = 3, 1
    assert "transient 3" in stats.line(now=1.0)
    assert "rejected 1" in stats.line(now=1.0)
    assert (stats.as_dict()["transient"], stats.as_dict()["rejected"]) == (3, 1)
