"""Prometheus metrics of one dashboard process, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dashboard.feed import Broadcaster, IndexFeed
from dashboard.index import OperationIndex

__all__ = ["DashboardMetrics"]


class _IndexCollector(Collector):
    """Reads the index and the feed at scrape time (nothing to keep in sync)."""

    def __init__(self, index: OperationIndex, feed: IndexFeed, broadcaster: Broadcaster, connected: Callable[[], bool]):
        self.index = index
        self.feed = feed
        self.broadcaster = broadcaster
        self.connected = connected

    def collect(self) -> Iterator[Metric]:
        ops = GaugeMetricFamily("kvstate_dashboard_operations", "Operations in the index by status", labels=["status"])
        for status, n in sorted(self.index.status_counts().items()):
            ops.add_metric([status], n)
        yield ops
        _, stuck = self.index.stuck(0)
        yield GaugeMetricFamily(
            "kvstate_dashboard_stuck_stages", "Stages past their deadline or heartbeat", value=stuck
        )
        yield CounterMetricFamily(
            "kvstate_dashboard_changes", "Watched changes applied to the index", value=self.index.changes
        )
        yield CounterMetricFamily(
            "kvstate_dashboard_watch_restarts", "Times the watcher was started again", value=self.feed.restarts
        )
        yield GaugeMetricFamily(
            "kvstate_dashboard_nats_connected", "1 while NATS is reachable", value=int(self.connected())
        )
        yield GaugeMetricFamily(
            "kvstate_dashboard_index_ready",
            "1 while the index holds a complete replay of the bucket",
            value=int(self.feed.ready.is_set()),
        )
        yield GaugeMetricFamily(
            "kvstate_dashboard_event_streams", "Open server-sent-event streams", value=self.broadcaster.clients
        )
        yield CounterMetricFamily(
            "kvstate_dashboard_signals_dropped",
            "Change signals dropped for slow clients",
            value=self.broadcaster.dropped,
        )


class DashboardMetrics:
    """The registry, the render-time histogram and the exposition."""

    def __init__(self, index: OperationIndex, feed: IndexFeed, broadcaster: Broadcaster, connected: Callable[[], bool]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_IndexCollector(index, feed, broadcaster, connected))
        self.render_seconds = Histogram(
            "kvstate_dashboard_render_seconds",
            "Server-side time to build and render a page or fragment",
            ["view"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
