"""The README's client example runs as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from kvstate import Client, Settings


async def test_readme_client_example_runs(client: Client, settings: Settings) -> None:
    readme = Path("README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S)
    assert example is not None
    code = example.group(1)
    assert len(code.strip().splitlines()) <= 14
    env = {"NATS_URL": settings.nats_url, "KVSTATE_BUCKET": settings.bucket, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("applied ")
    assert result.stdout.splitlines()[1] == "[]"  # ingest finished, validate not started yet
    assert len(await client.list()) == 1


def test_readme_opens_with_the_two_commands() -> None:
    head = Path("README.md").read_text().splitlines()[:12]
    assert any(line.startswith("scripts/run ") for line in head)
    assert any(line.startswith("scripts/test ") for line in head)
    ci = Path(".ci/run").read_text().splitlines()
    assert "scripts/test" in ci  # CI runs the README's test command as it is
    assert "exec .venv/bin/pytest" in Path("scripts/test").read_text()
    assert "exec .venv/bin/kvstate up" in Path("scripts/run").read_text()
    assert "make" not in Path("scripts/run").read_text() + Path("scripts/test").read_text()
