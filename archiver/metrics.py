"""Prometheus metrics and the /metrics + /healthz endpoint of one archiver.

Each Archiver has a registry of its own (several can run in one test process). The
endpoint is a minimal HTTP/1.0 server on asyncio: GET /metrics (Prometheus text
format) and GET /healthz (200 when NATS is connected, the last PostgreSQL attempt
succeeded, every task of the run is alive and the archiver is not stalled, else 503;
the JSON body says which, with the lag, the seconds since the last progress and the
task states).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["ArchiverMetrics", "MetricsServer"]

log = logging.getLogger("archiver.metrics")


class ArchiverMetrics:
    """The archiver's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.archived = Counter(
            "kvstate_archiver_archived", "Rows inserted or replaced by a newer revision", registry=r
        )
        self.duplicates = Counter(
            "kvstate_archiver_duplicates", "Snapshots already archived at that revision or newer", registry=r
        )
        self.dead_letters = Counter("kvstate_archiver_dead_letters", "Undecodable values parked", registry=r)
        self.removed = Counter("kvstate_archiver_removed", "Operations removed from the bucket", registry=r)
        self.remove_conflicts = Counter(
            "kvstate_archiver_remove_conflicts",
            "Removals refused: the operation changed after its snapshot",
            registry=r,
        )
        self.messages = Counter(
            "kvstate_archiver_messages", "Messages consumed, by kind", ["kind"], registry=r
        )  # terminal, running, marker, corrupt
        self.batches = Counter("kvstate_archiver_batches", "Batches committed", registry=r)
        self.errors = Counter("kvstate_archiver_errors", "Failures, by component", ["component"], registry=r)
        self.lag = Gauge("kvstate_archiver_lag_messages", "Messages in the stream not yet delivered", registry=r)
        self.batch_rows = Histogram(
            "kvstate_archiver_batch_messages",
            "Messages per batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "kvstate_archiver_batch_seconds",
            "Seconds to commit a batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.last_commit = Gauge(
            "kvstate_archiver_last_commit_timestamp_seconds", "Unix time of the last commit", registry=r
        )
        self.database_up = Gauge(
            "kvstate_archiver_database_up", "1 when the last PostgreSQL call succeeded", registry=r
        )
        self.nats_up = Gauge("kvstate_archiver_nats_up", "1 while connected to NATS", registry=r)
        self.ack_failures = Counter(
            "kvstate_archiver_ack_failures", "Acknowledgements that failed (the messages come back)", registry=r
        )
        self.stalls = Counter(
            "kvstate_archiver_consumer_stalls",
            "Stall guard actions: pending messages not delivered, so the pull was restarted or the consumer re-created",
            ["action"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics and /healthz on ``host:port`` until closed."""

    def __init__(self, metrics: ArchiverMetrics, health: Callable[[], dict[str, object]], host: str, port: int) -> None:
        self._metrics = metrics
        self._health = health
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (``port`` 0 picks a free one, readable afterwards from ``port``)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                self._health()  # refreshes the up/down gauges before they are read
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            elif path == "/healthz":
                health = self._health()
                status = "200 OK" if health.get("ok") else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(health).encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode("latin-1") + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
