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
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devstack.servers import free_port

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
        archived = wait_until(
            lambda: (n := archived_count(info["database_url"])) >= min_archived and n,
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
    # the second run starts on the same data: the archive still holds the first run's operations
    second = run_stack_once(state, tmp_path, "second", min_archived=first + 1)
    assert second > first


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
