"""Fault injection against the real RabbitMQ and the simulator: every event sent arrives at least once.

These tests stop, restart or force-close RabbitMQ. They always restore it in a
``finally`` and hold /tmp/orangepill-broker.lock so that nothing else on this
machine stops the broker at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from bridge.spool import Spool
from tests.helpers import (
    AMQP_URL,
    BridgeProcess,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    process_args,
    running_bridge,
    seqs,
    simulator,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]


def _ctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


async def _broker_answers(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(AMQP_URL, timeout=3)
            await connection.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def broker_lock() -> AsyncIterator[None]:
    """Hold the machine-wide lock that serialises anything stopping RabbitMQ."""
    with open("/tmp/orangepill-broker.lock", "w") as handle:
        await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def broker_stopped() -> AsyncIterator[None]:
    """RabbitMQ's application stopped for the duration; always started again afterwards."""
    await asyncio.to_thread(_ctl, "stop_app")
    try:
        yield
    finally:
        await asyncio.to_thread(_ctl, "start_app")
        await asyncio.to_thread(_ctl, "await_startup")
        await _broker_answers()


def assert_all_at_least_once(messages: list[AbstractIncomingMessage], sent: list[int]) -> None:
    """Every sent seq arrived at least once, and copies of one event share its message_id."""
    assert sorted(set(seqs(messages))) == sorted(sent)
    ids: dict[int, str | None] = {}
    for message in messages:
        seq = int(orjson.loads(message.body)["seq"])
        assert ids.setdefault(seq, message.message_id) == message.message_id
    assert len(set(ids.values())) == len(ids)


async def fresh_collect(queue_name: str, n: int, timeout: float = 60) -> list[AbstractIncomingMessage]:
    """Consume from a queue on a new connection (the test's own links may have been closed)."""
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue: AbstractQueue = await channel.declare_queue(queue_name, passive=True)
        return await collect(queue, n, timeout=timeout, settle=0.5)


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def test_websocket_dropped_repeatedly_with_disk_spool(amqp: aio_pika.abc.AbstractRobustConnection, exchange_name: str, tmp_path: Path) -> None:
    """The server dropping the link every 50 events, ten times over, loses nothing."""
    async with simulator(rate=1000, count=600, drop_every=50) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(tmp_path / "spool.db"))
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_sent(600, timeout=60)
            assert sim.connections >= 12
            msgs = await collect(queue, 600, timeout=30, settle=0.3)
            assert await bridge.finish() == 0
    assert_all_at_least_once(msgs, [e.seq for e in sim.sent])


async def test_broker_connections_force_closed_mid_stream(exchange_name: str, tmp_path: Path) -> None:
    """rabbitmqctl close_all_connections mid-stream: the bridge reconnects and every event arrives."""
    total = 3000
    async with broker_lock(), simulator(rate=300, count=total) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(tmp_path / "spool.db"))
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            queue_name = (await bind_queue(connection, settings, "#")).name  # type: ignore[arg-type]
        if True:
            async with running_bridge(settings) as bridge:
                for _ in range(3):
                    await sim.wait_sent(min(total, len(sim.sent) + 200), timeout=30)
                    await asyncio.to_thread(_ctl, "close_all_connections", "fault test")
                await sim.wait_sent(total, timeout=60)
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 1, timeout=30)
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 0, timeout=60)
                assert bridge.metric("orangepill_bridge_amqp_connects_total") >= 2
                assert await bridge.finish() == 0
    msgs = await fresh_collect(queue_name, total)
    assert_all_at_least_once(msgs, [e.seq for e in sim.sent])


async def test_broker_stopped_and_started_while_events_arrive(exchange_name: str, tmp_path: Path) -> None:
    """With RabbitMQ stopped, events pile up in the spool and /readyz says why; on return the backlog drains in order."""
    port = free_port()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, simulator(rate=300, count=0) as sim:
        settings = bridge_settings(sim.url, exchange_name, spool=str(tmp_path / "spool.db"), metrics_addr=f"127.0.0.1:{port}")
        queue = await bind_queue(connection, settings, "#")  # type: ignore[arg-type]
        queue_name = queue.name
        async with broker_lock(), running_bridge(settings) as bridge:
            await sim.wait_sent(150, timeout=30)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 1)
            async with broker_stopped():
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 0, timeout=30)
                before = len(sim.sent)
                await sim.wait_sent(before + 600, timeout=30)
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") >= 500, timeout=10)
                status, body = await readyz(port)
                assert status == 503
                assert any("broker" in str(r) for r in body["reasons"])  # type: ignore[attr-defined]
                assert bridge.metric("orangepill_bridge_subscribed", {"realm": "test"}) == 1
                # The link went with CONNECTION_FORCED; /readyz then says why the latest attempt fails.
                for _ in range(50):
                    error = str(body["broker"]["error"])  # type: ignore[index]
                    if error.startswith("broker unreachable at 127.0.0.1:5672: "):
                        break
                    await asyncio.sleep(0.2)
                    status, body = await readyz(port)
                assert error.startswith("broker unreachable at 127.0.0.1:5672: "), body
                assert "CONNECTION_FORCED" not in error, error
            sim.pause()
            sent = [e.seq for e in sim.sent]
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 0, timeout=90)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 1, timeout=10)
            status, _ = await readyz(port)
            assert status == 200
            assert await bridge.finish() == 0
    msgs = await fresh_collect(queue_name, len(sent))
    assert_all_at_least_once(msgs, sent)
    first_copies: list[int] = []
    for seq in seqs(msgs):
        if seq not in first_copies:
            first_copies.append(seq)
    assert first_copies == sorted(first_copies), "the backlog must drain in order of receipt"


async def test_sigkill_with_backlog_then_restart_on_the_same_spool(exchange_name: str, tmp_path: Path) -> None:
    """Killed with SIGKILL while events wait in the spool, the restarted bridge publishes them all."""
    spool = str(tmp_path / "spool.db")
    port = free_port()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, simulator(rate=500, count=0) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(connection, settings, "#")  # type: ignore[arg-type]
        queue_name = queue.name
        async with broker_lock():
            first = BridgeProcess(process_args(sim.url, exchange_name, spool, port))
            try:
                await sim.wait_sent(200, timeout=30)
                async with broker_stopped():
                    await sim.wait_sent(len(sim.sent) + 400, timeout=30)
                    sim.pause()
                    sent_before_kill = [e.seq for e in sim.sent]

                    async def received() -> float:
                        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                            text = await r.text()
                        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                   if line.startswith("orangepill_bridge_events_received_total{"))

                    deadline = time.monotonic() + 20
                    while await received() < len(sent_before_kill) and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert await received() == len(sent_before_kill)
                    await asyncio.sleep(0.3)  # longer than the group-commit interval
                    first.signal(signal.SIGKILL)
                    assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
                    left = await Spool.open(spool)
                    backlog = left.depth
                    await left.close()
                    assert backlog >= 300, "the kill must leave a backlog in the spool"
            finally:
                first.close()
            sim.resume()
            second = BridgeProcess(process_args(sim.url, exchange_name, spool, port))
            try:
                await sim.wait_sent(len(sent_before_kill) + 200, timeout=30)
                sim.pause()
                await asyncio.sleep(0.5)
                second.signal(signal.SIGTERM)
                code = await asyncio.to_thread(second.wait, 30)
                out = second.output()
            finally:
                second.close()
        assert code == 0, out
        sent = [e.seq for e in sim.sent]
    msgs = await fresh_collect(queue_name, len(sent))
    assert_all_at_least_once(msgs, sent)


async def test_sigterm_during_backlog_keeps_unconfirmed_in_spool(exchange_name: str, tmp_path: Path) -> None:
    """SIGTERM while the broker is down exits 0 at once and leaves every unconfirmed event in the spool."""
    spool = str(tmp_path / "spool.db")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, simulator(rate=500, count=0) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(connection, settings, "#")  # type: ignore[arg-type]
        queue_name = queue.name
        async with broker_lock():
            proc = BridgeProcess(process_args(sim.url, exchange_name, spool))
            try:
                await sim.wait_sent(100, timeout=30)
                async with broker_stopped():
                    await sim.wait_sent(len(sim.sent) + 300, timeout=30)
                    proc.signal(signal.SIGTERM)
                    started = time.monotonic()
                    code = await asyncio.to_thread(proc.wait, 30)
                    elapsed = time.monotonic() - started
                    out = proc.output()
                    sim.pause()
                    left = await Spool.open(spool)
                    backlog = left.depth
                    await left.close()
            finally:
                proc.close()
            assert code == 0, out
            assert elapsed < 20
            assert backlog >= 250
            assert "stay in the spool" in out
            sent = [e.seq for e in sim.sent]
            sim.resume()
            again = BridgeProcess(process_args(sim.url, exchange_name, spool))
            try:
                await sim.wait_sent(len(sent) + 50, timeout=30)
                sim.pause()
                await asyncio.sleep(0.5)
                again.signal(signal.SIGTERM)
                assert await asyncio.to_thread(again.wait, 30) == 0, again.output()
            finally:
                again.close()
        sent = [e.seq for e in sim.sent]
    msgs = await fresh_collect(queue_name, len(sent))
    assert_all_at_least_once(msgs, sent)


async def test_spool_full_applies_back_pressure_and_loses_nothing(exchange_name: str, tmp_path: Path) -> None:
    """A full spool stops the stream being read (spool_full=1, /readyz 503) and, once the broker is back, every event sent arrives."""
    port = free_port()
    connection = await aio_pika.connect(AMQP_URL)
    total = 20_000  # far more than the socket buffers between simulator and bridge can hold
    async with connection, simulator(rate=0, count=total) as sim:
        settings = bridge_settings(
            sim.url, exchange_name, spool=str(tmp_path / "spool.db"), spool_max_bytes=64 * 1024,
            metrics_addr=f"127.0.0.1:{port}", idle_timeout=2.0,
        )
        queue = await bind_queue(connection, settings, "#")  # type: ignore[arg-type]
        queue_name = queue.name
        sim.pause()
        async with broker_lock(), running_bridge(settings) as bridge:
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 1)
            async with broker_stopped():
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_amqp_connected") == 0, timeout=30)
                sim.resume()
                assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_full") == 1, timeout=30)

                def received() -> float:
                    return sum(
                        s.value for m in bridge.registry.collect() for s in m.samples
                        if s.name == "orangepill_bridge_events_received_total"
                    )

                read_when_full = received()
                await asyncio.sleep(3.0)  # longer than the idle timeout: a full spool must not look like a dead link
                assert received() == read_when_full < total, "the stream must not be read while the spool is full"
                assert bridge.metric("orangepill_bridge_stream_disconnects_total", {"reason": "silent"}) == 0
                assert bridge.metric("orangepill_bridge_spool_bytes") <= 64 * 1024 + 4096
                status, body = await readyz(port)
                assert status == 503
                assert any("spool full" in str(r) for r in body["reasons"])  # type: ignore[attr-defined]
            await sim.wait_sent(total, timeout=120)
            # Sent is not read: megabytes may still be in the socket buffers, and the spool can be empty
            # for a moment in between (a stop then would leave them unread, upstream of the bridge).
            assert await wait_until(lambda: received() == total, timeout=120)
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_depth") == 0, timeout=120)
            assert bridge.metric("orangepill_bridge_spool_full") == 0
            assert await bridge.finish() == 0
        sent = [e.seq for e in sim.sent]
    msgs = await fresh_collect(queue_name, len(sent))
    assert_all_at_least_once(msgs, sent)
