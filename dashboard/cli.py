"""``kvstate dashboard``: serve the dashboard with uvicorn (also ``python -m dashboard``).

It refuses to start (exit code 2) on a DASHBOARD_HOST other than a loopback address
without DASHBOARD_AUTH_TOKEN, unless DASHBOARD_ALLOW_ANONYMOUS (``--allow-anonymous``)
says that is meant (``DashboardSettings.exposure_problem``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dashboard.settings import DashboardSettings
from kvstate import ConfigurationError
from kvstate.settings import environ_with

__all__ = ["main", "register", "serve"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--bucket", help="KV bucket (default: $KVSTATE_BUCKET or operations)")
    parser.add_argument("--host", help="interface to listen on (default: $DASHBOARD_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: $DASHBOARD_PORT or 8000)")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL archive, as a read-only role (default: $DASHBOARD_DATABASE_URL, else $DATABASE_URL; "
        "neither = no archive pages)",
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        default=None,
        help="serve a non-loopback --host without DASHBOARD_AUTH_TOKEN (default: $DASHBOARD_ALLOW_ANONYMOUS or refuse)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> DashboardSettings:
    """Environment settings with the command-line options laid over them (``environ_with``)."""
    options = {
        "NATS_URL": args.nats_url,
        "KVSTATE_BUCKET": args.bucket,
        "DASHBOARD_HOST": args.host,
        "DASHBOARD_PORT": args.port,
        "DASHBOARD_DATABASE_URL": args.database_url,
        "DASHBOARD_ALLOW_ANONYMOUS": "true" if args.allow_anonymous else None,
    }
    return DashboardSettings.from_env(environ_with(environ, options))


def serve(settings: DashboardSettings, log_level: str = "info") -> int:
    """Run the dashboard until interrupted; returns the exit code."""
    import uvicorn

    from dashboard.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        # X-Forwarded-For/-Proto only from DASHBOARD_TRUSTED_PROXIES: the client address the limits and the
        # audit log use, and https for Secure cookies; from anyone else they are ignored
        proxy_headers=settings.trusted_proxies is not None,
        forwarded_allow_ips=list(settings.trusted_proxies or ()),
        server_header=False,
        timeout_graceful_shutdown=3,  # open event streams would otherwise hold shutdown
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _handler(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        settings = settings_from(args, environ)
    except ConfigurationError as exc:
        sys.stderr.write(f"kvstate dashboard: {exc}\n")
        return 2
    problem = settings.exposure_problem()
    if problem is not None:
        sys.stderr.write(f"kvstate dashboard: refusing to start: {problem}\n")
        return 2
    return serve(settings, args.log_level)


def register(subparsers: Any) -> None:
    """Add ``kvstate dashboard`` to the kvstate command.

    ImportError, before adding anything, when the dashboard extra is not installed (this
    module itself imports without it): kvstate then lists the command with the extra to
    install instead of failing when it runs.
    """
    for module in ("uvicorn", "litestar", "jinja2"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed", name=module)
    parser = subparsers.add_parser("dashboard", help="serve the live dashboard (Litestar + htmx)")
    _add_arguments(parser)
    parser.set_defaults(handler=_handler)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m dashboard``."""
    parser = argparse.ArgumentParser(prog="python -m dashboard", description="Serve the kvstate dashboard.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return _handler(args, os.environ if environ is None else environ)
