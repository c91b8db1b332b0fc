"""``kvstate demo``: the ten-service order pipeline, plugged in through the ``kvstate.commands`` entry point.

    kvstate demo --rate 50 --duration 60

Options override the ``DEMO_*`` variables (``demo.settings.DemoSettings``). SIGINT or
SIGTERM stops it cleanly: generation stops, running attempts get a short grace, and
unacknowledged work stays queued for the next run. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping

from demo.errors import DemoError
from demo.runner import DemoReport, load_pipeline, run_demo
from demo.settings import DemoSettings
from kvstate import Pipeline
from kvstate.settings import environ_with

__all__ = ["register"]

_OPTION_ENV = {
    "nats_url": "NATS_URL",
    "bucket": "KVSTATE_BUCKET",
    "rate": "DEMO_RATE",
    "duration": "DEMO_DURATION",
    "latency_scale": "DEMO_LATENCY_SCALE",
    "poison_rate": "DEMO_POISON_RATE",
    "stuck_rate": "DEMO_STUCK_RATE",
    "chaos_rate": "DEMO_CHAOS_RATE",
    "seed": "DEMO_SEED",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kvstate demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the ten-service demo pipeline against NATS",
        description="Generate JSON orders and run ten simulated services that report through kvstate.",
    )
    parser.add_argument("--rate", help="new operations per second; 0 runs the services only ($DEMO_RATE, 5)")
    parser.add_argument("--duration", help="seconds to generate for, 0 = until stopped ($DEMO_DURATION, 0)")
    parser.add_argument("--latency-scale", help="multiply every stage latency ($DEMO_LATENCY_SCALE, 1.0)")
    parser.add_argument("--poison-rate", help="share of inputs that fail for good ($DEMO_POISON_RATE, 0.02)")
    parser.add_argument("--stuck-rate", help="share of attempts whose worker hangs ($DEMO_STUCK_RATE, 0.002)")
    parser.add_argument("--chaos-rate", help="share of attempts replayed late ($DEMO_CHAOS_RATE, 0.05)")
    parser.add_argument("--seed", help="random seed for a repeatable run ($DEMO_SEED)")
    parser.add_argument(
        "--services", help="comma-separated stages to run here (default: all), to spread services over processes"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--bucket", help="KV bucket (default: $KVSTATE_BUCKET or operations)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The ``kvstate demo`` handler: 0 when every operation finished, 1 otherwise, 2 on bad settings."""
    env = environ_with(environ, {variable: getattr(args, option, None) for option, variable in _OPTION_ENV.items()})
    settings = DemoSettings.from_env(env)  # ConfigurationError -> exit 2 in kvstate.cli
    services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        pipeline = load_pipeline()
        unknown = [name for name in services or () if not pipeline.has_stage(name)]
        if unknown:
            sys.stderr.write(
                f"kvstate demo: --services: no stage {', '.join(unknown)} (stages: {', '.join(pipeline.stage_names)})\n"
            )
            return 2
        report = asyncio.run(_main(settings, pipeline, services, quiet=args.quiet))
    except DemoError as exc:
        sys.stderr.write(f"kvstate demo: {exc}\n")
        return 1
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("kvstate demo: stopped at once (second signal); unacknowledged work stays queued\n")
        return 1
    return 0 if report.drained or report.stopped else 1


async def _main(settings: DemoSettings, pipeline: Pipeline, services: list[str] | None, *, quiet: bool) -> DemoReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main_task is not None:
            main_task.cancel()  # second signal: stop now
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await run_demo(settings, pipeline, stop=stop, out=None if quiet else sys.stdout, services=services)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
