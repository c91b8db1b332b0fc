"""The contract every robustness scenario keeps: what it is given, what it reports.

A scenario is ``async def run(options: RunOptions) -> ScenarioResult``, registered under
its name (``T1``, ``T2`` ...) in the ``SCENARIOS`` mapping of a module under
``robustness/scenarios/``. The runner (``python -m robustness``) and the short runs in
``tests/robustness/`` call it the same way; only ``seconds`` and the scale differ.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunOptions", "Scenario", "ScenarioResult"]


@dataclass(frozen=True)
class RunOptions:
    """How one scenario runs."""

    workdir: Path
    """a fresh directory for the scenario's servers and logs (the caller removes it)"""
    seconds: float | None = None
    """how long the fault phase lasts; None: the scenario's own full length"""
    scale: float = 1.0
    """multiplies the scenario's load figures (writers, operations); the test suite runs smaller"""
    sync_interval: str = "1s"
    """nats-server's sync_interval for every node the scenario starts ("always": fsync each write)"""
    seed: int = 0
    """seeds every random choice the scenario makes (which node, when), so a run can be repeated"""


@dataclass
class ScenarioResult:
    """What a scenario measured and whether it met its pass figures."""

    name: str
    figures: dict[str, float | int | str] = field(default_factory=dict)
    """every figure the scenario measured, printed by the runner and recorded in docs/reliability.md"""
    failures: list[str] = field(default_factory=list)
    """one sentence per pass figure missed (empty: passed)"""

    @property
    def passed(self) -> bool:
        """True when every pass figure was met."""
        return not self.failures

    def require(self, condition: bool, failure: str) -> None:
        """Record ``failure`` unless ``condition`` holds."""
        if not condition:
            self.failures.append(failure)


Scenario = Callable[[RunOptions], Awaitable[ScenarioResult]]
