"""Leadership and node failover on a throw-away 3-node RabbitMQ cluster on loopback (never the node on 5672)."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from bridge.broker import declare_topology
from bridge.leadership import Leadership, RealmLock
from bridge.nodes import connect_robust_nodes, node_in_use
from tests.cluster import Cluster, ClusterUnavailable, rabbit_cluster
from tests.ha_support import Collector, Replica, wait_roles
from tests.helpers import bridge_settings, simulator, wait_until

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


# -- the bridge itself on the cluster (replicas as processes) ---------------------------------------


async def _all_nodes_up(cluster: Cluster) -> None:
    """Start any node an earlier test left stopped (a quorum queue needs a majority)."""
    for node in cluster.nodes:
        if node.proc is None:
            await asyncio.to_thread(cluster.start_node, node)
            await asyncio.to_thread(cluster.ctl, node, "await_startup")


async def _quorum_collector(url: str, exchange: str, stream_url: str) -> tuple[aio_pika.abc.AbstractRobustConnection, Collector]:
    """A quorum queue bound to ``#`` on the bridge's exchange, consumed through ``url``."""
    connection = await aio_pika.connect_robust(url)
    settings = bridge_settings(stream_url, exchange)
    _, exchange_obj, _ = await declare_topology(connection, settings, confirms=False)
    channel = await connection.channel()
    queue = await channel.declare_queue(
        f"{exchange}.q.{uuid.uuid4().hex[:6]}", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange_obj, routing_key="#")
    collector = Collector(queue)
    await collector.start()
    return connection, collector


async def test_bridge_moves_to_another_node_when_its_node_stops(cluster: Cluster) -> None:
    """A bridge given three URLs moves to another node when its node stops; every seq reaches a quorum queue."""
    exchange = f"test.ha.node.{uuid.uuid4().hex[:6]}"
    await _all_nodes_up(cluster)
    async with aiohttp.ClientSession() as session, simulator(paused=True, rate=100.0) as sim:
        connection, collector = await _quorum_collector(cluster.nodes[2].url, exchange, sim.url)
        with tempfile.TemporaryDirectory() as tmp:
            bridge = Replica("n", sim.url, exchange, Path(tmp), amqp_urls=cluster.urls)
            stopped = None
            try:
                bridge.start()
                await sim.wait_subscribed(1, timeout=30)
                await wait_roles(session, [bridge], "test", timeout=60)
                state = await bridge.readyz(session)
                assert state is not None
                node = state["broker"]["node"]
                stopped = next(n for n in cluster.nodes if n.host_port == node)
                sim.resume()
                await asyncio.sleep(2)
                t0 = time.monotonic()
                await asyncio.to_thread(cluster.stop_node, stopped)
                moved = await wait_until_async(session, bridge, lambda s: s["broker"]["node"] != node and s["ready"])
                print(f"bridge ready on another node {time.monotonic() - t0:.1f}s after 'rabbitmqctl stop' began")
                assert moved
                await asyncio.sleep(2)
                sim.pause()
                last = await collector.expect_all_sent(sim, timeout=60)
                got = collector.seqs()
                print(f"node failover: {last} events sent, {len(got) - len(set(got))} duplicates")
                assert "broker up again node=" in bridge.output() or "AMQP connected to node" in bridge.output()
            finally:
                bridge.close()
                await collector.stop()
                await connection.close()
                if stopped is not None and stopped.proc is None:
                    await asyncio.to_thread(cluster.start_node, stopped)
                    await asyncio.to_thread(cluster.ctl, stopped, "await_startup")


async def test_broker_restart_with_two_replicas(cluster: Cluster) -> None:
    """stop_app/start_app of the one node two replicas use: afterwards exactly one leader, and every seq arrives."""
    exchange = f"test.ha.restart.{uuid.uuid4().hex[:6]}"
    await _all_nodes_up(cluster)
    node = cluster.nodes[0]
    async with aiohttp.ClientSession() as session, simulator(paused=True, rate=100.0) as sim:
        connection, collector = await _quorum_collector(cluster.nodes[1].url, exchange, sim.url)
        with tempfile.TemporaryDirectory() as tmp:
            a = Replica("a", sim.url, exchange, Path(tmp), amqp_urls=[node.url])
            b = Replica("b", sim.url, exchange, Path(tmp), amqp_urls=[node.url])
            try:
                a.start()
                b.start()
                await sim.wait_subscribed(2, timeout=30)
                await wait_roles(session, [a, b], "test", timeout=60)
                sim.resume()
                await asyncio.sleep(2)
                await asyncio.to_thread(cluster.ctl, node, "stop_app")
                await asyncio.sleep(3)
                await asyncio.to_thread(cluster.ctl, node, "start_app")
                t0 = time.monotonic()
                await wait_roles(session, [a, b], "test", timeout=90)
                print(f"broker restart: one ready leader {time.monotonic() - t0:.1f}s after start_app returned")
                await asyncio.sleep(2)
                sim.pause()
                last = await collector.expect_all_sent(sim, timeout=90)
                roles = [await a.roles(session), await b.roles(session)]
                assert [r.get("test") for r in roles].count("leader") == 1, roles
                got = collector.seqs()
                print(f"broker restart: {last} events sent, {len(got) - len(set(got))} duplicates")
            finally:
                a.close()
                b.close()
                await collector.stop()
                await connection.close()


async def wait_until_async(
    session: aiohttp.ClientSession, replica: Replica, check: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> bool:
    """Poll a replica's /readyz until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await replica.readyz(session)
        if state is not None and check(state):
            return True
        await asyncio.sleep(0.2)
    return False
