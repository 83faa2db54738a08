"""The broker link against the real RabbitMQ: topology, queue polling, and no per-poll leak (issue 14)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bridge.broker import Broker, LinkState
from bridge.contract import Topology
from bridge.metrics import Metrics
from bridge.nodes import with_default_heartbeat
from tests.helpers import (
    FreezableProxy,
    bridge_settings,
    collect,
    free_port,
    queue_of,
    running_bridge,
    simulator,
    wait_until,
)

pytestmark = pytest.mark.broker

POLLS = 40


def close_callbacks(connection: AbstractRobustConnection) -> int:
    """How many callbacks wait on the aiormq connection's private ``_closing`` future.

    aiormq 7.2's ``closing`` property hands out a new observer per access, each
    registering a callback here; a leak shows up as this number growing.
    """
    transport = connection.transport
    assert transport is not None
    callbacks = transport.connection._closing._callbacks  # type: ignore[attr-defined]
    return len(callbacks or ())


@pytest.fixture
async def broker(exchange_name: str) -> AsyncIterator[tuple[Broker, CollectorRegistry]]:
    """A connected Broker on a unique exchange."""
    registry = CollectorRegistry()
    broker = Broker(bridge_settings("ws://127.0.0.1:9", exchange_name), Metrics(registry))
    assert await broker.connect(asyncio.Event())
    try:
        yield broker, registry
    finally:
        await broker.close()


async def test_polling_keeps_the_close_callback_count_constant(
    broker: tuple[Broker, CollectorRegistry],
) -> None:
    """Many queue-depth polls reuse one channel: the connection's close callbacks do not grow."""
    link, registry = broker
    assert link.connection is not None
    await link.poll_once()
    before = close_callbacks(link.connection)
    for _ in range(POLLS):
        await link.poll_once()
    assert close_callbacks(link.connection) == before
    depth = registry.get_sample_value("orangepill_bridge_queue_messages", {"queue": "quarantine"})
    assert depth == 0


async def test_a_channel_per_poll_leaks_in_this_aiormq(broker: tuple[Broker, CollectorRegistry]) -> None:
    """The pattern the fix replaced (open and close a channel per poll) grows the callbacks, so the check above can fail.

    If this starts failing, aiormq fixed the observer leak
    (docs/aiormq-closing-observer-leak.md); the reused channel is still right.
    """
    link, _ = broker
    connection = link.connection
    assert connection is not None
    before = close_callbacks(connection)
    for _ in range(10):
        channel = await connection.channel()
        await channel.close()
    assert close_callbacks(connection) > before


async def test_polling_survives_a_missing_queue(broker: tuple[Broker, CollectorRegistry]) -> None:
    """A 404 on the passive declare closes only the polling channel, publishing stays up, and the poll declares
    the bridge's own queue again (a quarantine publish to a deleted queue was lost)."""
    link, _ = broker
    assert link.connection is not None
    channel = await link.connection.channel()
    await channel.queue_delete(link.topology.quarantine)
    await channel.close()
    await link.poll_once()
    assert await link.queue_depth(link.topology.quarantine) == 0  # there again
    assert link.state is LinkState.UP
    raw = await link.raw_channel()
    assert raw is not None and not raw.is_closed


async def test_first_connect_retries_until_stopped() -> None:
    """With nothing listening, connect keeps retrying, reports the error for /readyz, and returns False on stop."""
    port = free_port()
    settings = bridge_settings("ws://127.0.0.1:9", "unused", amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    link = Broker(settings, Metrics(CollectorRegistry()))
    stop = asyncio.Event()
    attempt = asyncio.create_task(link.connect(stop))
    await asyncio.sleep(0.5)
    assert not attempt.done()
    assert "broker unreachable" in link.health().error
    assert "guest:guest" not in link.health().error
    stop.set()
    assert await asyncio.wait_for(attempt, timeout=10) is False
    assert link.health().connected is False


async def _connect_to_nothing(caplog: pytest.LogCaptureFixture, seconds: float) -> tuple[Broker, int]:
    """Run ``Broker.connect`` against a closed loopback port for ``seconds``, logging bridge.broker at DEBUG."""
    closed = free_port()  # nothing listens here
    settings = bridge_settings(
        "ws://127.0.0.1:9", "bridge.test.down", amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/",
        reconnect_min=0.02, reconnect_max=0.1,
    )  # fmt: skip
    broker = Broker(settings, Metrics(CollectorRegistry()))
    stop = asyncio.Event()
    caplog.set_level(logging.DEBUG, logger="bridge.broker")
    task = asyncio.create_task(broker.connect(stop))
    await asyncio.sleep(seconds)
    stop.set()
    assert await asyncio.wait_for(task, 5) is False
    return broker, closed


async def test_a_broker_down_at_start_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Retries while RabbitMQ is unreachable log one WARNING; each further attempt is a DEBUG line."""
    broker, closed = await _connect_to_nothing(caplog, 1.5)
    mine = [r for r in caplog.records if r.name == "bridge.broker" and "broker down" in r.getMessage()]
    warnings = [r for r in mine if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"127.0.0.1:{closed}" in warnings[0].getMessage()
    assert len(mine) - len(warnings) >= 3  # the retries went on, at DEBUG
    assert broker.health().error is not None


async def test_a_broker_that_stays_down_gets_a_reminder(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the broker stays down, 'broker still down after N attempts' comes once per reminder interval."""
    monkeypatch.setattr("bridge.broker._STILL_DOWN_EVERY", 0.5)
    _, closed = await _connect_to_nothing(caplog, 1.8)
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.broker" and r.levelno == logging.WARNING]
    assert warnings[0].startswith("broker down: "), warnings
    reminders = warnings[1:]
    assert 1 <= len(reminders) <= 4, warnings
    assert all(w.startswith("broker still down after ") and f"127.0.0.1:{closed}" in w for w in reminders), warnings


def test_the_publishing_connection_gets_a_short_heartbeat_unless_the_url_sets_one() -> None:
    """RabbitMQ's 60 s heartbeat would leave a silent link 'connected' for 3 minutes: 10 s unless the URL says."""
    assert with_default_heartbeat("amqp://u:p@h:5672/", 10) == "amqp://u:p@h:5672/?heartbeat=10"
    assert with_default_heartbeat("amqp://u:p@h:5672/v?heartbeat=30", 10) == "amqp://u:p@h:5672/v?heartbeat=30"
    assert with_default_heartbeat("amqps://u:p@h/?heartbeat=0&x=1", 10) == "amqps://u:p@h/?heartbeat=0&x=1"


async def test_a_silent_broker_link_is_reported_down_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    """A partition (nothing forwarded, nothing closed) turns the link DOWN by the heartbeat; a new link brings it UP."""
    proxy = await FreezableProxy().start()
    registry = CollectorRegistry()
    settings = bridge_settings("ws://127.0.0.1:9", "bridge.test.silent", amqp_url=proxy.url + "?heartbeat=1")
    broker = Broker(settings, Metrics(registry))
    try:
        assert await broker.connect(asyncio.Event())
        assert registry.get_sample_value("orangepill_bridge_amqp_connected") == 1
        caplog.set_level(logging.INFO, logger="bridge.broker")
        proxy.freeze()
        # aiormq gives up on a link after 3 x (heartbeat + 1) s without a frame: 6 s here. The DOWN state
        # may last well under a second (aio-pika reconnects through a new, unfrozen link): read the log.
        def said(text: str) -> bool:
            return any(text in r.getMessage() for r in caplog.records if r.name == "bridge.broker")

        assert await wait_until(lambda: said("broker down: broker connection lost"), timeout=15)
        assert await wait_until(lambda: said("broker up again") and broker.connected, timeout=15)
        assert registry.get_sample_value("orangepill_bridge_amqp_connected") == 1
        assert proxy.links >= 2
    finally:
        await broker.close()
        await proxy.close()


def test_a_link_ended_by_cancellation_is_described_not_named() -> None:
    """aiormq ends a silent link by cancelling its reader: /readyz says so, not 'CancelledError: CancelledError'."""
    from bridge.broker import describe_error

    assert "stopped answering" in describe_error(asyncio.CancelledError())
    assert describe_error(ConnectionRefusedError(111, "refused")) == "ConnectionRefusedError: [Errno 111] refused"


async def test_own_queues_declared_first_as_quorum_queues_are_used_as_they_are(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """<exchange>.unrouted and .quarantine declared beforehand as quorum queues (a cluster's choice): the bridge
    warns once per queue and uses them; an unroutable event lands in the quorum .unrouted."""
    topology = Topology(exchange_name)
    channel = await amqp.channel()
    for name in topology.own_queues:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    caplog.set_level(logging.WARNING, logger="bridge.broker")
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        async with running_bridge(settings) as bridge:
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 1)
            for n in range(3):
                await sim.send_event("deposit.received", f"entity-{n}")
            unrouted = await queue_of(amqp, topology.unrouted)
            got = await collect(unrouted, 3, timeout=15)
            assert await bridge.finish() == 0
    assert len(got) == 3
    warned = [r.getMessage() for r in caplog.records if "already exists with other arguments" in r.getMessage()]
    assert any(topology.unrouted in w and "x-queue-type" in w for w in warned), warned
    assert any(topology.quarantine in w for w in warned), warned
