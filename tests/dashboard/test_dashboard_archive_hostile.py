"""Hostile archive filters through the API and the /archive page to the real PostgreSQL archive.

The archive search is parameterised SQL (archiver.read): quotes, comments, LIKE wildcards,
unicode, NUL and huge values must come back as the right (usually empty) result or a 400
naming the filter, never a 5xx, and the archive must be untouched afterwards.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from dashboard_support import archived_operations
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from kvstate import Client

HOSTILE = [
    "'",
    "''",
    "' OR '1'='1",
    "' OR 1=1 --",
    "'; DROP TABLE archived_operations; --",
    "1; SELECT pg_sleep(5)",
    '"',
    "\\",
    "\\'",
    "%",
    "_",
    "%25",
    "*",
    "$1",
    "$$",
    "E'\\x41'",
    ")",
    "é",
    "\U0001d54f",  # a mathematical capital X, outside the BMP
    "\u202e",
    "\u0000",
    "\x00' OR 1=1",
    "<script>",
    "x" * 129,
    "x" * 5000,
]
FILTERS = ["id", "pipeline", "failed_stage", "status", "finished_after", "finished_before"]


@pytest.fixture
async def archived(client: Client, database_url: str) -> dict[str, str]:
    return await archived_operations(client, database_url)


async def test_hostile_filter_values_are_refused_or_match_nothing_and_never_break_the_search(
    client: Client, dashboard_settings: DashboardSettings, database_url: str, archived: dict[str, str]
) -> None:
    app = create_app(replace(dashboard_settings, database_url=database_url, page_size=50))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        everything = (await http.get("/api/archive/operations")).json()["operations"]
        assert {item["metadata"]["id"] for item in everything} == set(archived.values())
        for key in [*FILTERS, "meta"]:
            for value in HOSTILE:
                shown = f"k={value}" if key == "meta" else value
                api = await http.get("/api/archive/operations", params={key: shown})
                page = await http.get("/archive", params={key: shown})
                where = (key, value[:40])
                assert api.status_code in (200, 400), (*where, api.status_code, api.text[:300])
                assert page.status_code == api.status_code, where
                if api.status_code == 400:
                    assert api.json()["error"]["status"] == "INVALID_ARGUMENT", where
                    continue
                assert api.json()["operations"] == [], where  # no archived operation has such a value
        # LIKE wildcards in an id prefix are literal: "_" and "-" match only ids starting with them
        for prefix in ("_", "-", "_%"):
            found = await http.get("/api/archive/operations", params={"id": prefix})
            assert found.status_code in (200, 400) and found.json().get("operations", []) == [], prefix
        real_prefix = archived["failed"][:6]
        matched = (await http.get("/api/archive/operations", params={"id": real_prefix})).json()["operations"]
        assert archived["failed"] in {item["metadata"]["id"] for item in matched}
        # metadata containment with hostile JSON finds nothing and breaks nothing; a real value still matches
        for meta in ('customer={"$ne": null}', "customer=' OR 1=1", 'customer="\\u0000"', "tier=[2]", "'=1"):
            answer = await http.get("/api/archive/operations", params={"meta": meta})
            assert answer.status_code in (200, 400), (meta, answer.text[:300])
            assert answer.json().get("operations", []) == [], meta
        tier = (await http.get("/api/archive/operations", params={"meta": "tier=2"})).json()["operations"]
        assert len(tier) == 3
        # the archive is intact after all of it
        again = (await http.get("/api/archive/operations")).json()["operations"]
        assert {item["metadata"]["id"] for item in again} == set(archived.values())
