"""Hot-standby announcements on <exchange>.ha against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from bridge.errors import ProtocolError
from bridge.ha import Announcer, Follower, ha_exchange_name, pack_ids, unpack_ids
from tests.helpers import AMQP_URL, wait_until


def test_pack_round_trip() -> None:
    """An announcement body reads back as the same fingerprint and ids."""
    assert unpack_ids(pack_ids("fp-abc", ["1", "2"])) == ("fp-abc", ["1", "2"])


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"v":2,"fp":"x","ids":[]}', b'{"v":1,"fp":"x","ids":[1]}'])
def test_bad_bodies_rejected(body: bytes) -> None:
    """A body that is not a version-1 announcement raises ProtocolError."""
    with pytest.raises(ProtocolError):
        unpack_ids(body)


@pytest.mark.broker
async def test_announce_reaches_every_standby() -> None:
    """Ids confirmed on the leader reach two standbys, grouped by realm fingerprint, within a few ticks."""
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect_robust(AMQP_URL)
    try:
        stop = asyncio.Event()
        got: list[list[tuple[str, list[str]]]] = [[], []]
        followers = [Follower(conn, exchange, lambda fp, ids, i=i: got[i].append((fp, ids))) for i in range(2)]
        tasks = [asyncio.create_task(f.run(stop)) for f in followers]
        for f in followers:
            await asyncio.wait_for(f.ready.wait(), 10)
        announcer = Announcer(conn, exchange, interval=0.1)
        tasks.append(asyncio.create_task(announcer.run(stop)))
        ids_a = [f"a{i}" for i in range(4500)]  # more than one message's worth
        announcer.confirmed("fp-a", ids_a)
        announcer.confirmed("fp-b", ["b1"])
        assert await wait_until(lambda: all(f.received == 4501 for f in followers), timeout=10)
        for per in got:
            assert [i for fp, ids in per if fp == "fp-a" for i in ids] == ids_a
            assert [i for fp, ids in per if fp == "fp-b" for i in ids] == ["b1"]
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        ch = await conn.channel()
        await ch.exchange_delete(ha_exchange_name(exchange))
    finally:
        await conn.close()


@pytest.mark.broker
async def test_no_queue_is_bound_to_the_events_exchange() -> None:
    """The followers bind only to <exchange>.ha: a message to the events exchange stays unroutable."""
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect_robust(AMQP_URL)
    try:
        stop = asyncio.Event()
        follower = Follower(conn, exchange, lambda fp, ids: None)
        task = asyncio.create_task(follower.run(stop))
        await asyncio.wait_for(follower.ready.wait(), 10)
        ch = await conn.channel()
        events = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        returned: list[object] = []
        ch.return_callbacks.add(lambda _ch, msg: returned.append(msg))
        await events.publish(aio_pika.Message(b"{}"), routing_key="transaction.done", mandatory=True)
        assert await wait_until(lambda: bool(returned), timeout=5), "the event was routed somewhere"
        stop.set()
        await asyncio.wait_for(task, 10)
        await ch.exchange_delete(ha_exchange_name(exchange))
    finally:
        await conn.close()
