"""``kvstate up`` as a process: everything starts, operations reach the archive, SIGINT
stops every process it started, and a second run keeps the data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest

from devstack.servers import PostgresServer, free_port

pytestmark = pytest.mark.slow

_DROPPED_PREFIXES = ("NATS_", "DATABASE_", "KVSTATE_", "DEMO_", "DASHBOARD_", "ARCHIVER_")


def stack_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    env.update(
        KVSTATE_STATE_DIR=str(state),
        KVSTATE_NATS_PORT=str(free_port()),
        KVSTATE_POSTGRES_PORT=str(free_port()),
        DASHBOARD_PORT=str(free_port()),
        ARCHIVER_METRICS_PORT=str(free_port()),
        ARCHIVER_GRACE_PERIOD="1",
        DEMO_RATE="10",
        DEMO_LATENCY_SCALE="0.3",
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], out: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"kvstate up exited with {proc.returncode} while waiting for {what}:\n{out.read_text()}"
            )
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{out.read_text()}")


def read_stack(state: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state / "stack.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def dashboard_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def passwords(state: Path) -> dict[str, str]:
    """The roles and passwords `kvstate up` keeps in the state folder (libpq's password-file lines)."""
    found = {}
    for line in (state / "pgpass").read_text().splitlines():
        if not line.startswith("#"):
            host, _port, _database, role, password = line.split(":", 4)
            assert host == "127.0.0.1"
            found[role] = password
    return found


def archive_url(state: Path, info: dict[str, Any]) -> str:
    """The archiver's URL: where stack.json says PostgreSQL is, with the password from the state folder."""
    if not (state / "pgpass").exists():
        return str(info["database_url"])  # a server given to kvstate up
    parts = urlsplit(info["database_url"])
    return f"postgresql://kvstate:{passwords(state)['kvstate']}@{parts.hostname}:{parts.port}{parts.path}"


def child_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def check_archive_credentials(state: Path, info: dict[str, Any], out: Path) -> None:
    """Each child has only its own archive URL; no password was ever printed."""
    secret = passwords(state)
    assert set(secret) == {"postgres", "kvstate", "kvstate_dashboard"}
    archiver = child_environ(info["children"]["archiver"])
    dashboard = child_environ(info["children"]["dashboard"])
    assert urlsplit(archiver["DATABASE_URL"]).username == "kvstate" and "DASHBOARD_DATABASE_URL" not in archiver
    assert urlsplit(archiver["DATABASE_URL"]).password == secret["kvstate"]
    reader = urlsplit(dashboard["DASHBOARD_DATABASE_URL"])
    assert (reader.username, reader.password) == ("kvstate_dashboard", secret["kvstate_dashboard"])
    assert "DATABASE_URL" not in dashboard  # the dashboard never holds the archiver's password
    if "demo" in info["children"]:
        demo = child_environ(info["children"]["demo"])
        assert "DATABASE_URL" not in demo and "DASHBOARD_DATABASE_URL" not in demo
    text = out.read_text()
    assert not [role for role, password in secret.items() if password in text]


def archived_count(database_url: str) -> int:
    """Rows in the archive table (0 until the archiver has created it)."""

    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            exists = await conn.fetchval("SELECT to_regclass('archived_operations') IS NOT NULL")
            return int(await conn.fetchval("SELECT count(*) FROM archived_operations")) if exists else 0
        finally:
            await conn.close()

    return asyncio.run(count())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(state: Path) -> list[int]:
    """Live processes whose command line or environment names the state folder."""
    needle = str(state).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in text and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def kvstate_up(env: dict[str, str], out: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`kvstate up` as a child process, output to ``out``; killed by pid on the way out if still running."""
    with open(out, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstate.cli", "up", *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def own_stack(state: Path, proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """The stack.json ``proc`` wrote (not one a killed earlier run left behind)."""
    info: dict[str, Any] = wait_until(
        lambda: (i := read_stack(state)) and i["pid"] == proc.pid and i, 90, "stack.json", proc, out
    )
    return info


def run_stack_once(state: Path, tmp_path: Path, name: str, min_archived: int) -> int:
    """Start `kvstate up`, wait for the dashboard and the archive, SIGINT it, check nothing is left."""
    out = tmp_path / f"{name}.out"
    with kvstate_up(stack_env(state), out) as proc:
        info = own_stack(state, proc, out)
        assert set(info["children"]) == {"archiver", "dashboard", "demo"}
        assert set(info["servers"]) == {"nats", "postgres"}
        wait_until(lambda: dashboard_healthy(info["dashboard"]), 30, "the dashboard", proc, out)
        assert f"dashboard  {info['dashboard']}" in out.read_text()
        check_archive_credentials(state, info, out)
        archived = wait_until(
            lambda: (n := archived_count(archive_url(state, info))) >= min_archived and n,
            60,
            f"{min_archived} archived operations",
            proc,
            out,
        )
        pids = [info["pid"], *info["children"].values(), *info["servers"].values()]
        assert all(alive(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()
    leftovers = [pid for pid in pids if alive(pid)]
    assert leftovers == [], f"still running after kvstate up stopped: {leftovers}"
    assert processes_mentioning(state) == []
    assert not (state / "stack.json").exists()
    text = out.read_text()
    assert "Traceback" not in text
    assert "stopped" in text
    return int(archived)


def test_kvstate_up_runs_the_system_and_stops_everything_on_sigint(tmp_path: Path) -> None:
    pytest.importorskip("archiver.cli")
    pytest.importorskip("dashboard.cli")
    state = tmp_path / "state"
    first = run_stack_once(state, tmp_path, "first", min_archived=1)
    assert (state / "nats" / "nats-server.conf").read_text().count("sync_interval: 1s") == 1
    assert (state / "postgres" / "data" / "PG_VERSION").exists()
    assert os.stat(state / "pgpass").st_mode & 0o777 == 0o600
    hba = (state / "postgres" / "data" / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)
    secret = passwords(state)
    # the second run starts on the same data: the archive still holds the first run's operations
    second = run_stack_once(state, tmp_path, "second", min_archived=first + 1)
    assert second > first
    assert passwords(state) == secret  # the same passwords, from the state folder


def test_kvstate_up_killed_with_sigkill_leaves_no_process_and_starts_again(tmp_path: Path) -> None:
    pytest.importorskip("archiver.cli")
    pytest.importorskip("dashboard.cli")
    state = tmp_path / "state"
    out = tmp_path / "killed.out"
    with kvstate_up(stack_env(state), out, "--no-demo") as proc:
        info = own_stack(state, proc, out)
        pids = [*info["children"].values(), *info["servers"].values()]
        assert len(pids) == 4  # archiver, dashboard, nats-server, postgres
        proc.kill()  # no handler runs: only the kernel can stop the children now
        proc.wait()
    deadline = time.monotonic() + 30
    while (leftovers := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers == [], f"still running after kvstate up was killed: {leftovers}"
    assert processes_mentioning(state) == []
    assert read_stack(state) is not None  # nobody was left to remove it
    # the next run replaces the stale stack.json and finds a PostgreSQL that shut down cleanly
    run_stack_once(state, tmp_path, "after-kill", min_archived=1)


def test_kvstate_up_uses_the_servers_it_is_given_and_leaves_them_running(
    tmp_path: Path, nats_server: Any, settings: Any, database_url: str
) -> None:
    pytest.importorskip("archiver.cli")
    pytest.importorskip("dashboard.cli")
    state = tmp_path / "state"
    env = stack_env(state)
    env.update(
        NATS_URL=nats_server.url,
        DATABASE_URL=database_url,
        KVSTATE_BUCKET=settings.bucket,  # this test's own bucket and work stream on the shared server
        DEMO_STREAM=f"DEMO_{settings.bucket}",
        DEMO_SUBJECT_PREFIX=f"demo.{settings.bucket}",
    )
    out = tmp_path / "given.out"
    with kvstate_up(env, out) as proc:
        info = own_stack(state, proc, out)
        assert info["servers"] == {}  # it started neither nats-server nor PostgreSQL
        assert (info["nats_url"], info["database_url"]) == (nats_server.url, database_url)
        wait_until(lambda: archived_count(database_url) >= 1, 60, "an archived operation", proc, out)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()
    assert not (state / "nats").exists() and not (state / "postgres").exists()
    assert nats_server.proc.poll() is None  # the given servers keep running
    assert archived_count(database_url) >= 1


def test_kvstate_up_converts_a_state_folder_an_earlier_version_made_with_trust(tmp_path: Path) -> None:
    """A `.state` from before passwords: PostgreSQL with trust, the archive owned by postgres. kvstate up
    moves it to scram-sha-256 and the roles, and the dashboard reads the old archive as its reader."""
    pytest.importorskip("archiver.cli")
    pytest.importorskip("dashboard.cli")
    from archiver.rows import row_for
    from archiver.store import ArchiveStore
    from kvstate import OpStatus, Pipeline, StageSpec, new_operation

    state = tmp_path / "state"
    old = PostgresServer(state / "postgres")  # what kvstate up started before: trust, no password
    old.start()
    try:
        pipeline = Pipeline(name="orders", stages=(StageSpec(name="ingest"),))
        op = new_operation("old-archived-operation", pipeline, datetime.now(UTC), {})
        op = msgspec.structs.replace(op, status=OpStatus.SUCCEEDED, finished_at=op.created_at, revision=2)

        async def archive_one() -> None:
            conn = await asyncpg.connect(old.dsn("postgres"))
            await conn.execute("CREATE DATABASE kvstate")
            await conn.close()
            async with ArchiveStore.open(old.dsn("kvstate"), reader_role=None) as store:
                await store.write([row_for(op, op.created_at)])

        asyncio.run(archive_one())
    finally:
        old.stop()
    out = tmp_path / "converted.out"
    with kvstate_up(stack_env(state), out, "--no-demo") as proc:
        info = own_stack(state, proc, out)
        wait_until(lambda: dashboard_healthy(info["dashboard"]), 30, "the dashboard", proc, out)
        check_archive_credentials(state, info, out)
        with urllib.request.urlopen(info["dashboard"] + "archive", timeout=10) as response:
            assert op.id in response.read().decode()  # read through kvstate_dashboard
        assert archived_count(archive_url(state, info)) == 1

        async def owners() -> set[str]:
            conn = await asyncpg.connect(archive_url(state, info))
            try:
                rows = await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
                return {r["tableowner"] for r in rows}
            finally:
                await conn.close()

        assert asyncio.run(owners()) == {"kvstate"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()
    hba = (state / "postgres" / "data" / "pg_hba.conf").read_text()
    assert "trust" not in hba.split("\n", 1)[1] and "scram-sha-256" in hba
    assert "Traceback" not in out.read_text()


def test_kvstate_up_says_so_when_the_password_file_does_not_match_the_cluster(tmp_path: Path) -> None:
    pytest.importorskip("archiver.cli")
    state = tmp_path / "state"
    PostgresServer(state / "postgres", password="a-password-since-lost").init()  # pgpass gone, cluster kept
    out = tmp_path / "mismatch.out"
    with kvstate_up(stack_env(state), out, "--no-demo") as proc:
        assert proc.wait(90) == 1
    text = out.read_text()
    assert f"refuses the postgres password of {state / 'pgpass'}" in text and "Traceback" not in text
    assert not any(password in text for password in passwords(state).values())
    assert processes_mentioning(state) == []
