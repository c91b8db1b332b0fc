"""A bucket at three replicas on a real three-node nats-server cluster.

Reads there may be answered by any replica (direct get) and a conflicting write may come
back with error 10164 instead of 10071: neither may cost an update. Each client talks to a
different node, as services spread over a cluster do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import NatsServer, free_port
from kvstate import Client, ConflictError, ConnectionLostError, KvstateError, Outcome, Settings, StageStatus
from tests.conftest import PIPELINE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NatsServer]]:
    route_ports = [free_port() for _ in range(3)]
    nodes: list[NatsServer] = []
    try:
        for i, own in enumerate(route_ports):
            node = NatsServer(
                Path(tmp_path_factory.mktemp(f"node{i}")),
                server_name=f"node{i}",
                cluster_name="kvstate-test",
                cluster_port=own,
                routes=[port for port in route_ports if port != own],
                die_with_parent=True,
            )
            nodes.append(node.start())
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def replicated_bucket(cluster: list[NatsServer], bucket: str) -> Settings:
    """Settings for a three-replica ``bucket`` holding the test pipeline, once the cluster can create it."""
    settings = Settings(nats_url=",".join(node.url for node in cluster), bucket=bucket, replicas=3)
    deadline = time.monotonic() + 60
    while True:
        try:
            async with Client(settings, create_bucket=True) as kv:
                await kv.set_pipeline(PIPELINE)
            return settings
        except (ConnectionLostError, KvstateError):  # the cluster is still electing its leaders
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def on_node(settings: Settings, node: NatsServer) -> Settings:
    """``settings`` connecting to one node only."""
    return Settings(nats_url=node.url, bucket=settings.bucket, replicas=settings.replicas)


async def test_clients_on_different_nodes_lose_nothing(cluster: list[NatsServer]) -> None:
    settings = await replicated_bucket(cluster, "clusterrace")
    async with Client(on_node(settings, cluster[0])) as a, Client(on_node(settings, cluster[2])) as b:
        info = await a._open_store().info()
        assert info.config.num_replicas == 3
        op = await a.create("orders")
        await b.get(op.id)  # both start from the same revision, so the race below must happen
        results = await asyncio.gather(
            *(a.merge_metadata(op.id, {f"a{i}": i}) for i in range(25)),
            *(b.merge_metadata(op.id, {f"b{i}": i}) for i in range(25)),
        )
        assert all(r.outcome is Outcome.APPLIED for r in results)
        assert a.stats["conflicts"] + b.stats["conflicts"] > 0  # 10071 or 10164: both are conflicts
        final = await a.get(op.id)
    assert final.metadata == {**{f"a{i}": i for i in range(25)}, **{f"b{i}": i for i in range(25)}}


async def test_a_stage_finished_through_another_node_is_seen(cluster: list[NatsServer]) -> None:
    settings = await replicated_bucket(cluster, "clusterstale")
    async with Client(on_node(settings, cluster[1])) as validate, Client(on_node(settings, cluster[2])) as ingest:
        op = await validate.create("orders")  # cached by the validate service with ingest waiting
        await ingest.start(op.id, "ingest")
        await ingest.succeed(op.id, "ingest")
        started = await validate.start(op.id, "validate")
        assert started.outcome is Outcome.APPLIED
        assert started.operation.stage("validate").status is StageStatus.RUNNING
        assert started.operation.stage("ingest").status is StageStatus.SUCCEEDED


async def test_a_removal_against_an_old_revision_is_refused_on_a_replicated_bucket(
    cluster: list[NatsServer],
) -> None:
    settings = await replicated_bucket(cluster, "clusterremove")
    async with Client(on_node(settings, cluster[0])) as a, Client(on_node(settings, cluster[1])) as b:
        op = await a.create("orders")
        await b.cancel(op.id)
        with pytest.raises(ConflictError):
            await a.remove(op.id, op.revision)  # the operation changed after that revision
        assert (await a.get(op.id)).status.value == "cancelled"


def leader_node(cluster: list[NatsServer], leader_name: str) -> NatsServer:
    return next(node for node in cluster if node.server_name == leader_name)


async def test_updates_ride_out_the_stream_leader_being_killed(cluster: list[NatsServer]) -> None:
    """While the bucket's stream elects a new leader a publish gets "no responders"; that is
    a transient the client retries within its deadline, never a BucketError for the caller."""
    settings = await replicated_bucket(cluster, "clusterelection")
    async with Client(Settings(nats_url=settings.nats_url, bucket=settings.bucket, deadline=30.0)) as kv:
        info = await kv._open_store().info()
        assert info.cluster is not None and info.cluster.leader
        victim = leader_node(cluster, info.cluster.leader)
        survivors = [node for node in cluster if node is not victim]
        async with Client(on_node(settings, survivors[0])) as writer:
            ops = [await writer.create("orders") for _ in range(8)]
            errors: list[BaseException] = []
            applied = 0

            async def keep_writing(op_id: str, until: float) -> None:
                nonlocal applied
                i = 0
                while time.monotonic() < until:
                    try:
                        result = await writer.merge_metadata(op_id, {f"k{i}": i})
                    except KvstateError as exc:
                        errors.append(exc)
                        return
                    applied += result.outcome is Outcome.APPLIED
                    i += 1
                    await asyncio.sleep(0.01)

            until = time.monotonic() + 12.0
            writers = [asyncio.create_task(keep_writing(op.id, until)) for op in ops]
            await asyncio.sleep(1.0)
            victim.kill()
            try:
                await asyncio.gather(*writers)
            finally:
                victim.start()
            assert errors == []
            assert applied > 0
            after = await writer._open_store().info()
            assert after.cluster is not None and after.cluster.leader != victim.server_name
