"""Hostile input end to end: the simulator on loopback, the bridge in-process, the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import struct
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.secrets import key_fingerprint
from tests.helpers import KEY, bind_queue, bridge_settings, collect, running_bridge, seqs, simulator, wait_until

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


async def _refusing_server(answer: bytes) -> tuple[asyncio.Server, list[float]]:
    """A TCP server that answers every WebSocket upgrade with ``answer`` and closes; it notes each attempt's time."""
    attempts: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(asyncio.get_running_loop().time())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, attempts


async def _run_against(server: asyncio.Server, exchange_name: str, seconds: float, **overrides: Any) -> None:
    """Run the bridge against ``server`` for ``seconds``, stop it (it must exit 0), then close the server."""
    port = server.sockets[0].getsockname()[1]
    settings = bridge_settings(f"ws://127.0.0.1:{port}", exchange_name, **overrides)
    try:
        async with running_bridge(settings) as bridge:
            await asyncio.sleep(seconds)
            assert await bridge.finish() == 0
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("status", ["429 Too Many Requests", "503 Service Unavailable"])
async def test_a_refused_handshake_with_retry_after_is_redialled_no_sooner(
    exchange_name: str, status: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade answered 429/503 with Retry-After: 2 is redialled after 2 s, not on the (0.05 s) backoff, and the log says why."""
    server, attempts = await _refusing_server(
        f"HTTP/1.1 {status}\r\nRetry-After: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    await _run_against(server, exchange_name, 4.5, reconnect_min=0.05, reconnect_max=0.5)
    # Without Retry-After the 0.05-0.5 s backoff would have made about ten attempts in 4.5 s.
    assert 2 <= len(attempts) <= 3, attempts
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 1.9 for gap in gaps), gaps
    assert "Retry-After 2" in caplog.text and "(the server's Retry-After)" in caplog.text


async def test_a_handshake_answered_without_retry_after_keeps_the_backoff(exchange_name: str) -> None:
    """A 503 without Retry-After (or with a malformed one) is redialled on the usual backoff: several attempts in 2 s."""
    server, attempts = await _refusing_server(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: soon\r\nContent-Length: 0\r\n\r\n"
    )
    await _run_against(server, exchange_name, 2.0, reconnect_min=0.05, reconnect_max=0.2)
    assert len(attempts) >= 5, attempts


async def test_a_connection_dropped_before_the_http_answer_is_named(exchange_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A server that resets the connection instead of answering the upgrade: the log names why, not only "no valid HTTP response"."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = bridge_settings(f"ws://127.0.0.1:{port}", exchange_name, reconnect_min=0.2, reconnect_max=0.5)
    try:
        async with running_bridge(settings) as bridge:
            said = re.compile(r"did not receive a valid HTTP response \((EOFError|ConnectionResetError)")
            assert await wait_until(lambda: said.search(caplog.text) is not None, timeout=5), caplog.text[-2000:]
            assert await bridge.finish() == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_echoes_the_realm_key_never_hands_it_to_consumers(
    amqp: AbstractRobustConnection, exchange_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """data = the realm key: the consumer gets the event, its body holding the key's fingerprint; one WARNING says why."""
    async with simulator(paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            await sim.wait_subscribed(1)
            sent = [await sim.send_event("deposit.received", KEY), await sim.send_event("deposit.received", "d-2")]
            got = await collect(queue, 2, timeout=20, settle=0.3)
            assert await bridge.finish() == 0
    assert seqs(got) == [e.seq for e in sent]
    echoed, plain = (orjson.loads(m.body) for m in got)
    assert echoed["data"] == f"<realm-key {key_fingerprint(KEY)}>" and plain["data"] == "d-2"
    assert all(KEY.encode() not in m.body for m in got) and "entity_id" not in got[0].headers
    assert caplog.text.count("carried the realm key in its body") == 1
    assert KEY not in caplog.text


async def test_a_stop_while_the_handshake_hangs_does_not_wait_for_it(exchange_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts TCP and never answers the upgrade: SIGTERM's stop ends the dial at once and says so."""
    caplog.set_level(logging.INFO, logger="bridge.stream")
    held: list[asyncio.StreamWriter] = []

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = bridge_settings(f"ws://127.0.0.1:{port}", exchange_name, subscribe_timeout=20.0)
    try:
        async with running_bridge(settings) as bridge:
            assert await wait_until(lambda: bool(held), timeout=5)
            await asyncio.sleep(0.3)
            started = asyncio.get_running_loop().time()
            assert await bridge.finish() == 0
            took = asyncio.get_running_loop().time() - started
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert took < 2.0, took  # the stream's stop grace (5 s) and the 20 s dial were not waited out
    assert "stopped while connecting" in caplog.text
