"""Cluster control for the robustness scenarios: real nats-server processes on loopback.

    async with Cluster(options.workdir / "nats", size=3, sync_interval=options.sync_interval) as cluster:
        settings = cluster.settings(bucket="t1", replicas=3)  # every node's URL
        leader = await cluster.stream_leader("KV_t1")
        cluster.kill(leader)          # SIGKILL: a crash
        await cluster.restart(leader)  # same ports, same store
        await cluster.wait_streams_equal("KV_t1", timeout=30)

``size=3`` starts a three-node JetStream cluster (client, route and monitor ports of its
own per node, each node's store in its own directory); ``size=1`` a single node (for R1
scenarios) with the same API. Every configuration written states ``sync_interval``.

Nodes are ``devstack.servers.NatsServer`` subclasses whose start does not block the event
loop: the process is started from the loop's thread (so ``die_with_parent`` ties it to the
thread that lives as long as the run) and its log is polled with ``asyncio.sleep``.
Only this module's own processes are ever signalled, by pid; a paused node is sent SIGCONT
before it is stopped or killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from devstack.servers import NatsServer, ServerStartError, free_port, parent_death_signal
from kvstate import Settings

__all__ = ["Cluster", "ClusterError", "Node", "StreamState"]

_HTTP_TIMEOUT = 2.0


class ClusterError(RuntimeError):
    """The cluster did not reach the state a scenario waited for."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """One node's view of one stream (from its monitoring endpoint ``/jsz``)."""

    node: str
    messages: int
    first_seq: int
    last_seq: int
    leader: str | None
    """the leader this node believes in ("" or None when it knows none)"""
    persist_mode: str | None = None
    """the stream's persist_mode as this node reports it (None: the server's default)"""
    consumers: int = 0
    """consumers on the stream as this node counts them"""

    @property
    def figures(self) -> tuple[int, int, int]:
        """What must be equal on every node once the cluster is healed."""
        return (self.messages, self.first_seq, self.last_seq)


class Node(NatsServer):
    """One nats-server of the cluster, with fixed ports so a restart comes back on them."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str,
        sync_interval: str,
        cluster_name: str,
        cluster_port: int | None,
        routes: Sequence[int],
    ) -> None:
        super().__init__(
            directory,
            port=free_port(),
            http_port=free_port(),
            sync_interval=sync_interval,
            server_name=name,
            cluster_name=cluster_name,
            cluster_port=cluster_port,
            routes=routes,
            die_with_parent=True,
        )
        self.name = name
        self.paused = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The pid of the running process, None when it is not running."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def alive(self) -> bool:
        """True while the process runs (paused counts as running)."""
        return self.pid is not None

    @property
    def monitor_url(self) -> str:
        """http://127.0.0.1:PORT of this node's monitoring endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    async def start_async(self, timeout: float = 30.0) -> Self:
        """Start the process and wait for "Server is ready" without blocking the event loop."""
        if self.alive:
            return self
        self.write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Popen from the loop's own thread on purpose: the parent-death signal is tied to the
        # starting thread, and Popen returns as soon as the child is forked.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [self.binary, "-c", str(self.config_path), "-l", str(self.log_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )
        self.paused = False
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[offset:] if self.log_path.exists() else ""
            if "[FTL]" in text or self.proc.poll() is not None:
                self.kill()
                raise ServerStartError(f"{self.name} failed to start:\n{text[-3000:]}")
            if "Server is ready" in text:
                return self
            await asyncio.sleep(0.05)
        self.kill()
        raise ServerStartError(f"{self.name} not ready after {timeout}s (log {self.log_path})")

    def pause(self) -> None:
        """SIGSTOP the process (it keeps its sockets but answers nothing)."""
        if self.proc is not None and self.alive and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self.proc is not None and self.paused:
            if self.alive:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def kill(self) -> None:
        """SIGKILL the process at once (a crash); a paused one is resumed first."""
        self.resume()
        super().kill()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; a paused one is resumed first."""
        self.resume()
        super().stop()

    def jsz(self, query: str = "streams=true&config=true&raft=true") -> dict[str, Any] | None:
        """This node's ``/jsz`` (None when it does not answer: down, paused or starting)."""
        if not self.alive or self.paused:
            return None
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/jsz?{query}", timeout=_HTTP_TIMEOUT) as reply:
                data: dict[str, Any] = json.loads(reply.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def stream_state(self, stream: str) -> StreamState | None:
        """This node's view of ``stream`` (None when it does not answer or does not hold it)."""
        data = self.jsz()
        if data is None:
            return None
        for account in data.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") != stream:
                    continue
                state = detail.get("state") or {}
                cluster = detail.get("cluster") or {}
                config = detail.get("config") or {}
                return StreamState(
                    node=self.name,
                    messages=int(state.get("messages", 0)),
                    first_seq=int(state.get("first_seq", 0)),
                    last_seq=int(state.get("last_seq", 0)),
                    leader=cluster.get("leader") or None,
                    persist_mode=config.get("persist_mode"),
                    consumers=int(state.get("consumer_count", 0)),
                )
        return None

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows (None without one, or when it does not answer)."""
        data = self.jsz("")
        if data is None:
            return None
        meta = data.get("meta_cluster") or {}
        leader = meta.get("leader")
        return str(leader) if leader else None


class Cluster:
    """``size`` nats-server nodes on 127.0.0.1 (3: a JetStream cluster; 1: a single server).

    An async context manager: nodes start on entry and are stopped by pid on exit (paused
    ones resumed first). Nodes are addressed by index (0..size-1) or by server name.
    """

    def __init__(self, workdir: Path, *, size: int = 3, sync_interval: str = "1s", name: str = "robustness") -> None:
        if size not in (1, 3, 5):
            raise ValueError("a cluster has 1, 3 or 5 nodes")
        self.workdir = Path(workdir)
        self.size = size
        self.sync_interval = sync_interval
        routes = [free_port() for _ in range(size)] if size > 1 else []
        self.nodes = [
            Node(
                self.workdir / f"n{i}",
                name=f"n{i}",
                sync_interval=sync_interval,
                cluster_name=name,
                cluster_port=routes[i] if routes else None,
                routes=[port for port in routes if port != routes[i]] if routes else (),
            )
            for i in range(size)
        ]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 60.0) -> Self:
        """Start every node and wait until JetStream has a meta leader."""
        try:
            for node in self.nodes:
                await node.start_async()
            await self.wait_meta_leader(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node this cluster started (by pid; paused ones resumed first)."""
        for node in self.nodes:
            node.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ addressing

    def node(self, which: int | str) -> Node:
        """The node at index ``which`` or with server name ``which``."""
        if isinstance(which, int):
            return self.nodes[which]
        for node in self.nodes:
            if node.name == which:
                return node
        raise KeyError(which)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (for Settings.nats_url)."""
        return ",".join(node.url for node in self.nodes)

    def settings(
        self, bucket: str, *, replicas: int | None = None, on: int | str | None = None, **extra: Any
    ) -> Settings:
        """kvstate Settings for ``bucket`` on this cluster (every node, or only node ``on``)."""
        url = self.node(on).url if on is not None else self.url
        return Settings(nats_url=url, bucket=bucket, replicas=replicas or self.size, **extra)

    def config_texts(self) -> dict[str, str]:
        """Every configuration file this cluster wrote, by node name."""
        return {node.name: node.config_path.read_text() for node in self.nodes if node.config_path.exists()}

    def configs_state_sync_interval(self) -> bool:
        """True when every configuration written states ``sync_interval`` (the suite's own rule)."""
        texts = self.config_texts()
        return len(texts) == self.size and all(
            re.search(rf"^\s*sync_interval:\s*{re.escape(self.sync_interval)}\s*$", text, re.M)
            for text in texts.values()
        )

    # ------------------------------------------------------------------ faults

    def kill(self, which: int | str) -> Node:
        """SIGKILL one node (a process crash)."""
        node = self.node(which)
        node.kill()
        return node

    def kill_all(self) -> None:
        """SIGKILL every node (the whole cluster crashes at once)."""
        for node in self.nodes:
            node.resume()
        for node in self.nodes:
            if node.proc is not None and node.alive:
                os.kill(node.proc.pid, signal.SIGKILL)
        for node in self.nodes:
            node.kill()  # reaps

    def pause(self, which: int | str) -> Node:
        """SIGSTOP one node."""
        node = self.node(which)
        node.pause()
        return node

    def resume(self, which: int | str) -> Node:
        """SIGCONT one paused node."""
        node = self.node(which)
        node.resume()
        return node

    async def restart(self, which: int | str) -> Node:
        """Start a killed (or stop and start a running) node on the same ports and store."""
        node = self.node(which)
        if node.alive:
            node.stop()
        return await node.start_async()

    async def restart_all(self) -> None:
        """Start every node that is down (concurrently: a cluster needs a quorum to get ready)."""
        await asyncio.gather(*(node.start_async() for node in self.nodes if not node.alive))

    # ------------------------------------------------------------------ observation

    async def stream_states(self, stream: str) -> dict[str, StreamState | None]:
        """Each node's view of ``stream`` (None for a node that does not answer or lacks it)."""
        states = await asyncio.gather(*(asyncio.to_thread(node.stream_state, stream) for node in self.nodes))
        return {node.name: state for node, state in zip(self.nodes, states, strict=True)}

    async def stream_leader(self, stream: str, timeout: float = 30.0) -> str:
        """The name of the node leading ``stream``: one that answers and calls itself leader.

        On a single node that node. Waits up to ``timeout`` seconds for an elected leader.
        """
        if self.size == 1:
            return self.nodes[0].name
        deadline = time.monotonic() + timeout
        while True:
            states = await self.stream_states(stream)
            leaders = {name for name, state in states.items() if state is not None and state.leader == name}
            if len(leaders) == 1:
                return leaders.pop()
            if time.monotonic() > deadline:
                raise ClusterError(f"no single leader of {stream} after {timeout}s: {states}")
            await asyncio.sleep(0.25)

    async def wait_meta_leader(self, timeout: float = 60.0) -> str:
        """Wait until every live, unpaused node knows the same JetStream meta leader."""
        if self.size == 1:
            return self.nodes[0].name
        deadline = time.monotonic() + timeout
        while True:
            leaders = await asyncio.gather(
                *(asyncio.to_thread(node.meta_leader) for node in self.nodes if node.alive and not node.paused)
            )
            if leaders and all(leaders) and len(set(leaders)) == 1:
                return str(leaders[0])
            if time.monotonic() > deadline:
                raise ClusterError(f"no JetStream meta leader agreed on after {timeout}s: {leaders}")
            await asyncio.sleep(0.25)

    async def wait_streams_equal(self, stream: str, timeout: float = 30.0) -> float:
        """Wait until every node holds ``stream`` with the same messages and first/last sequence
        and agrees on its leader; returns the seconds it took (ClusterError after ``timeout``)."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            states = await self.stream_states(stream)
            present = [state for state in states.values() if state is not None]
            if len(present) == self.size:
                figures = {state.figures for state in present}
                leaders = {state.leader for state in present}
                if len(figures) == 1 and len(leaders) == 1 and None not in leaders:
                    return time.monotonic() - started
            if time.monotonic() > deadline:
                raise ClusterError(f"{stream} differs between nodes after {timeout}s: {states}")
            await asyncio.sleep(0.25)

    async def persist_modes(self, stream: str) -> dict[str, str | None]:
        """The persist_mode of ``stream`` as each answering node reports it."""
        return {name: state.persist_mode for name, state in (await self.stream_states(stream)).items() if state}
