"""Run the baseline service under uvicorn: ``python -m bench.baseline --port 8000`` (env: DATABASE_URL)."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from litestar import Litestar

from bench.baseline.service import create_app
from bench.baseline.settings import BaselineSettings
from kvstate.errors import ConfigurationError


def app_from_environ() -> Litestar:
    """The uvicorn factory: this process's edge, where the environment is read."""
    return create_app(BaselineSettings.from_env(os.environ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    try:
        BaselineSettings.from_env(os.environ)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "bench.baseline.__main__:app_from_environ",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        timeout_keep_alive=75,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
