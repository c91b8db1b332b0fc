"""Short runs of the NATS robustness scenarios against real nats-server processes.

Each run is the full scenario with a shorter fault phase (``seconds``) and fewer writers
(``scale``); the pass figures are the same, except the full-length write target of T1.
``python -m robustness all`` runs them at full length (docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from nats.js import api

from robustness.__main__ import collect_scenarios
from robustness.base import RunOptions
from robustness.cluster import Cluster
from robustness.scenarios import nats as scenarios
from robustness.truth import persist_problems

pytestmark = pytest.mark.slow


def options(tmp_path: Path, seconds: float, *, scale: float = 0.5, sync_interval: str = "1s") -> RunOptions:
    return RunOptions(workdir=tmp_path, seconds=seconds, scale=scale, sync_interval=sync_interval, seed=7)


def test_the_runner_collects_every_nats_scenario() -> None:
    found = collect_scenarios()
    assert set(scenarios.SCENARIOS) <= set(found)
    assert {"T1-R1", "T1-R3", "T2", "T3", "T4", "T5", "T10", "T11"} <= set(found)


async def test_every_config_states_sync_interval_and_an_async_stream_is_refused(tmp_path: Path) -> None:
    async with Cluster(tmp_path, size=1, sync_interval="always") as cluster:
        assert cluster.configs_state_sync_interval()
        assert "sync_interval: always" in cluster.config_texts()["n0"]
        nc = await nats.connect(cluster.url)
        try:
            js = nc.jetstream()
            info = await js.add_stream(name="ASYNC", subjects=["async.>"], persist_mode=api.PersistMode.ASYNC)
            assert persist_problems(info.config)  # the suite's own guard sees it
            assert (await cluster.persist_modes("ASYNC")) == {"n0": "async"}
            fine = await js.add_stream(name="SYNC", subjects=["sync.>"])
            assert not persist_problems(fine.config)
        finally:
            await nc.close()


@pytest.mark.timeout(60)
async def test_t1_contended_cas_on_one_node(tmp_path: Path) -> None:
    result = await scenarios.t1_r1(options(tmp_path, 10))
    assert result.passed, result.failures
    assert int(result.figures["conflicts_10071"]) > 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sync_interval", ["1s", "always"])
async def test_t1_contended_cas_on_three_nodes_sees_both_conflict_codes(tmp_path: Path, sync_interval: str) -> None:
    result = await scenarios.t1_r3(options(tmp_path, 12, sync_interval=sync_interval))
    assert result.passed, result.failures
    assert result.figures["sync_interval"] == sync_interval


@pytest.mark.timeout(120)
async def test_t2_random_node_killed_loses_nothing(tmp_path: Path) -> None:
    result = await scenarios.t2(options(tmp_path, 20))
    assert result.passed, result.failures
    assert result.figures["kills"] == 2


@pytest.mark.timeout(120)
async def test_t3_leader_killed_loses_nothing_and_writes_resume(tmp_path: Path) -> None:
    result = await scenarios.t3(options(tmp_path, 20))
    assert result.passed, result.failures
    assert float(result.figures["max_write_gap_s"]) <= 12.0


@pytest.mark.timeout(120)
async def test_t4_paused_leader_steps_down_and_loses_nothing(tmp_path: Path) -> None:
    result = await scenarios.t4(options(tmp_path, 21))
    assert result.passed, result.failures


@pytest.mark.timeout(120)
async def test_t5_whole_cluster_crash_loses_nothing_acknowledged(tmp_path: Path) -> None:
    result = await scenarios.t5(options(tmp_path, 20))
    assert result.passed, result.failures


@pytest.mark.timeout(120)
async def test_t10_watchers_on_two_nodes_stay_ordered_without_gaps(tmp_path: Path) -> None:
    result = await scenarios.t10(options(tmp_path, 10))
    assert result.passed, result.failures
    assert int(result.figures["w0_delivered"]) > 0 and int(result.figures["w1_delivered"]) > 0


@pytest.mark.timeout(120)
async def test_t11_timed_out_writes_are_resolved_and_never_applied_twice(tmp_path: Path) -> None:
    result = await scenarios.t11(options(tmp_path, 25))
    assert result.passed, result.failures
    assert int(result.figures["check_ambiguous"]) > 0
