"""The dashboard while NATS goes away and comes back: it says so plainly and recovers by itself."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from dashboard_support import state_of
from litestar.testing import AsyncTestClient

from dashboard.app import create_app
from dashboard.feed import Broadcaster, IndexFeed, running
from dashboard.index import OperationIndex
from dashboard.planner import OperationFilter
from dashboard.settings import DashboardSettings
from devstack.servers import NatsServer
from kvstate import Client, Pipeline, Settings, StageSpec

pytestmark = pytest.mark.slow

PIPELINE = Pipeline(name="orders", stages=(StageSpec(name="ingest"), StageSpec(name="store", after=("ingest",))))


async def until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_nats_restart_shows_a_banner_then_catches_up_without_duplicates(private_nats: NatsServer) -> None:
    # history 10: every revision written while the dashboard was cut off is still there to
    # replay, so the count of changes below is exact
    kv = Settings(nats_url=private_nats.url, bucket="restart", history=10)
    async with Client(kv, create_bucket=True) as writer:
        await writer.set_pipeline(PIPELINE)
        first = await writer.create("orders")
    app = create_app(DashboardSettings(kv=kv, debounce=0.05))
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as http:
        state = state_of(app)
        await until(lambda: len(state.index) == 1, 10)
        assert "NATS is unreachable" not in (await http.get("/")).text

        private_nats.kill()
        await until(lambda: not state.feed.connected, 10)
        down = await http.get("/")
        assert down.status_code == 200
        assert "NATS is unreachable" in down.text and 'data-testid="total">1<' in down.text
        assert (await http.get("/healthz")).status_code == 503
        detail = await http.get(f"/operations/{first.id}")  # opened during the outage
        assert detail.status_code == 503 and "NATS is unreachable" in detail.text  # the banner, not an error page
        waiting = re.search(r'<section [^>]*data-testid="waiting-for-nats"[^>]*>', detail.text)
        assert waiting is not None and 'hx-trigger="every 2s"' in waiting.group(0)  # it polls to fill in by itself
        assert f'hx-get="/partials/operations/{first.id}"' in waiting.group(0) and "error-card" not in detail.text
        assert "pending" in detail.text  # what the index last knew
        fragment = await http.get(f"/partials/operations/{first.id}", headers={"HX-Request": "true"})
        assert fragment.status_code == 204 and fragment.content == b""  # htmx keeps what an open page shows

        private_nats.start()
        async with Client(kv) as writer:
            second = await writer.create("orders")
            await writer.start(second.id, "ingest")
        await until(lambda: state.feed.connected and len(state.index) == 2, 20)
        await until(lambda: state.index.status_counts() == {"pending": 1, "running": 1}, 10)
        up = (await http.get("/")).text
        assert "NATS is unreachable" not in up and 'data-testid="total">2<' in up
        assert (await http.get("/healthz")).status_code == 200
        back = await http.get(f"/partials/operations/{first.id}", headers={"HX-Request": "true"})
        assert back.status_code == 200 and first.id in back.text and "waiting-for-nats" not in back.text
        assert (await http.get(f"/operations/{first.id}")).status_code == 200
        assert state.index.changes == 3  # 1 replayed + create and start after the restart: no duplicates


class RecordedReadiness(asyncio.Event):
    """The feed's ``ready`` event, remembering each set and clear with the index size then."""

    def __init__(self, index: OperationIndex) -> None:
        super().__init__()
        self.index = index
        self.log: list[tuple[str, int]] = []

    def set(self) -> None:
        self.log.append(("set", len(self.index)))
        super().set()

    def clear(self) -> None:
        self.log.append(("clear", len(self.index)))
        super().clear()


async def test_a_restarted_watch_replays_into_a_sorted_index_and_is_ready_only_when_done(client: Client) -> None:
    oldest = await client.create("orders")
    newer = [await client.create("orders") for _ in range(3)]
    await client.start(oldest.id, "ingest")  # the oldest operation now comes last in a replay
    in_age_order = [oldest.id, *(op.id for op in newer)]
    index, broadcaster = OperationIndex(), Broadcaster(debounce=0.01)
    feed = IndexFeed(client, index, broadcaster, tick=0.05)
    readiness = feed.ready = RecordedReadiness(index)

    def listed(limit: int = 10, after: tuple[float, str] | None = None) -> list[str]:
        return [op.id for op in index.query(OperationFilter(newest_first=False), limit, after)[0]]

    async with running(feed, broadcaster):
        await until(lambda: readiness.is_set(), 10)
        assert listed() == in_age_order
        first = feed.watcher
        assert first is not None
        await first.stop()  # the watch ends: the feed must open another one and replay
        await until(lambda: feed.restarts == 1 and feed.watcher is not first and readiness.is_set(), 10)
        # not ready while (re)playing; ready again only with the whole bucket in the index
        assert readiness.log == [("clear", 0), ("set", 4), ("clear", 4), ("set", 4)], readiness.log
        assert listed() == in_age_order  # sorted again after the replay
        _, cursor = index.query(OperationFilter(newest_first=False), 2)
        assert cursor is not None and listed(2) + listed(2, cursor) == in_age_order  # keyset pages too
        late = await client.create("orders")
        await until(lambda: late.id in index, 10)
        assert listed() == [*in_age_order, late.id]  # changes after the replay keep the order
