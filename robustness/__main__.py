"""``python -m robustness SCENARIO|all [--seconds N] [--scale X] [--sync-interval always] [--seed N]``.

Runs scenarios from every module under ``robustness/scenarios/`` (each registers its own in
a ``SCENARIOS`` mapping), prints each one's figures and pass figures missed, and exits 1
when any scenario failed. Each scenario gets a fresh work directory (removed afterwards
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import pkgutil
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import robustness.scenarios
from robustness.base import RunOptions, Scenario, ScenarioResult

__all__ = ["collect_scenarios", "main", "run_scenario"]


def collect_scenarios() -> dict[str, Scenario]:
    """Every scenario registered in a ``SCENARIOS`` mapping of a module under robustness/scenarios/."""
    found: dict[str, Scenario] = {}
    for info in sorted(pkgutil.iter_modules(robustness.scenarios.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"robustness.scenarios.{info.name}")
        for name, scenario in getattr(module, "SCENARIOS", {}).items():
            if name in found:
                raise RuntimeError(f"scenario {name} registered twice (again in {info.name})")
            found[name] = scenario
    return found


async def run_scenario(scenario: Scenario, options: RunOptions) -> ScenarioResult:
    """Run one scenario; an exception it raises becomes a failure of its own."""
    started = time.monotonic()
    try:
        result = await scenario(options)
    except Exception as exc:  # noqa: BLE001 - the runner reports every scenario, whatever one raises
        result = ScenarioResult(getattr(scenario, "__name__", "?"))
        result.failures.append(f"raised {type(exc).__name__}: {exc}")
    result.figures.setdefault("wall_s", round(time.monotonic() - started, 1))
    return result


def _print(result: ScenarioResult) -> None:
    print(f"== {result.name}: {'PASS' if result.passed else 'FAIL'}", flush=True)
    for name, value in result.figures.items():
        print(f"   {name:32} {value}")
    for failure in result.failures:
        print(f"   FAILED: {failure}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the scenarios, print their figures; 1 when any failed."""
    scenarios = collect_scenarios()
    parser = argparse.ArgumentParser(prog="python -m robustness", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="+", help=f"'all' or some of: {', '.join(scenarios)}")
    parser.add_argument("--seconds", type=float, default=None, help="fault phase length (default: full)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies writers and write targets")
    parser.add_argument("--sync-interval", default="1s", help="nats-server sync_interval (e.g. 1s, always)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scenarios' work directories")
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs, recorded calls)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    names = list(scenarios) if args.scenario == ["all"] else args.scenario
    unknown = [name for name in names if name not in scenarios]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(scenarios)}")
    print(f"# robustness run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {' '.join(names)}", flush=True)
    failed = 0
    for name in names:
        workdir = Path(tempfile.mkdtemp(prefix=f"robustness-{name}-", dir=args.workdir))
        options = RunOptions(
            workdir=workdir, seconds=args.seconds, scale=args.scale, sync_interval=args.sync_interval, seed=args.seed
        )
        result = asyncio.run(run_scenario(scenarios[name], options))
        result.name = name
        _print(result)
        failed += not result.passed
        if args.keep:
            print(f"   workdir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
