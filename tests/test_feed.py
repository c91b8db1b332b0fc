"""kvstate.feed.ChangeFeed against a real nats-server: a durable, shared pull consumer of the operation keys.

Deliveries with their revision, value or removal; ack, nak and term; two processes on one
feed name share the work; the stall guard; the end-of-replay signal once what was pending
is acknowledged (not merely delivered); the listing of current revisions; NATS errors as
kvstate errors. Also the watcher's ``initial_done``, set once the last replayed change is
taken rather than when it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from devstack.servers import NatsServer
from kvstate import (
    ChangeFeed,
    Client,
    ClientClosedError,
    ConnectionLostError,
    FeedMessage,
    FeedState,
    InvalidKey,
    KvstateError,
    Settings,
)
from tests.conftest import PIPELINE


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def _fetch_all(feed: ChangeFeed, count: int, timeout: float = 10.0) -> list[FeedMessage]:
    """Exactly ``count`` messages (fails if they do not come within ``timeout``)."""
    got: list[FeedMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await feed.fetch(count - len(got), timeout=0.5)
    assert len(got) == count, f"{len(got)} of {count} messages"
    return got


async def test_messages_carry_key_revision_value_and_removals(client: Client) -> None:
    # the bucket keeps one revision per key: each key shows its latest change only
    pending = await client.create("orders")
    cancelled = (await client.cancel((await client.create("orders")).id, reason="test")).operation
    removed = await client.create("orders")
    await client.remove(removed.id, removed.revision)
    async with client.feed("f1", ack_wait=30.0) as feed:
        messages = await _fetch_all(feed, 3)
        for message in messages:
            assert message.key == f"op.{message.op_id}"
            assert message.deliveries == 1
            await message.ack()
    first, update, removal = messages
    assert (first.op_id, first.revision) == (pending.id, pending.revision)
    assert (update.op_id, update.revision) == (cancelled.id, cancelled.revision)
    assert removal.op_id == removed.id and removal.revision > removed.revision
    assert first.value is not None and b'"status":"pending"' in first.value and not first.removed
    assert update.value is not None and b'"status":"cancelled"' in update.value
    assert removal.removed and removal.value is None
    assert first.pending == 2 and removal.pending == 0
    assert "FeedMessage(key=" in repr(removal)


async def test_an_acknowledged_message_is_not_delivered_again_and_a_nak_one_is(client: Client) -> None:
    first = await client.create("orders")
    second = await client.create("orders")
    async with client.feed("f2", ack_wait=30.0) as feed:
        a, b = await _fetch_all(feed, 2)
        await a.ack()
        await b.nak()
        (again,) = await _fetch_all(feed, 1)
        assert (again.op_id, again.deliveries) == (second.id, 2)
        await again.term()  # handled for good: never delivered again
        assert await feed.fetch(10, timeout=0.5) == []
        assert await feed.state() == FeedState(pending=0, ack_pending=0)
    assert a.op_id == first.id


async def test_a_closed_feed_resumes_where_it_stopped_and_unacknowledged_messages_come_back(client: Client) -> None:
    ids = [(await client.create("orders")).id for _ in range(3)]
    async with client.feed("f3", ack_wait=1.0) as feed:
        taken = await _fetch_all(feed, 3)
        await taken[0].ack()
        await taken[1].ack()  # the third is left unacknowledged
    async with client.feed("f3", ack_wait=1.0) as feed:
        (back,) = await _fetch_all(feed, 1, timeout=10.0)  # after ack_wait
        assert back.op_id == ids[2] and back.deliveries == 2
        await back.ack()


async def test_two_feeds_of_one_name_share_the_deliveries(client: Client, settings: Settings) -> None:
    ids = {(await client.create("orders")).id for _ in range(40)}
    async with Client(settings) as other, client.feed("shared") as one, other.feed("shared") as two:
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while len(seen) < 40 and time.monotonic() < deadline:
            for feed in (one, two):
                for message in await feed.fetch(7, timeout=0.1):
                    seen.append(message.op_id)
                    await message.ack()
    assert sorted(seen) == sorted(ids)  # every message once, none to both


async def test_the_stall_guard_restarts_the_pull_then_recreates_the_consumer(client: Client) -> None:
    actions: list[str] = []
    async with client.feed("stalled", stall_after=0.3, on_stall=actions.append) as feed:
        await client.create("orders")
        (first,) = await _fetch_all(feed, 1)
        await first.ack()
        # The consumer stops delivering while messages are pending: paused on the server.
        stream = client._open_store().config.stream
        assert (await client._open_store().js.pause_consumer(stream, "stalled", "2099-01-01T00:00:00Z")).paused
        later = await client.create("orders")
        got: list[FeedMessage] = []
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            got = await feed.fetch(10, timeout=0.2)
        assert actions[:2] == ["restart_pull", "recreate_consumer"]
        assert (feed.pull_restarts, feed.recreations, feed.generation) == (1, 1, 2)
        # re-created: the stream is delivered from the start, the old message included
        ids = [m.op_id for m in got] + [m.op_id for m in await feed.fetch(10, timeout=0.5)]
        assert later.id in ids
        assert not (await client._open_store().js.consumer_info(stream, "stalled")).paused


async def test_the_replay_ends_once_what_was_pending_is_acknowledged_not_when_it_arrives(client: Client) -> None:
    for _ in range(5):
        await client.create("orders")
    async with client.feed("replay", ack_wait=30.0) as feed:
        messages = await _fetch_all(feed, 5)
        await client.create("orders")  # written after the feed opened: not part of the replay
        await asyncio.sleep(0.6)  # a few checks of the ack floor
        assert not feed.replayed.is_set(), "every replayed message arrived, none is applied yet"
        for message in messages[:4]:
            await message.ack()
        await asyncio.sleep(0.6)
        assert not feed.replayed.is_set(), "one replayed message is not acknowledged yet"
        await messages[4].ack()
        await asyncio.wait_for(feed.replayed.wait(), 5)
        (live,) = await _fetch_all(feed, 1)  # the later write is still to be applied: the signal did not wait
        await live.ack()


async def test_a_feed_with_nothing_to_replay_says_so_at_once(client: Client) -> None:
    async with client.feed("empty") as feed:
        await asyncio.wait_for(feed.replayed.wait(), 5)
        assert await feed.state() == FeedState(0, 0)


async def test_live_revisions_lists_current_keys_without_values_and_leaves_no_consumer(client: Client) -> None:
    kept = await client.create("orders")
    moved = await client.create("orders")
    moved_now = (await client.cancel(moved.id)).operation
    assert moved_now.revision > moved.revision
    gone = await client.create("orders")
    await client.remove(gone.id, gone.revision)
    feed = client.feed("lister")  # the listing needs no open feed
    assert await feed.live_revisions() == {kept.id: kept.revision, moved.id: moved_now.revision}
    assert [c.name for c in await client._open_store().js.consumers_info(client._open_store().config.stream)] == []


async def test_misuse_and_a_lost_connection_raise_kvstate_errors(private_nats: NatsServer) -> None:
    settings = Settings(nats_url=private_nats.url, bucket="feeds")
    async with Client(settings, create_bucket=True) as kv:
        await kv.set_pipeline(PIPELINE)
        await kv.create("orders")
        with pytest.raises(InvalidKey):
            kv.feed("no.dots")
        feed = kv.feed("lost")
        with pytest.raises(ClientClosedError):
            await feed.fetch(1, timeout=0.1)  # never opened
        await feed.open()
        (message,) = await _fetch_all(feed, 1)
        await kv._open_store().nc.close()
        with pytest.raises(ConnectionLostError) as lost:
            await message.ack()
        assert lost.value.__cause__ is not None  # the nats error, chained
        with pytest.raises(KvstateError):
            await feed.state()
        await feed.close()


async def test_the_watchers_initial_done_waits_until_the_last_replayed_change_is_taken(client: Client) -> None:
    ids = [(await client.create("orders")).id for _ in range(3)]
    async with client.watch() as changes:
        await asyncio.sleep(0.5)  # every replayed change has arrived and waits in the queue
        assert not changes.initial_done.is_set()
        taken = [await anext(changes) for _ in range(3)]
        assert [c.op_id for c in taken] == ids
        assert [c.last_initial for c in taken] == [False, False, True]
        assert all(c.initial for c in taken)
        assert changes.initial_done.is_set()
        later = await client.create("orders")
        live = await anext(changes)
        assert (live.op_id, live.initial, live.last_initial) == (later.id, False, False)


async def test_a_watch_of_an_empty_bucket_is_done_replaying_at_once(client: Client) -> None:
    async with client.watch() as changes:
        await asyncio.wait_for(changes.initial_done.wait(), 5)
    async with client.watch(include_existing=False) as changes:
        assert changes.initial_done.is_set()
