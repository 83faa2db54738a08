"""Hostile input end to end: the simulator on loopback, the bridge in-process, the real RabbitMQ."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.helpers import bind_queue, bridge_settings, collect, running_bridge, seqs, simulator, wait_until

pytestmark = pytest.mark.broker

REJECTED = "orangepill_bridge_events_rejected_total"


async def _a_refused_frame_is_counted_and_the_stream_goes_on(
    amqp: AbstractRobustConnection, exchange_name: str, bad: str | bytes, reason: str, **overrides: object
) -> None:
    """The client refuses ``bad`` and fails the link: counted under ``reason``, redialled, the events around it kept."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, **overrides)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            before = await sim.send_event("a.before", "id-1")
            await sim.send_raw(bad)
            assert await wait_until(lambda: bridge.metric(REJECTED, {"reason": reason}) == 1, timeout=20)
            assert await wait_until(lambda: sim.subscribes >= 2, timeout=20), "the bridge did not resubscribe"
            after = await sim.send_event("a.after", "id-2")
            got = await collect(queue, 2, timeout=20, settle=0.5)
            assert await bridge.finish() == 0
    assert seqs(got) == [before.seq, after.seq]
    assert [m.routing_key for m in got] == ["a.before", "a.after"]


async def test_oversize_frame_is_refused_by_the_client_counted_and_the_stream_goes_on(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An 80,025-byte frame with --max-frame-bytes 65536 is never read: counted as oversize, logged, reconnected."""
    big = '{"type":"notification","event":"a.big","data":"' + "\u00e9" * 39_988 + '"}'
    assert len(big.encode()) == 80_025
    await _a_refused_frame_is_counted_and_the_stream_goes_on(amqp, exchange_name, big, "oversize", max_frame_bytes=65_536)
    assert any("above the limit of 65536 bytes" in r.getMessage() for r in caplog.records)


async def test_a_text_frame_of_broken_utf8_is_counted_and_named_and_the_stream_goes_on(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A text frame that is not UTF-8 fails the link (RFC 6455, 1007): counted as invalid_utf8, said, reconnected."""
    bad = b'{"type":"notification","event":"a.bad","data":"\xff\xfe"}'
    await _a_refused_frame_is_counted_and_the_stream_goes_on(amqp, exchange_name, bad, "invalid_utf8")
    said = caplog.text
    assert "not valid UTF-8" in said and "(1007)" in said
    assert "the bridge closed the connection (code 1007" in said  # not "lost without a close frame"


async def test_service_error_answer_to_subscribe_is_retried(amqp: AbstractRobustConnection, exchange_name: str) -> None:
    """An error frame that does not name the key ("Service temporarily unavailable") is retried, not fatal."""
    async with simulator(paused=True) as sim:
        sim.reject_next(3, key_error=False)
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            assert await wait_until(lambda: sim.subscribes >= 1, timeout=30)
            assert not bridge.task.done()
            sent = await sim.send_event("a.b", "id-1")
            (msg,) = await collect(queue, 1, timeout=20)
            assert await bridge.finish() == 0
        assert sim.rejected == 3
    assert orjson.loads(msg.body)["seq"] == sent.seq
    assert bridge.metric("orangepill_bridge_stream_disconnects_total", {"reason": "error"}) >= 3


async def test_error_frames_are_all_counted_but_logged_at_most_once_a_second(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 error frames after subscribing: the counter says 2,000, the log holds about one line a second."""
    caplog.set_level(logging.WARNING, logger="bridge.stream")
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(2_000):
                await sim.send_raw('{"type":"error","realm":"Service temporarily unavailable"}')
            assert await wait_until(
                lambda: bridge.metric("orangepill_bridge_stream_error_frames_total") == 2_000, timeout=30
            )
            elapsed = loop.time() - started
            assert await bridge.finish() == 0
    lines = [r for r in caplog.records if "stream error frame" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed + 2
