"""The HTTP endpoints hold up against slow, many and malformed clients, and /readyz shows no user name."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.explorer.hub import ExplorerHub
from bridge.http import start_http
from tests.helpers import bridge_settings, free_port, running_bridge, simulator, wait_until


def _ready() -> dict[str, Any]:
    return {"ready": True, "reasons": []}


@contextlib.asynccontextmanager
async def serving_runner(**kwargs: Any) -> AsyncIterator[tuple[int, web.AppRunner]]:
    port = free_port()
    runner: web.AppRunner = await start_http("127.0.0.1", port, CollectorRegistry(), _ready, **kwargs)
    try:
        yield port, runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[int]:
    async with serving_runner(**kwargs) as (port, _):
        yield port


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


class _IdleFlood:
    """``n`` connections that send nothing (every other one part of a request head), each closed one opened anew
    ``reopen_after`` seconds later: from a thread of their own, with blocking sockets, like a client elsewhere.

    At the cap a new connection closes the oldest idle one, so each of these comes back after its delay: about
    ``n / reopen_after`` new connections a second, spread out as they were closed."""

    def __init__(self, port: int, n: int, reopen_after: float = 0.2) -> None:
        self.port, self.n, self.reopen_after = port, n, reopen_after
        self.opened = 0
        self._closed: collections.deque[float] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)

    def __enter__(self) -> _IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self, sel: selectors.BaseSelector) -> bool:
        sock = socket.socket()
        sock.settimeout(1.0)
        try:
            sock.connect(("127.0.0.1", self.port))
            if self.opened % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        self.opened += 1
        return True

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for _ in range(self.n):
                if not self._open(sel):
                    self._closed.append(time.monotonic())
            while not self._stop.is_set():
                while self._closed and time.monotonic() - self._closed[0] >= self.reopen_after:
                    self._closed.popleft()
                    if not self._open(sel):
                        self._closed.append(time.monotonic())
                for key, _ in sel.select(0.01):
                    conn: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # closed by the server (a 503 may come first)
                        sel.unregister(conn)
                        conn.close()
                        self._closed.append(time.monotonic())
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]


async def _probe(port: int, path: str = "/healthz") -> bytes:
    """One request as a liveness probe makes it: a new connection, closed after the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), timeout=5)
    except (ConnectionError, TimeoutError) as exc:
        return repr(exc).encode()
    finally:
        writer.close()


def _site(runner: web.AppRunner) -> Any:
    (site,) = runner.sites
    return site


async def test_a_flood_of_idle_connections_does_not_fail_the_liveness_probe() -> None:
    """With 8 times the cap in idle connections held and re-opened (nothing sent, or part of a head), /healthz
    answers 200 every time: a new connection takes the place of the oldest idle one."""
    await _probes_through_an_idle_flood()


def test_a_flood_of_idle_connections_does_not_fail_the_liveness_probe_under_uvloop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same under uvloop (the bridge's default loop), with no ERROR logged."""
    uvloop = pytest.importorskip("uvloop")
    caplog.set_level(logging.DEBUG)
    uvloop.run(_probes_through_an_idle_flood())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _probes_through_an_idle_flood() -> None:
    async with serving_runner(max_connections=8, header_timeout=30) as (port, runner):
        with _IdleFlood(port, 64) as flood:
            assert await wait_until(lambda: flood.opened >= 64 + 64, 10), "the flood's connections are not closed"
            answers = []
            for _ in range(20):
                answers.append(await _probe(port))
                await asyncio.sleep(0.05)
        ok = sum(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert ok == 20, f"{ok} of 20 probes answered 200: {[a[:24] for a in answers]}"
        assert _site(runner).evicted > 64


async def _open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /explorer/events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def _events_within(reader: asyncio.StreamReader, timeout: float) -> list[bytes]:
    """The SSE event lines that arrive within ``timeout`` (the stream says ``status`` every second)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            line = await asyncio.wait_for(reader.readline(), timeout=left)
            if not line:
                got.append(b"EOF")
                break
            if line.startswith(b"event: "):
                got.append(line.strip())
    return got


async def test_a_connection_with_a_request_in_progress_is_never_evicted() -> None:
    """Explorer streams (a request in its handler for as long as the page is open) keep streaming through an idle
    flood that takes every other place of the cap, again and again."""
    async with serving_runner(max_connections=4, header_timeout=30, explorer=ExplorerHub()) as (port, runner):
        streams = [await _open_stream(port) for _ in range(2)]
        for reader, _ in streams:
            assert await _events_within(reader, 0.5)  # hello
        with _IdleFlood(port, 32) as flood:
            assert await wait_until(lambda: flood.opened > 100, 10), "the flood's connections are not closed"
            during = await asyncio.gather(*(_events_within(reader, 2.5) for reader, _ in streams))
            probes = [await _probe(port) for _ in range(5)]
        assert all(b"EOF" not in events and b"event: status" in events for events in during), during
        assert all(p.startswith(b"HTTP/1.1 200") for p in probes), probes
        assert _site(runner).evicted > 100
        for _, writer in streams:
            writer.close()


async def test_with_the_cap_busy_and_no_reserve_left_a_connection_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every place of the cap busy (Explorer streams) and no reserve left, one more connection gets a 503 and
    is closed; the streams go on."""
    await _refused_beyond_the_cap(monkeypatch)


def test_connections_beyond_the_cap_are_refused_under_uvloop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under uvloop (the bridge's default loop) the refusal is the same 503, with no ERROR logged."""
    uvloop = pytest.importorskip("uvloop")
    caplog.set_level(logging.DEBUG)
    uvloop.run(_refused_beyond_the_cap(monkeypatch))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _refused_beyond_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reserve answers a probe at once and closes: its places are never busy for long, so none is left here.
    monkeypatch.setattr("bridge.http.PROBE_RESERVE", 0)
    async with serving_runner(max_connections=4, header_timeout=30, explorer=ExplorerHub()) as (port, runner):
        streams = [await _open_stream(port) for _ in range(4)]
        answer = await _probe(port)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert _site(runner).refused == 1
        events = await _events_within(streams[0][0], 1.5)
        assert b"EOF" not in events and b"event: status" in events, events
        for _, w in streams:
            w.close()


async def _get_raw(port: int, path: str, *, keep_alive: bool = True) -> tuple[bytes, bool]:
    """One request on a new connection: the answer head and whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    closed = await _closed_within(reader, 2.0)
    writer.close()
    return head, closed


async def test_with_the_cap_busy_the_probes_are_still_answered_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections busy up to the cap (Explorer streams: nothing idle to evict) do not fail the liveness probe:
    beyond the cap, a reserve answers /healthz, /readyz and /metrics once per connection and closes it; other
    paths get 503; a reserve connection that sends nothing is closed after PROBE_LIFETIME."""
    monkeypatch.setattr("bridge.http.PROBE_LIFETIME", 1.0)
    async with serving_runner(max_connections=4, header_timeout=30, explorer=ExplorerHub()) as (port, runner):
        streams = [await _open_stream(port) for _ in range(4)]
        for path in ("/healthz", "/readyz", "/metrics"):
            head, closed = await _get_raw(port, path)
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            assert closed, f"{path}: a reserve connection serves one request"
        head, closed = await _get_raw(port, "/")
        assert head.startswith(b"HTTP/1.1 503") and closed, head
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        assert await _closed_within(silent_reader, 5.0), "a silent reserve connection stays open"
        assert time.monotonic() - start < 3.0
        silent_writer.close()
        assert _site(runner).evicted == 0
        # Below the cap the same page is served on a kept-alive connection.
        streams.pop()[1].close()
        server = runner.server
        assert server is not None
        assert await wait_until(lambda: len(server.connections) < 4, 5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)).startswith(b"HTTP/1.1 200")
        assert not await _closed_within(reader, 0.5)
        writer.close()
        for _, w in streams:
            w.close()


async def test_a_body_that_never_comes_is_not_waited_for() -> None:
    """No endpoint reads a body: a request whose body is announced and never sent is answered and its connection
    closed at once, not read on for aiohttp's 10 s of lingering (in which it could not be evicted for room)."""
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 405"), head
        assert await _closed_within(reader, 1.0)
        writer.close()


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
