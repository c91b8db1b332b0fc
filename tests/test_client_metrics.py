"""Prometheus metrics of the client: updates by outcome, latency, writes, conflicts and retries."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, generate_latest

from kvstate import Client, OperationNotFound, Settings
from kvstate.metrics import ClientMetrics
from tests.conftest import PIPELINE


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_updates_are_counted_by_outcome_with_their_latency(settings: Settings) -> None:
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    async with Client(settings, create_bucket=True, metrics=metrics) as kv:
        await kv.set_pipeline(PIPELINE)
        op = await kv.create("orders")
        await kv.start(op.id, "ingest", event_id="s1")
        await kv.start(op.id, "ingest", event_id="s1")  # duplicate
        await kv.succeed(op.id, "ingest", event_id="ok")
        await kv.start(op.id, "ingest", attempt=1, event_id="late")  # stale
        with contextlib.suppress(OperationNotFound):
            await kv.start("nosuchop", "ingest")
    assert sample(registry, "kvstate_client_updates_total", outcome="applied") == 2
    assert sample(registry, "kvstate_client_updates_total", outcome="duplicate") == 1
    assert sample(registry, "kvstate_client_updates_total", outcome="stale") == 1
    assert sample(registry, "kvstate_client_updates_total", outcome="error") == 1
    assert sample(registry, "kvstate_client_update_seconds_count") == 5
    assert sample(registry, "kvstate_client_writes_total") == 2
    text = generate_latest(registry).decode()
    assert "kvstate_client_conflicts_total 0.0" in text and "kvstate_client_transient_retries_total 0.0" in text


async def test_conflicts_between_two_clients_are_counted(settings: Settings) -> None:
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    async with Client(settings, create_bucket=True, metrics=metrics) as a, Client(settings, metrics=metrics) as b:
        await a.set_pipeline(PIPELINE)
        op = await a.create("orders")
        await b.get(op.id)  # b caches this revision
        await a.merge_metadata(op.id, {"a": 1})
        await b.merge_metadata(op.id, {"b": 1})  # from the stale cached revision: one conflict, retried
    assert sample(registry, "kvstate_client_conflicts_total") == 1
    assert sample(registry, "kvstate_client_updates_total", outcome="applied") == 2
