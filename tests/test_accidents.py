"""Accidents on the RabbitMQ side while the bridge runs: its own queues, its exchange or a --bind queue deleted.

Each of these used to lose events silently or leave consumers unbound (found by a black-box probe).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.bindings import Binding
from bridge.contract import Topology
from tests.helpers import bridge_settings, collect, queue_of, running_bridge, simulator, wait_until
from tests.test_faults import _ctl, broker_lock

pytestmark = pytest.mark.broker


def _seqs(messages: list) -> set[int]:  # type: ignore[type-arg]
    return {int(orjson.loads(m.body)["seq"]) for m in messages}


async def test_the_unrouted_queue_deleted_while_running_is_declared_again_and_nothing_is_dropped(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With <exchange>.unrouted deleted, the alternate exchange routed unroutable events only to the bridge's
    tap: RabbitMQ confirmed them and they were gone (about 1,240 in one probe). The tap's copies since the
    queue was last seen are put back into it once it is declared again."""
    names = Topology(exchange_name)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        with caplog.at_level(logging.WARNING):
            async with running_bridge(settings) as bridge:
                await sim.wait_subscribed(1)
                first = [await sim.send_event("currency.issued", f"{n:024x}") for n in range(5)]
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_events_unroutable_total") == 5, 20)
                channel = await amqp.channel()
                await channel.queue_delete(names.unrouted)
                later = [await sim.send_event("currency.issued", f"{n:024x}") for n in range(5, 25)]
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_events_unroutable_total") == 25, 20)
                kept = await collect(await wait_for_queue(amqp, names.unrouted), 20, timeout=20, settle=1.0)
                assert await bridge.finish() == 0
    assert _seqs(kept) >= {e.seq for e in later}  # every event after the delete is kept (a copy may repeat)
    assert f"queue {names.unrouted} was gone" in caplog.text
    assert not {e.seq for e in first} & _seqs(kept)  # those went with the deleted queue, as the operator chose


async def test_the_quarantine_deleted_while_running_is_declared_again_and_keeps_the_frames(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """A quarantine copy to a deleted queue came back (mandatory) and was taken for a success: 5 frames lost."""
    names = Topology(exchange_name)
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            channel = await amqp.channel()
            await channel.queue_delete(names.quarantine)
            assert await sim.send_malformed(5, "bad_json") == 5
            quarantine = await wait_for_queue(amqp, names.quarantine)
            kept = await collect(quarantine, 5, timeout=20, settle=0.5)
            assert await bridge.finish() == 0
    assert len(kept) == 5 and {dict(m.headers or {})["reason"] for m in kept} == {"bad_json"}


async def wait_for_queue(amqp: AbstractRobustConnection, name: str, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await queue_of(amqp, name)
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_the_exchange_deleted_while_running_is_said_and_the_bind_queues_are_bound_again(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ deletes every binding with an exchange: the bridge said nothing and its --bind queue got
    nothing more. Now a WARNING names what happened, and the --bind queue is bound again."""
    queue_name = f"{exchange_name}.bound.{uuid.uuid4().hex[:6]}"
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, bindings=(Binding(queue_name, ("deposit.#",)),))
        with caplog.at_level(logging.WARNING):
            async with running_bridge(settings) as bridge:
                await sim.wait_subscribed(1)
                await sim.send_event("deposit.received", "0" * 24)
                queue = await wait_for_queue(amqp, queue_name)
                assert len(await collect(queue, 1, timeout=20)) == 1
                channel = await amqp.channel()
                await channel.exchange_delete(exchange_name)
                await sim.send_event("deposit.received", "1" * 24)  # its publish finds no exchange
                assert await wait_until(lambda: f"the exchange {exchange_name} was gone" in caplog.text, 20)
                await asyncio.sleep(3)  # declared again, bound again
                after = [await sim.send_event("deposit.received", f"{n:024x}") for n in range(2, 12)]
                got = await collect(queue, 11, timeout=20, settle=0.5)
                assert await bridge.finish() == 0
    await (await amqp.channel()).queue_delete(queue_name)
    assert {e.seq for e in after} <= _seqs(got)


@pytest.mark.fault  # closes every connection of the broker
async def test_a_bind_queue_deleted_is_declared_again_at_the_next_connect(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """README: --bind declares its queues each time the bridge connects. They were declared at the first
    connect only: after a reconnect a deleted one stayed gone and its events went to .unrouted."""
    queue_name = f"{exchange_name}.bound.{uuid.uuid4().hex[:6]}"
    async with broker_lock(), simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, bindings=(Binding(queue_name, ("deposit.#",)),))
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            await wait_for_queue(amqp, queue_name)
            await (await amqp.channel()).queue_delete(queue_name)
            await asyncio.to_thread(_ctl, "close_all_connections", "accident test")
            queue = await wait_for_queue(amqp, queue_name, timeout=30)
            await asyncio.sleep(1)
            sent = [await sim.send_event("deposit.received", f"{n:024x}") for n in range(5)]
            got = await collect(queue, 5, timeout=30, settle=0.5)
            assert await bridge.finish() == 0
    await (await amqp.channel()).queue_delete(queue_name)
    assert {e.seq for e in sent} <= _seqs(got)
