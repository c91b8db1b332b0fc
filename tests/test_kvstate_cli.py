"""The kvstate command, run as a real subprocess against the real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstate import Client, Settings


def kvstate(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"NATS_URL": settings.nats_url, "KVSTATE_BUCKET": settings.bucket, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "kvstate.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_bucket_init_then_info(settings: Settings) -> None:
    init = kvstate(settings, "bucket", "init")
    assert init.returncode == 0, init.stderr
    assert "ready" in init.stdout
    info = kvstate(settings, "bucket", "info", "--json")
    data = json.loads(info.stdout)
    assert data["bucket"] == settings.bucket
    assert data["direct_get"] is True
    assert data["history"] == settings.history


def test_pipeline_set_show(settings: Settings, tmp_path: Path) -> None:
    kvstate(settings, "bucket", "init")
    stored = kvstate(settings, "pipeline", "set", "demo/pipeline.toml")
    assert stored.returncode == 0, stored.stderr
    shown = kvstate(settings, "pipeline", "show", "orders")
    assert "{geo, fraud, profile}" in shown.stdout
    bad = tmp_path / "cycle.toml"
    bad.write_text('name = "bad"\n[[stages]]\nname = "a"\nafter = ["b"]\n[[stages]]\nname = "b"\n')
    refused = kvstate(settings, "pipeline", "set", str(bad))
    assert refused.returncode == 2
    assert "defined after it" in refused.stderr


async def test_get_ls_history_cancel(client: Client, settings: Settings) -> None:
    op = await client.create("orders", metadata={"customer": 7})
    await client.start(op.id, "ingest", worker="ingest-1")
    got = kvstate(settings, "get", op.id)
    assert got.returncode == 0, got.stderr
    assert "ingest-1" in got.stdout and "running" in got.stdout
    as_json = json.loads(kvstate(settings, "get", op.id, "--json").stdout)
    assert as_json["metadata"] == {"customer": 7}
    listed = kvstate(settings, "ls", "--status", "running")
    assert op.id in listed.stdout
    assert op.id not in kvstate(settings, "ls", "--status", "pending").stdout
    history = kvstate(settings, "history", op.id)
    assert "ingest: waiting -> running" in history.stdout
    cancelled = kvstate(settings, "cancel", op.id, "--reason", "test")
    assert cancelled.returncode == 0
    assert "applied" in cancelled.stdout
    again = kvstate(settings, "cancel", op.id)
    assert again.returncode == 1 and "stale" in again.stdout


async def test_watch_prints_changes(client: Client, settings: Settings) -> None:
    op = await client.create("orders")
    watched = kvstate(settings, "watch", "--count", "1", "--json")
    assert json.loads(watched.stdout)["op_id"] == op.id


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("get", "no-such-op"), 1, "not found"),
        (("get", "bad.id"), 2, "invalid key"),
        (("create", "orders", "--metadata", "[1]"), 2, "JSON object"),
        (("create", "nope"), 2, "no pipeline"),
        (("ls", "--status", "bogus"), 2, "invalid choice: 'bogus'"),
    ],
)
async def test_errors_have_exit_codes_and_messages(
    client: Client, settings: Settings, args: tuple[str, ...], code: int, message: str
) -> None:
    result = kvstate(settings, *args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_exit_1_without_traceback(settings: Settings) -> None:
    from devstack.servers import free_port

    result = kvstate(Settings(nats_url=f"nats://127.0.0.1:{free_port()}", bucket="x"), "ls")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_bucket_init_waits_for_a_server_that_starts_later(tmp_path: Path) -> None:
    from devstack.servers import NatsServer, free_port

    port = free_port()
    env = {
        "NATS_URL": f"nats://127.0.0.1:{port}",
        "KVSTATE_BUCKET": "late",
        "KVSTATE_TIMEOUT": "1",  # each attempt gives up after a second
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstate.cli", "bucket", "init", "--wait", "30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the first attempts find nothing listening
        with NatsServer(tmp_path / "nats", port=port):
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "retrying in" in err and "Traceback" not in err
    assert "bucket 'late' ready" in out
    # without --wait, the same start-up order fails at once
    result = subprocess.run(
        [sys.executable, "-m", "kvstate.cli", "bucket", "init"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "cannot connect" in result.stderr


def test_a_plug_in_without_its_extra_is_listed_with_the_extra_to_install() -> None:
    # uvicorn "not installed": what a client-only install (pip install kvstate) sees
    script = "import sys; sys.modules['uvicorn'] = None; from kvstate.cli import main; sys.exit(main(sys.argv[1:]))"
    listed = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    assert "pip install -e '.[dashboard]' in a checkout)" in " ".join(listed.stdout.split())
    run = subprocess.run([sys.executable, "-c", script, "dashboard"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "pip install -e '.[dashboard]'" in run.stderr and "Traceback" not in run.stderr


def test_plugged_in_subcommands_are_listed() -> None:
    result = subprocess.run([sys.executable, "-m", "kvstate.cli", "--help"], capture_output=True, text=True)
    for name in ("archiver", "archive", "dashboard", "demo", "up"):
        assert name in result.stdout
