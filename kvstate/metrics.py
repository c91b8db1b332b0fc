"""Prometheus metrics of a kvstate client, for any service to expose (optional: ``kvstate[metrics]``).

    metrics = ClientMetrics()                      # registers in prometheus_client's default registry
    async with Client(settings, metrics=metrics) as kv:
        ...                                        # the service exposes /metrics as it already does

=================================================  ==================================================
``kvstate_client_updates_total{outcome}``          updates by outcome: applied, duplicate, stale, error
``kvstate_client_update_seconds``                  time of one update call, histogram (retries included)
``kvstate_client_writes_total``                    compare-and-set writes (one write may carry many updates)
``kvstate_client_conflicts_total``                 compare-and-set conflicts retried
``kvstate_client_transient_retries_total``         transient failures retried (leader elections, timeouts)
=================================================  ==================================================

The write and conflict counters are read from the client's own counters when scraped, so
they cost the update path nothing; only the outcome counter and the histogram are updated
per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kvstate.errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["UPDATE_BUCKETS", "ClientMetrics"]

UPDATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram buckets of one update, seconds: a cached-revision update takes about a millisecond."""

_OUTCOMES = ("applied", "duplicate", "stale", "error")


class ClientMetrics:
    """The metrics of one or more clients of this process (pass the same object to each)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            import prometheus_client
            from prometheus_client.core import CounterMetricFamily
        except ImportError as exc:  # the optional dependency
            raise ConfigurationError("client metrics need prometheus-client: pip install 'kvstate[metrics]'") from exc
        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        self._updates = prometheus_client.Counter(
            "kvstate_client_updates", "Updates by outcome (applied, duplicate, stale, error)", ["outcome"], **kwargs
        )
        self._by_outcome = {outcome: self._updates.labels(outcome) for outcome in _OUTCOMES}
        self._seconds = prometheus_client.Histogram(
            "kvstate_client_update_seconds",
            "Time of one update call, retries included",
            buckets=UPDATE_BUCKETS,
            **kwargs,
        )
        self._sources: list[Callable[[], dict[str, int]]] = []
        collector = _StatsCollector(self._sources, CounterMetricFamily)
        (registry or prometheus_client.REGISTRY).register(collector)

    def watch(self, stats: Callable[[], dict[str, int]]) -> None:
        """Count the writes, conflicts and retries of a client (``lambda: client.stats``) when scraped."""
        self._sources.append(stats)

    def observe(self, outcome: str, seconds: float) -> None:
        """One update call ended with ``outcome`` after ``seconds``."""
        self._by_outcome[outcome].inc()
        self._seconds.observe(seconds)


class _StatsCollector:
    """Reads the clients' counters at scrape time."""

    _FAMILIES = (
        ("writes", "kvstate_client_writes", "Compare-and-set writes (one write may carry many updates)"),
        ("conflicts", "kvstate_client_conflicts", "Compare-and-set conflicts retried"),
        ("transient_retries", "kvstate_client_transient_retries", "Transient failures retried"),
    )

    def __init__(self, sources: list[Callable[[], dict[str, int]]], counter_family: Any) -> None:
        self._sources = sources
        self._counter = counter_family

    def collect(self) -> Iterator[Any]:
        totals = {name: 0 for name, _, _ in self._FAMILIES}
        for stats in self._sources:
            current = stats()
            for name in totals:
                totals[name] += current.get(name, 0)
        for name, metric, help_text in self._FAMILIES:
            yield self._counter(metric, help_text, value=totals[name])

    def describe(self) -> Iterator[Any]:
        return iter(())
