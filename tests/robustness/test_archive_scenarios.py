"""Short runs of the archive scenarios T12-T14 (robustness/scenarios/archive.py) on real servers.

Each starts its own nats-server and PostgreSQL under ``tmp_path`` and asserts the
scenario's pass figures; the full-length runs are ``python -m robustness T12`` (T13, T14).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from robustness.base import RunOptions, ScenarioResult
from robustness.scenarios.archive import SCENARIOS

pytestmark = pytest.mark.slow


def _explain(result: ScenarioResult) -> str:
    return "; ".join(result.failures) + f" | figures: {result.figures}"


async def test_t12_archiver_killed_every_5s_archives_each_operation_once_at_its_last_revision(tmp_path: Path) -> None:
    result = await SCENARIOS["T12"](RunOptions(workdir=tmp_path, seconds=16.0, scale=0.12))
    assert result.passed, _explain(result)
    assert int(result.figures["kills"]) >= 3
    assert result.figures["rows"] == result.figures["operations"]


@pytest.mark.timeout(150)  # about 45 s; its PostgreSQL restarts can stretch it on a busy machine
async def test_t13_postgres_killed_and_stopped_loses_nothing_and_removes_nothing_unarchived(tmp_path: Path) -> None:
    result = await SCENARIOS["T13"](RunOptions(workdir=tmp_path, seconds=24.0, scale=0.5))
    assert result.passed, _explain(result)
    assert result.figures["postgres_kills"] == 3


async def test_t14_update_between_snapshot_and_removal_keeps_the_newer_revision(tmp_path: Path) -> None:
    result = await SCENARIOS["T14"](RunOptions(workdir=tmp_path, seconds=10.0, scale=0.25))
    assert result.passed, _explain(result)
    assert result.figures["rows_at_newer_revision"] == result.figures["operations"]
    assert result.figures["removed_while_newer_revision"] == 0


def test_every_archive_scenario_is_registered() -> None:
    assert {"T12", "T13", "T14", "T20"} <= set(SCENARIOS)
