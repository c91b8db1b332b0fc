"""Stored and reflected XSS: the corpus of xss_payloads.txt in every field the dashboard shows, in Chromium.

The payloads go in through the real client (worker names, errors and codes, cancel and skip
reasons, metadata keys and values, the stage's own metadata, a pipeline's description),
plus a few values only a misbehaving writer could store (a stage name, an id field); the
finished operations are archived by the real archiver, so the archive pages show them
too. Ids, stage and pipeline names have a restricted alphabet: hostile ones are refused
with a clear error, and the error pages that echo them are checked like every other page.

Each page is loaded in Chromium and then: no payload ran (``window.__xss`` stays unset, no
dialog, no CSP violation, which would mean markup got through and only the policy
stopped it), the DOM holds no event-handler attribute, no ``javascript:``/``data:`` URL,
no ``hx-*`` attribute other than the templates' own, no request went to a payload's
``/xss...`` URL, and the template expressions show as text (``{{7*191191}}``, never 1338337).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from playwright.async_api import Page

from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from dashboard.settings import DashboardSettings
from kvstate import Client, InvalidKey, InvalidPipeline, Pipeline, Settings, StageSpec

pytestmark = pytest.mark.browser

PAYLOADS = [line for line in (Path(__file__).parent / "xss_payloads.txt").read_text().splitlines() if line]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
EXTRA = [
    "\x00<script>window.__xss=200</script>",  # a NUL before the markup
    "<img src=x onerror=window.__xss=201>" * 300,  # very long (about 11 kB)
    "A" * 5000 + "<script>window.__xss=202</script>",
]
TEMPLATE_RESULT = "1338337"  # what {{7*191191}} and its cousins would render as if evaluated

HOSTILE = Pipeline(
    name="hostile",
    description=" ".join(PAYLOADS[:60]),
    heartbeat_timeout=30.0,
    stages=(
        StageSpec(name="ingest", description=PAYLOADS[0]),
        StageSpec(name="validate", after=("ingest",), description=PAYLOADS[1]),
    ),
)

# What the templates themselves put in hx-*/sse-* attributes; anything else came from data.
OWN_HX = {
    *("hx-ext", "hx-get", "hx-headers", "hx-post", "hx-preserve", "hx-swap", "hx-target", "hx-trigger"),
    "sse-connect",
}
CHECK_DOM = """
([ownHx]) => {
  const problems = [];
  const urlAttrs = ["href", "src", "action", "formaction", "xlink:href", "data", "background", "poster", "srcdoc"];
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      const value = attr.value.replace(/[\\u0000-\\u0020]/g, "").toLowerCase();
      if (name.startsWith("on")) problems.push(`${el.tagName} ${name}`);
      if ((name.startsWith("hx-") || name.startsWith("sse-") || name.startsWith("data-hx")) && !ownHx.includes(name))
        problems.push(`${el.tagName} ${name}`);
      if ((name === "hx-get" || name === "hx-post") && !/^\\/(partials|operations|jobs)(\\/|$)/.test(attr.value))
        problems.push(`${el.tagName} ${name}=${attr.value}`);
      if (urlAttrs.includes(name) && /^(javascript|vbscript|data):/.test(value))
        problems.push(`${el.tagName} ${name}=${attr.value.slice(0, 60)}`);
      if (name === "srcdoc" || name === "formaction") problems.push(`${el.tagName} ${name}`);
    }
  }
  for (const sel of ["script:not([src])", "iframe", "object", "embed", "base", "meta[http-equiv]", "portal",
                     "marquee", "isindex", "template", "xmp", "plaintext"]) {
    const n = document.querySelectorAll(sel).length;
    if (n) problems.push(`${n} of ${sel}`);
  }
  return {problems, xss: window.__xss === undefined ? null : String(window.__xss), text: document.body.innerText};
}
"""


@pytest.fixture
def dashboard_settings(settings: Settings, database_url: str) -> DashboardSettings:
    return DashboardSettings(kv=settings, debounce=0.05, page_size=50, secret="s" * 32, database_url=database_url)


def test_the_corpus_has_every_kind_of_payload() -> None:
    assert len(PAYLOADS) >= 100
    corpus = "\n".join(PAYLOADS).lower()
    for kind in ("<script", "onerror=", "onload=", "javascript:", "{{7*7}}", "hx-get=", "hx-on", "</script>", '"};'):
        assert kind in corpus, kind


async def test_hostile_ids_and_names_are_refused_with_a_clear_error(client: Client) -> None:
    for payload in PAYLOADS[:40]:
        with pytest.raises(InvalidKey, match=r"may only hold|characters"):
            await client.create("orders", op_id=payload)
        with pytest.raises(InvalidPipeline):
            Pipeline(name=payload, stages=(StageSpec(name="a"),))
        with pytest.raises(InvalidPipeline):
            Pipeline(name="p", stages=(StageSpec(name=payload),))


async def write_payloads(client: Client) -> tuple[list[str], list[str]]:
    """Operations carrying every payload in several fields: (live ids, ids to archive)."""
    await client.set_pipeline(HOSTILE)
    live, finished = [], []
    for n, start in enumerate(range(0, len(PAYLOADS), 8)):
        chunk = PAYLOADS[start : start + 8]
        short = [p[:200] for p in chunk]
        metadata: dict[str, Any] = {p[:100]: p for p in short} | {"all": chunk, "nested": {"deep": short}}
        op = await client.create("hostile" if n % 2 else "orders", metadata=metadata)
        stage = "ingest"
        await client.start(op.id, stage, worker=short[0], metadata={p[:100]: p for p in short[1:4]})
        kind = n % 3
        if kind == 0:  # failed for good: archived
            await client.fail(op.id, stage, " | ".join(chunk), retryable=False, code=short[1][:64])
            finished.append(op.id)
        elif kind == 1:  # cancelled: archived
            await client.cancel(op.id, reason=short[2][:500])
            finished.append(op.id)
        else:  # retrying, then running again: stays live
            await client.fail(op.id, stage, short[3], retryable=True, code=short[4][:64])
            await client.start(op.id, stage, worker=short[5])
            live.append(op.id)
    # The long and NUL-holding ones stay live: the archive cannot hold a NUL (PostgreSQL's jsonb refuses \u0000)
    extra = await client.create("orders", metadata={"long": EXTRA[1], "nul": EXTRA[0], EXTRA[0][:60]: EXTRA[2]})
    await client.start(extra.id, "ingest", worker=EXTRA[0])
    await client.fail(extra.id, "ingest", EXTRA[1], retryable=True)
    live.append(extra.id)
    # Past the client's checks, as a misbehaving writer could: a hostile stage name and id field.
    raw = json.loads((await client.raw(live[0]) or (0, b"{}"))[1])
    raw["stages"][PAYLOADS[0]] = {"status": "running", "worker": PAYLOADS[10]}
    raw["history"].append({"at": raw["created_at"], "to": PAYLOADS[54], "stage": PAYLOADS[11], "worker": PAYLOADS[63]})
    store = client._open_store()
    await store.js.publish(store.subject(f"op.{live[0]}"), json.dumps(raw).encode())
    await store.js.publish(store.subject("op.evilid"), json.dumps(dict(raw, id=PAYLOADS[0])).encode())
    await store.js.publish(store.subject("op.rawvalue"), (PAYLOADS[0] + PAYLOADS[54]).encode())
    return live, finished


async def archive(client: Client, database_url: str) -> None:
    settings = ArchiverSettings(
        kv=client.settings, database_url=database_url, grace_period=0.0, batch_timeout=0.05, metrics_port=0
    )
    async with Archiver(settings) as archiver:
        await archiver.run(burst=True)


async def check(page: Page, url: str, seen: list[str]) -> dict[str, Any]:
    response = await page.goto(url)
    assert response is not None
    await page.wait_for_timeout(250)  # fragments and anything a payload would trigger on load
    for element in (await page.query_selector_all("td, pre, h1, h3, .badge, a"))[:15]:
        await element.hover(timeout=1000, force=True)
    result: dict[str, Any] = await page.evaluate(CHECK_DOM, [sorted(OWN_HX)])
    assert result["problems"] == [], (url, result["problems"][:10])
    assert result["xss"] is None, (url, result["xss"])
    assert TEMPLATE_RESULT not in result["text"], url
    assert not [u for u in seen if urlsplit(u).path.startswith("/xss")], url
    result["status"] = response.status
    return result


@pytest.mark.timeout(300)  # about 60 page loads: 45 s alone, more on two busy cores
async def test_no_payload_runs_or_reaches_the_dom_on_any_page(
    client: Client, database_url: str, live_server: str, browser: Any
) -> None:
    live, finished = await write_payloads(client)
    await archive(client, database_url)
    page = await browser.new_page(viewport={"width": 1366, "height": 900})
    dialogs: list[str] = []
    console: list[str] = []
    requests: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda msg: console.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: console.append(str(exc)))
    page.on("request", lambda request: requests.append(request.url))

    paths = [
        "/",
        "/?pipeline=hostile",
        "/operations",
        "/operations?pipeline=hostile",
        "/operations?status=failed",
        "/operations?status=corrupt",
        "/archive",
        "/archive?status=failed",
        "/archive?status=cancelled",
        *(f"/operations/{op_id}" for op_id in live + finished),  # the finished ones from the archive
        "/operations/evilid",
        "/operations/rawvalue",
    ]
    # reflected: hostile filter values and ids, echoed by the list and the error pages
    for payload in (PAYLOADS[0], PAYLOADS[11], PAYLOADS[54], PAYLOADS[63], "{{7*191191}}"):
        paths.append("/operations?worker=" + quote(payload, safe=""))
        paths.append("/operations?meta=" + quote(f"k={payload}", safe=""))
        paths.append("/archive?pipeline=" + quote(payload, safe=""))
        paths.append("/operations/" + quote(payload, safe=""))
    # a bulk job whose reason and actor are hostile: the job list and the job's page show them
    async with httpx.AsyncClient(base_url=live_server, timeout=10) as http:
        token = (await http.get("/api/csrf")).json()["csrf_token"]
        created = await http.post(
            "/api/jobs",
            json={"filter": f"id={live[-1]}", "action": "cancel", "reason": PAYLOADS[54], "by": PAYLOADS[63][:64]},
            headers={"X-CSRFToken": token},
        )
        assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    paths += ["/jobs", f"/jobs/{job_id}"]
    shown: dict[str, dict[str, Any]] = {}
    for path in paths:
        shown[path] = await check(page, live_server + path, requests)

    # the values really are on the pages, as text
    detail = shown[f"/operations/{live[0]}"]
    assert detail["status"] == 200 and PAYLOADS[16] in detail["text"]  # live[0] holds the third chunk
    assert PAYLOADS[0] in shown["/?pipeline=hostile"]["text"]  # the pipeline's description
    assert any("{{7*7}}" in shown[f"/operations/{op_id}"]["text"] for op_id in live + finished)
    assert all(shown[f"/operations/{op_id}"]["status"] == 200 for op_id in finished)  # archived, shown from PostgreSQL
    assert PAYLOADS[0] in shown[f"/operations/{finished[0]}"]["text"]  # the first chunk, failed and archived
    assert all(op_id in shown["/archive"]["text"] for op_id in finished)
    assert shown["/operations/" + quote(PAYLOADS[0], safe="")]["status"] in (400, 404)
    assert PAYLOADS[54] in shown[f"/jobs/{job_id}"]["text"] and shown["/jobs"]["status"] == 200
    assert dialogs == []
    csp = [line for line in console if "Content Security Policy" in line]
    assert csp == [], csp[:5]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.goto(f"{live_server}/operations/{live[0]}")
    await page.screenshot(path=str(ARTIFACTS / "xss-corpus-detail.png"), full_page=True)
