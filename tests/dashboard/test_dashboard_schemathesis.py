"""Schemathesis over the dashboard's OpenAPI document, against the app served by uvicorn on real NATS.

Every operation of the document, at least 100 generated examples each (valid and
invalid), then the stateful phase (sequences of calls linked through their answers).
The run must find no server error and no answer that disagrees with the document (status
codes, content types, headers, bodies). The app runs with the token for reads and writes
and the rate limit off; schemathesis authenticates with the bearer token.

The command line of schemathesis runs in a child process (its client is synchronous) while
this test's event loop serves the app; the report goes to test-artifacts/schemathesis/.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from dashboard_support import archived_operations, populate

from dashboard.settings import DashboardSettings
from kvstate import Client, Settings

TOKEN = "schemathesis-token-0123456789abcdef"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "schemathesis"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "ignored_auth",
    ]
)


@pytest.fixture
def dashboard_settings(settings: Settings, database_url: str) -> DashboardSettings:
    return DashboardSettings(
        kv=settings,
        debounce=0.05,
        page_size=5,
        secret="s" * 32,
        auth_token=TOKEN,
        auth_reads=True,
        rate_limit=0,
        database_url=database_url,
    )


@pytest.mark.timeout(240)
async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
    client: Client, database_url: str, live_server: str
) -> None:
    await archived_operations(client, database_url)  # the archive search has rows to find
    await populate(client, 12, prefix="st")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # the counts below read this run's report only
    ARTIFACTS.mkdir(parents=True)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{live_server}/schema/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "100",
        "--seed",
        "20261202",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(ARTIFACTS),
        "--no-color",
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=ARTIFACTS,  # its cache directory (.schemathesis) goes there, not into the checkout
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 200)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    (ARTIFACTS / "output.txt").write_text(text)
    assert process.returncode == 0, text[-6000:]
    cases = cases_per_operation(ARTIFACTS)
    # the app is served by this test's event loop: the document's size comes from schemathesis's own report
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", text)
    assert selected is not None and selected.group(1) == selected.group(2), text[:2000]
    operations = int(selected.group(1))
    assert len(cases) == operations + 1 and cases["stateful"] >= 100, cases  # every operation, and sequences
    for operation, count in cases.items():
        # an operation without parameters has a handful of distinct requests at most (hypothesis does not repeat)
        assert count >= (5 if operation in PARAMETERLESS else 100), (operation, count)


PARAMETERLESS = {"GET /api/csrf", "GET /healthz", "GET /api/jobs"}


def cases_per_operation(reports: Path) -> dict[str, int]:
    """Test cases schemathesis ran, per operation (fuzzing and coverage phases) and in the stateful phase."""
    counts: dict[str, int] = {}
    for report in reports.glob("*.ndjson"):
        for line in report.read_text().splitlines():
            finished = json.loads(line).get("ScenarioFinished")
            if not finished or finished["phase"] not in ("fuzzing", "coverage", "stateful"):
                continue
            recorder = finished.get("recorder") or {}
            label = "stateful" if finished["phase"] == "stateful" else str(recorder.get("label"))
            counts[label] = counts.get(label, 0) + len(recorder.get("cases") or {})
    return counts
