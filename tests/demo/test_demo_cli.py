"""``kvstate demo`` as a process: the progress line, a clean stop on SIGINT/SIGTERM, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.servers import NatsServer, free_port


def demo_env(nats_url: str, bucket: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "KVSTATE_", "NATS_"))}
    env.update(
        NATS_URL=nats_url,
        KVSTATE_BUCKET=bucket,
        DEMO_STREAM=f"DEMO_{bucket}",
        DEMO_SUBJECT_PREFIX=f"demo.{bucket}",
        DEMO_LATENCY_SCALE="0.2",
        PYTHONUNBUFFERED="1",
    )
    return env


def kvstate(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvstate.cli", *args]


def wait_for_text(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in output after {timeout}s:\n{path.read_text()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_prints_progress_and_stops_cleanly_on_a_signal(
    nats_server: NatsServer, bucket_name: str, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out.txt"
    with open(out, "w") as handle:
        proc = subprocess.Popen(
            kvstate("demo", "--rate", "20"),  # no duration: runs until stopped
            env=demo_env(nats_server.url, bucket_name),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            # not a terminal: a progress line every 5 seconds
            wait_for_text(out, "in flight", 20)
            proc.send_signal(sig)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.read_text()
    assert "Traceback" not in text
    summary = [line for line in text.splitlines() if line.startswith("demo done:")]
    assert len(summary) == 1
    created = int(summary[0].split("created ")[1].split(",")[0])
    assert created >= 50


def test_demo_rejects_bad_options_with_exit_code_2(nats_server: NatsServer, bucket_name: str) -> None:
    result = subprocess.run(
        kvstate("demo", "--rate", "-3"), env=demo_env(nats_server.url, bucket_name), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "DEMO_RATE" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_without_nats_fails_with_a_clear_message(bucket_name: str) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**demo_env(url, bucket_name), "KVSTATE_TIMEOUT": "2"}
    result = subprocess.run(kvstate("demo", "--duration", "1"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot connect to NATS at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_rejects_an_unknown_service_with_exit_code_2(nats_server: NatsServer, bucket_name: str) -> None:
    result = subprocess.run(
        kvstate("demo", "--services", "geo,teleport"),
        env=demo_env(nats_server.url, bucket_name),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no stage teleport" in result.stderr
