"""The HTTP endpoints hold up against slow, many and malformed clients, and /readyz shows no user name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.explorer.hub import ExplorerHub
from bridge.http import PROBE_RESERVE, start_http
from tests.helpers import bridge_settings, free_port, running_bridge, simulator


def _ready() -> dict[str, Any]:
    return {"ready": True, "reasons": []}


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[int]:
    port = free_port()
    runner: web.AppRunner = await start_http("127.0.0.1", port, CollectorRegistry(), _ready, **kwargs)
    try:
        yield port
    finally:
        await runner.cleanup()


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout=timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    while data:  # an error answer may come first, then EOF
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return True


async def test_partial_requests_are_closed_within_the_header_timeout() -> None:
    """50 connections that send only part of a request head are all closed within the header timeout."""
    async with serving(header_timeout=1.5) as port:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        start = time.monotonic()
        for _, writer in conns:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
        # The server still answers others meanwhile.
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        # Trickling more partial bytes does not extend the deadline.
        await asyncio.sleep(0.7)
        for _, writer in conns:
            writer.write(b"a")
        results = await asyncio.gather(*(_closed_within(r, 6.0) for r, _ in conns))
        elapsed = time.monotonic() - start
        for _, writer in conns:
            writer.close()
        assert all(results), f"{results.count(False)} of 50 partial requests still open"
        assert elapsed < 8.0


async def test_connections_beyond_the_cap_and_its_reserve_are_refused() -> None:
    """With the cap and the probe reserve full, one more connection gets a 503 and is closed; held ones still work."""
    await _refused_beyond_the_cap()


def test_connections_beyond_the_cap_are_refused_under_uvloop(caplog: pytest.LogCaptureFixture) -> None:
    """Under uvloop (the bridge's default loop) the refusal is the same 503, with no ERROR logged."""
    uvloop = pytest.importorskip("uvloop")
    caplog.set_level(logging.DEBUG)
    uvloop.run(_refused_beyond_the_cap())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _refused_beyond_the_cap() -> None:
    async with serving(max_connections=10, header_timeout=30) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10 + PROBE_RESERVE)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
        assert answer.startswith(b"HTTP/1.1 503")
        writer.close()
        r0, w0 = held[0]
        w0.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = await asyncio.wait_for(r0.read(), timeout=5)
        assert reply.startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()


async def _get_raw(port: int, path: str, *, keep_alive: bool = True) -> tuple[bytes, bool]:
    """One request on a new connection: the answer head and whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    closed = await _closed_within(reader, 2.0)
    writer.close()
    return head, closed


async def test_with_the_cap_full_the_probes_are_still_answered_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections held up to the cap do not fail the liveness probe: beyond the cap, a reserve answers
    /healthz, /readyz and /metrics once per connection and closes it; other paths get 503; a reserve
    connection that sends nothing is closed after PROBE_LIFETIME."""
    monkeypatch.setattr("bridge.http.PROBE_LIFETIME", 1.0)
    async with serving(max_connections=10, header_timeout=30, explorer=ExplorerHub()) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        await asyncio.sleep(0.2)
        for path in ("/healthz", "/readyz", "/metrics"):
            head, closed = await _get_raw(port, path)
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            assert closed, f"{path}: a reserve connection serves one request"
        head, closed = await _get_raw(port, "/")
        assert head.startswith(b"HTTP/1.1 503") and closed, head
        # Below the cap the same page is served on a kept-alive connection.
        r0, w0 = held[0]
        w0.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), timeout=5)).startswith(b"HTTP/1.1 200")
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        assert await _closed_within(silent_reader, 5.0), "a silent reserve connection stays open"
        assert time.monotonic() - start < 3.0
        silent_writer.close()
        for _, w in held:
            w.close()


async def test_long_urls_log_at_most_a_few_warning_lines(caplog: pytest.LogCaptureFixture) -> None:
    """200 requests with a 9 KB URL each get a 4xx and write at most a few one-line warnings, no ERROR, no traceback."""
    caplog.set_level(logging.DEBUG)
    async with serving() as port:
        caplog.clear()
        url = "/" + "a" * 9 * 1024

        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), timeout=10)
            writer.close()
            return data

        answers = [await one() for _ in range(200)]
    assert all(a.split(b" ")[1] in (b"400", b"414") for a in answers), answers[0][:60]
    records = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("aiohttp", "bridge.http"))]
    records = [r for r in records if "listening" not in r.getMessage()]
    assert len(records) <= 3, [r.getMessage() for r in records]
    assert all(r.levelno == logging.WARNING for r in records)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert records, "the first bad request is reported once"


async def test_readyz_shows_host_and_port_never_the_user(exchange_name: str) -> None:
    """With the broker down, /readyz names it as host:port and shows neither the user name nor the password."""
    port = free_port()
    dead = free_port()
    async with simulator(rate=0, count=0, paused=True) as sim:
        settings = bridge_settings(
            sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}",
            amqp_url=f"amqp://orangeuser:Pw-s3cret-x@127.0.0.1:{dead}/",
        )  # fmt: skip
        async with running_bridge(settings), aiohttp.ClientSession() as session:
            body = ""

            async def reason_shown() -> bool:
                nonlocal body
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        body = await resp.text()
                return "broker unreachable" in body

            deadline = time.monotonic() + 15
            while not await reason_shown() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert f"127.0.0.1:{dead}" in body
            assert "orangeuser" not in body
            assert "Pw-s3cret" not in body
