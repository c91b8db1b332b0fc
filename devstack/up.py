"""``kvstate up``: the whole system on one machine, with one command.

Unless ``NATS_URL`` / ``DATABASE_URL`` point at running servers, it starts a nats-server
(JetStream data in ``$KVSTATE_STATE_DIR/nats``, ``sync_interval`` written in its
configuration) and a PostgreSQL cluster (``$KVSTATE_STATE_DIR/postgres``, database
``kvstate``, scram-sha-256 passwords kept 0600 in ``$KVSTATE_STATE_DIR/pgpass``, the
archiver as the owner role ``kvstate``, the dashboard as the read-only ``kvstate_dashboard``:
``devstack.pgauth``, ``devstack.pgroles``); creates the bucket and stores the demo pipeline; then starts the archiver,
the dashboard and the demo as child processes (``python -m kvstate.cli <command>``),
prints the dashboard's address and waits. Ctrl-C or SIGTERM stops the children by pid in
reverse order (SIGTERM, then SIGKILL after a grace period), then the servers. The state
folder keeps the data, so running it again carries on where it stopped.

Child logs go to ``$KVSTATE_STATE_DIR/logs/``; the demo's progress line stays on the
terminal. ``$KVSTATE_STATE_DIR/stack.json`` lists every pid while the stack runs (mode 0600,
with the passwords of NATS_URL and DATABASE_URL masked, as everything ``kvstate up`` prints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import asyncpg

from demo.runner import load_pipeline
from devstack.errors import StackError
from devstack.pgauth import load_passwords
from devstack.pgroles import ARCHIVER_ROLE, DASHBOARD_ROLE, provision
from devstack.servers import NatsServer, PostgresServer, ServerStartError, free_port, parent_death_signal
from kvstate import Client, KvstateError, Settings
from kvstate.settings import environ_with, from_environ, redact_url, redacted_repr, setting, setting_specs

__all__ = ["StackSettings", "register"]


DATABASE = "kvstate"
LOCAL_GRACE_PERIOD = 10
"""Seconds a finished operation stays in the bucket before the local archiver takes it."""
STOP_GRACE = 10.0
"""Seconds a child gets between SIGTERM and SIGKILL."""
_SYNC_RE = re.compile(r"always|\d+(ms|s|m)")


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise ValueError("a TCP port is 1-65535")
    return value


def _sync_interval(raw: str) -> str:
    if _SYNC_RE.fullmatch(raw) is None:
        raise ValueError("use 'always' or a duration such as 100ms, 1s, 2m")
    return raw


def _optional(raw: str) -> str | None:
    return raw


@dataclass(frozen=True)
class StackSettings:
    """Where the local stack keeps its data and which ports it uses.

    Each field is declared once with ``kvstate.settings.setting``; docs/operations.md holds
    the table rendered from them.
    """

    state_dir: Path = setting(
        "KVSTATE_STATE_DIR", Path(".state"), Path, "where `kvstate up` keeps NATS and PostgreSQL data"
    )
    nats_url: str | None = setting(
        "NATS_URL",
        None,
        _optional,
        "NATS server(s), comma-separated; for `kvstate up`: use this server instead of starting one",
        shown_default="unset",
    )
    database_url: str | None = setting(
        "DATABASE_URL",
        None,
        _optional,
        "PostgreSQL of the archive (archiver: required; dashboard: read when `DASHBOARD_DATABASE_URL` is unset; "
        "`kvstate up`: use this server instead of starting one with passwords in `$KVSTATE_STATE_DIR/pgpass`)",
        shown_default="unset",
    )
    nats_port: int = setting(
        "KVSTATE_NATS_PORT", 4222, _port, "port of the nats-server `kvstate up` starts (another free one if taken)"
    )
    postgres_port: int = setting(
        "KVSTATE_POSTGRES_PORT",
        5432,
        _port,
        "port of the PostgreSQL `kvstate up` starts (another free one if taken)",
    )
    sync_interval: str = setting(
        "KVSTATE_SYNC_INTERVAL",
        "1s",
        _sync_interval,
        "`sync_interval` of the nats-server `kvstate up` starts (`always` for strict durability)",
    )
    dashboard_host: str = setting("DASHBOARD_HOST", "127.0.0.1", str, "address the dashboard listens on")
    dashboard_port: int = setting("DASHBOARD_PORT", 8000, _port, "port the dashboard listens on")
    dashboard_port_fixed: bool = field(default=False, compare=False)
    """True when DASHBOARD_PORT was set: then a taken port is an error, not a reason to pick another"""

    __repr__ = redacted_repr  # no password of DATABASE_URL or NATS_URL, no token

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StackSettings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        port_given = bool(environ.get(setting_specs(cls)["dashboard_port"].env, "").strip())
        return from_environ(cls, environ, dashboard_port_fixed=port_given)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kvstate up``."""
    parser = subparsers.add_parser(
        "up",
        help="run everything locally: nats-server, PostgreSQL, archiver, dashboard and the demo",
        description="Start the whole system on this machine; Ctrl-C stops it. Data stays in the state folder.",
    )
    parser.add_argument("--state-dir", help="data, logs and pids (default: $KVSTATE_STATE_DIR or .state)")
    parser.add_argument("--dashboard-port", help="dashboard port (default: $DASHBOARD_PORT or 8000)")
    parser.add_argument("--nats-url", help="use this NATS instead of starting nats-server ($NATS_URL)")
    parser.add_argument("--no-demo", action="store_true", help="do not start the demo pipeline")
    parser.add_argument("--rate", help="demo operations per second ($DEMO_RATE, 5)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The ``kvstate up`` handler: 0 after a clean stop, 1 when a component failed, 2 on bad settings."""
    options = {
        "KVSTATE_STATE_DIR": args.state_dir,
        "DASHBOARD_PORT": args.dashboard_port,
        "NATS_URL": args.nats_url,
        "DEMO_RATE": args.rate,
    }
    env = environ_with(environ, options)
    settings = StackSettings.from_env(env)  # ConfigurationError -> exit 2 in kvstate.cli
    stack = Stack(settings, env, demo=not args.no_demo, out=sys.stdout)
    try:
        return stack.run()
    except StackError as exc:
        sys.stderr.write(f"kvstate up: {exc}\n")
        return 1


# ---------------------------------------------------------------- the stack


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None
    required: bool


class _Stopped(Exception):
    """A signal arrived while starting up."""


class Stack:
    """The servers and child processes of one ``kvstate up``, started and stopped in order."""

    def __init__(self, settings: StackSettings, environ: Mapping[str, str], *, demo: bool, out: IO[str]) -> None:
        self.settings = settings
        self.environ = dict(environ)
        self.demo = demo
        self.out = out
        self.state_dir = settings.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self.nats: NatsServer | None = None
        self.postgres: PostgresServer | None = None
        self.dashboard_database_url: str | None = None
        """the read-only URL of the dashboard, when this stack started PostgreSQL"""
        self.children: list[_Child] = []
        self.signalled = 0

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        """Start everything, wait for a signal or a failure, stop everything. Returns the exit code."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self._lock():
                try:
                    return self._run_locked()
                finally:
                    self.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_locked(self) -> int:
        try:
            env = self._start()
        except _Stopped:
            self._say("stopping (signal during start-up)")
            return 0
        self._announce(env)
        return self._supervise()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled += 1

    def _check_signal(self) -> None:
        if self.signalled:
            raise _Stopped

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One ``kvstate up`` per state folder: two nats-servers on one store would corrupt it."""
        path = self.state_dir / "up.lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StackError(f"another `kvstate up` is running on {self.state_dir} (see stack.json)") from None
            (self.state_dir / "stack.json").unlink(missing_ok=True)  # left by a run that was killed
            try:
                yield
            finally:
                (self.state_dir / "stack.json").unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------ start-up

    def _start(self) -> dict[str, str]:
        missing = [name for name in ("archiver.cli", "dashboard.cli") if importlib.util.find_spec(name) is None]
        if missing:
            raise StackError(f"{', '.join(missing)} not installed: run scripts/setup.sh (pip install -e '.[dev]')")
        nats_url = self.settings.nats_url or self._start_nats()
        self._check_signal()
        database_url = self.settings.database_url or self._start_postgres()
        self._check_signal()
        env = dict(self.environ)
        env.update(NATS_URL=nats_url, DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
        kv = Settings.from_env(env)
        self._prepare_bucket(kv)
        self._check_signal()
        env["DASHBOARD_HOST"] = self.settings.dashboard_host
        env["DASHBOARD_PORT"] = str(self._dashboard_port())
        if not env.get("ARCHIVER_METRICS_PORT"):
            env["ARCHIVER_METRICS_PORT"] = "9101" if _port_free(9101) else str(free_port())
        if not env.get("ARCHIVER_GRACE_PERIOD"):
            # Locally, let finished operations move to the archive after 10 s rather than the
            # archiver's default of two minutes, so a newcomer sees both sides within a minute.
            env["ARCHIVER_GRACE_PERIOD"] = str(LOCAL_GRACE_PERIOD)
        self._spawn("archiver", self._child_env("archiver", env), required=True)
        self._spawn("dashboard", self._child_env("dashboard", env), required=True)
        self._wait_for_dashboard(env)
        if self.demo:
            self._spawn("demo", self._child_env("demo", env), required=False, terminal=True)
        self._write_pids(env)
        return env

    def _start_nats(self) -> str:
        port = self.settings.nats_port if _port_free(self.settings.nats_port) else free_port()
        server = NatsServer(
            self.state_dir / "nats", port=port, sync_interval=self.settings.sync_interval, die_with_parent=True
        )
        self._say(f"starting nats-server on port {port} (sync_interval {self.settings.sync_interval})")
        self.nats = server
        try:
            server.start()
        except ServerStartError as exc:
            raise StackError(f"nats-server did not start: {exc}") from exc
        return server.url

    def _start_postgres(self) -> str:
        port = self.settings.postgres_port if _port_free(self.settings.postgres_port) else free_port()
        passwords = load_passwords(self.state_dir / "pgpass", ("postgres", ARCHIVER_ROLE, DASHBOARD_ROLE))
        server = PostgresServer(
            self.state_dir / "postgres",
            port=port,
            settings={"synchronous_commit": "off"},
            die_with_parent=True,
            password=passwords["postgres"],
        )
        self._say(f"starting PostgreSQL on port {port} (synchronous_commit off, scram-sha-256)")
        self.postgres = server
        try:
            server.start()
            asyncio.run(provision(server, DATABASE, passwords[ARCHIVER_ROLE], passwords[DASHBOARD_ROLE]))
        except asyncpg.InvalidPasswordError as exc:
            raise StackError(
                f"PostgreSQL in {server.directory} refuses the postgres password of {self.state_dir / 'pgpass'}: "
                "that file was replaced or edited (restore it, or remove both to start a new archive)"
            ) from exc
        except (ServerStartError, OSError, asyncpg.PostgresError) as exc:
            raise StackError(f"PostgreSQL did not start: {exc}") from exc
        self.dashboard_database_url = server.dsn(DATABASE, user=DASHBOARD_ROLE, password=passwords[DASHBOARD_ROLE])
        return server.dsn(DATABASE, user=ARCHIVER_ROLE, password=passwords[ARCHIVER_ROLE])

    def _child_env(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the archive credentials ``name`` may have: the archiver's owner URL for the
        archiver only, the read-only URL for the dashboard only, none for the demo."""
        child = dict(env)
        if self.dashboard_database_url is not None:
            child["DASHBOARD_DATABASE_URL"] = self.dashboard_database_url
        if name != "dashboard":
            child.pop("DASHBOARD_DATABASE_URL", None)
        if name == "demo" or (name == "dashboard" and child.get("DASHBOARD_DATABASE_URL", "").strip()):
            child.pop("DATABASE_URL", None)
        return child

    def _prepare_bucket(self, kv: Settings) -> None:
        try:
            asyncio.run(_store_pipeline(kv))
        except KvstateError as exc:
            raise StackError(f"cannot prepare bucket {kv.bucket!r}: {exc}") from exc

    def _dashboard_port(self) -> int:
        port = self.settings.dashboard_port
        if self.settings.dashboard_port_fixed or _port_free(port):
            return port
        other = free_port()
        self._say(f"port {port} is taken; the dashboard uses {other}")
        return other

    def _spawn(self, name: str, env: dict[str, str], *, required: bool, terminal: bool = False) -> _Child:
        argv = [sys.executable, "-m", "kvstate.cli", name]
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} kvstate up: starting {name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=None if terminal else log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
                preexec_fn=parent_death_signal(signal.SIGTERM),  # and a killed `kvstate up` leaves none
            )
        child = _Child(name, proc, log_path, required)
        self.children.append(child)
        return child

    def _wait_for_dashboard(self, env: dict[str, str], timeout: float = 60.0) -> None:
        url = f"http://{_connect_host(env['DASHBOARD_HOST'])}:{env['DASHBOARD_PORT']}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_signal()
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise StackError(
            f"the dashboard did not answer {url} within {timeout:g}s (see {self.log_dir / 'dashboard.log'})"
        )

    def _write_pids(self, env: dict[str, str]) -> None:
        data = {
            "pid": os.getpid(),
            "dashboard": self.dashboard_url(env),
            "nats_url": redact_url(env["NATS_URL"]),
            "database_url": redact_url(env["DATABASE_URL"]),
            "children": {child.name: child.proc.pid for child in self.children},
            "servers": {
                name: server.proc.pid
                for name, server in (("nats", self.nats), ("postgres", self.postgres))
                if server is not None and server.proc is not None
            },
        }
        _write_private(self.state_dir / "stack.json", json.dumps(data, indent=2) + "\n")

    def dashboard_url(self, env: Mapping[str, str]) -> str:
        """Where a browser reaches the dashboard."""
        return f"http://{_connect_host(env['DASHBOARD_HOST'])}:{env['DASHBOARD_PORT']}/"

    def _announce(self, env: dict[str, str]) -> None:
        nats_where = f"data in {self.nats.directory}, sync_interval {self.nats.sync_interval}" if self.nats else "yours"
        pg_where = (
            f"data in {self.postgres.directory}, passwords in {self.state_dir / 'pgpass'}" if self.postgres else "yours"
        )
        lines = [
            "",
            "kvstate is up",
            f"  dashboard  {self.dashboard_url(env)}",
            f"  nats       {redact_url(env['NATS_URL'])}  ({nats_where})",
            f"  postgres   {redact_url(env['DATABASE_URL'])}  ({pg_where})",
            f"  metrics    {self.dashboard_url(env)}metrics (dashboard)"
            + (
                f", http://127.0.0.1:{port}/metrics (archiver)" if (port := env["ARCHIVER_METRICS_PORT"]) != "0" else ""
            ),
            f"  logs       {self.log_dir}/",
            "Ctrl-C stops everything; the data stays for the next run.",
            "",
        ]
        self._say("\n".join(lines))

    # ------------------------------------------------------------ running

    def _supervise(self) -> int:
        while not self.signalled:
            try:
                self._check_children()
            except StackError as exc:
                self._say(f"\n{exc}")
                return 1
            time.sleep(0.2)
        self._say("\nstopping ...")
        return 0

    def _check_children(self) -> None:
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            if child.required:
                raise StackError(f"the {child.name} exited with code {code}:\n{_tail(child.log_path)}")
            self.children.remove(child)
            self._say(f"\nthe {child.name} finished (exit code {code}); the rest keeps running")

    # ------------------------------------------------------------ stopping

    def stop_all(self) -> None:
        """Stop the children in reverse start order, then PostgreSQL, then nats-server."""
        started = bool(self.children) or self.postgres is not None or self.nats is not None
        for child in reversed(self.children):
            _terminate(child.proc)
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()
        if self.nats is not None:
            self.nats.stop()
        if started:
            self._say("stopped")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


# ---------------------------------------------------------------- helpers


async def _store_pipeline(settings: Settings) -> None:
    async with Client(settings, create_bucket=True, name="kvstate-up") as client:
        await client.set_pipeline(load_pipeline())


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by this user only from the moment it exists.

    Created under another name with mode 0600 (never world-readable, whatever the umask) and
    renamed over ``path``, so a reader sees the old file or the whole new one.
    """
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(staging, path)


def _port_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:``port`` now.

    SO_REUSEADDR as the servers set it: connections of a previous run in TIME_WAIT do not
    keep the port from being reused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _terminate(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
