"""``kvstate archiver --burst``, ``kvstate archive get|search`` and ``python -m archiver`` as processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from archiver_support import archiver_env, finished_ops

from archiver.settings import ArchiverSettings
from devstack.servers import free_port
from kvstate import Client


def kvstate(settings: ArchiverSettings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstate.cli", *args],
        env=archiver_env(settings, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def archived(client: Client, archiver_settings: ArchiverSettings) -> list[str]:
    """Twelve finished operations, archived by ``kvstate archiver --burst``."""
    ids = await finished_ops(client, 12)
    result = kvstate(archiver_settings, "archiver", "--burst")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["archived"] == 12 and counts["removed"] == 12
    assert "archiver stopped" in result.stderr
    return ids


def test_archive_get_prints_the_operation(archived: list[str], archiver_settings: ArchiverSettings) -> None:
    text = kvstate(archiver_settings, "archive", "get", archived[0])
    assert text.returncode == 0, text.stderr
    assert archived[0] in text.stdout and "status:" in text.stdout
    as_json = json.loads(kvstate(archiver_settings, "archive", "get", archived[0], "--json").stdout)
    assert as_json["id"] == archived[0] and as_json["operation"]["id"] == archived[0]
    missing = kvstate(archiver_settings, "archive", "get", "missing")
    assert missing.returncode == 1 and "not in the archive" in missing.stderr


def test_archive_search_filters_and_pages(archived: list[str], archiver_settings: ArchiverSettings) -> None:
    page = json.loads(kvstate(archiver_settings, "archive", "search", "--limit", "5", "--json").stdout)
    assert len(page["items"]) == 5 and page["next_token"]
    rest = kvstate(
        archiver_settings, "archive", "search", "--limit", "50", "--page-token", page["next_token"], "--json"
    )
    ids = [i["id"] for i in page["items"]] + [i["id"] for i in json.loads(rest.stdout)["items"]]
    assert sorted(ids) == sorted(archived)
    group = kvstate(
        archiver_settings, "archive", "search", "--status", "cancelled", "--metadata", '{"group": 1}', "--json"
    )
    items = json.loads(group.stdout)["items"]
    assert items and all(i["status"] == "cancelled" and i["operation"]["metadata"]["group"] == 1 for i in items)
    table = kvstate(archiver_settings, "archive", "search", "--since", "2000-01-01T00:00:00")
    assert table.returncode == 0 and "FINISHED" in table.stdout and archived[0] in table.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("archive", "search", "--metadata", "[1]"),
        ("archive", "search", "--since", "yesterday"),
        ("archive", "search", "--page-token", "garbage!"),
        ("archive", "search", "--limit", "0"),
        ("archive", "get", "bad id"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(archiver_settings: ArchiverSettings, args: tuple[str, ...]) -> None:
    result = kvstate(archiver_settings, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


def test_unreachable_archive_exits_1(archiver_settings: ArchiverSettings) -> None:
    result = kvstate(
        archiver_settings, "archive", "search", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    assert result.returncode == 1 and "cannot read the archive" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_m_archiver_refuses_bad_configuration(archiver_settings: ArchiverSettings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "--burst"],
        env=archiver_env(archiver_settings, ARCHIVER_BATCH_SIZE="lots"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "ARCHIVER_BATCH_SIZE" in result.stderr
