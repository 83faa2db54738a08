"""A RabbitMQ resource alarm (here: disk) blocks publishing: the bridge waits, resends nothing, loses nothing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.helpers import bind_queue, bridge_settings, collect, running_bridge, simulator, wait_until
from tests.test_faults import broker_lock

pytestmark = [pytest.mark.broker, pytest.mark.fault]  # a broker-wide disk alarm


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60).stdout


@contextlib.asynccontextmanager
async def disk_alarm() -> AsyncIterator[None]:
    """A disk alarm on the local node for the duration (a free-disk limit no disk meets); always restored."""
    limit = int(_rabbitmqctl("eval", "rabbit_disk_monitor:get_disk_free_limit().").strip())
    await asyncio.to_thread(_rabbitmqctl, "set_disk_free_limit", "100000GB")
    try:
        yield
    finally:
        await asyncio.to_thread(_rabbitmqctl, "set_disk_free_limit", str(limit))


async def test_a_disk_alarm_blocks_publishing_and_nothing_is_sent_twice(
    amqp: AbstractRobustConnection, exchange_name: str
) -> None:
    """While RabbitMQ blocks the connection, publishes wait for their confirms through many publish timeouts
    instead of being sent again (each resend used to be one more copy delivered when the alarm cleared:
    1,813 duplicates in 40 s); amqp_blocked says so; afterwards every event arrives exactly once."""
    blocked = "orangepill_bridge_amqp_blocked"
    async with broker_lock(), simulator(rate=50.0) as sim:
        settings = bridge_settings(sim.url, exchange_name, publish_timeout=3.0)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(50)
            async with disk_alarm():
                assert await wait_until(lambda: bridge.metric(blocked) == 1, 30)
                await asyncio.sleep(10)  # three publish timeouts
                assert bridge.metric(blocked) == 1
            assert await wait_until(lambda: bridge.metric(blocked) == 0, 30)
            await asyncio.sleep(1)
            sim.pause()
            sent = len(sim.sent)
            got = await collect(queue, sent, timeout=60, settle=2.0)
            timeouts = bridge.metric("orangepill_bridge_publish_failures_total", {"reason": "timeout"})
            assert await bridge.finish() == 0
    copies = collections.Counter(m.message_id for m in got)
    assert len(copies) == sent  # every event
    assert [i for i, n in copies.items() if n > 1] == []  # once
    assert timeouts == 0
