"""T20 placeholder (being written)."""

from __future__ import annotations

from robustness.base import RunOptions, ScenarioResult

__all__ = ["soak"]


async def soak(options: RunOptions) -> ScenarioResult:
    """T20 (not written yet)."""
    result = ScenarioResult("T20")
    result.failures.append("not written yet")
    return result
