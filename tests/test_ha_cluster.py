"""Leadership and node failover on a throw-away 3-node RabbitMQ cluster on loopback (never the node on 5672)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import aio_pika
import pytest

from bridge.leadership import Leadership, RealmLock
from bridge.nodes import connect_robust_nodes, node_in_use
from tests.cluster import Cluster, ClusterUnavailable, rabbit_cluster
from tests.helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 3-node cluster for this module, or a skip saying why it cannot start."""
    try:
        with rabbit_cluster(3) as c:
            yield c
    except ClusterUnavailable as exc:
        pytest.skip(f"3-node RabbitMQ cluster unavailable: {exc}")


async def test_lock_moves_when_its_node_stops(cluster: Cluster) -> None:
    """A lock held over node A passes to a contender on node B when node A is stopped."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    realm = RealmLock(label="r", fingerprint=f"fp-{uuid.uuid4().hex[:12]}")
    stop = asyncio.Event()
    one = Leadership("test.cluster", [realm], [a.url], poll=0.2, heartbeat=2)
    t1 = asyncio.create_task(one.run(stop))
    assert await wait_until(lambda: one.is_leader("r"), timeout=20)
    two = Leadership("test.cluster", [realm], [b.url], poll=0.2, heartbeat=2)
    t2 = asyncio.create_task(two.run(stop))
    try:
        assert await wait_until(lambda: two.health().connected, timeout=20)
        await asyncio.sleep(1.0)
        assert one.is_leader("r") and not two.is_leader("r")
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.stop_node, a)
        assert await wait_until(lambda: two.is_leader("r"), timeout=30, interval=0.02)
        print(f"lock moved to node B {time.monotonic() - t0:.2f}s after 'rabbitmqctl stop' of node A began")
        assert not one.is_leader("r")
        assert two.health().node == b.host_port
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(t1, t2), 20)
        if a.proc is None:  # bring node A back, so that the cluster keeps a majority for the next test
            await asyncio.to_thread(cluster.start_node, a)
            await asyncio.to_thread(cluster.ctl, a, "await_startup")


async def test_robust_connection_fails_over_to_next_node(cluster: Cluster) -> None:
    """connect_robust_nodes moves to the next URL when its node stops, and publishing works there."""
    b, c = cluster.nodes[1], cluster.nodes[2]
    conn = await connect_robust_nodes([b.url, c.url], attempt_timeout=5, reconnect_interval=0.3)
    try:
        assert node_in_use(conn) == b.host_port
        channel = await conn.channel()
        queue = await channel.declare_queue(f"q.{uuid.uuid4().hex[:6]}", arguments={"x-queue-type": "quorum"}, durable=True)
        await asyncio.to_thread(cluster.stop_node, b)
        assert await wait_until(lambda: node_in_use(conn) == c.host_port and not conn.is_closed and conn.connected.is_set(), timeout=30)
        ch2 = await conn.channel()
        await ch2.default_exchange.publish(aio_pika.Message(b"after failover"), routing_key=queue.name)
        q2 = await ch2.declare_queue(queue.name, passive=True)
        got = await q2.get(timeout=10)
        assert got.body == b"after failover"
    finally:
        await conn.close()
