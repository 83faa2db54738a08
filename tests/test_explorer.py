"""The Explorer page: the hub's bounded memory, its server-sent events, a slow browser, and a real headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from bridge.app import Bridge
from bridge.catalog import CATALOG
from bridge.config import Settings
from bridge.explorer.hub import ExplorerHub
from bridge.http import log as http_log
from bridge.http import start_http
from bridge.logs import RateLimitedWarning
from bridge.metrics import Metrics
from bridge.spool import Spool
from tests.helpers import KEY, ROOT, bridge_settings, free_port, simulator, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FAILED_DOCUMENTED = {s.name for s in CATALOG if s.name.count(".") == 1 and s.name.endswith(".failed")}


# -- the hub, pure --


def test_record_fills_each_client_up_to_its_bound_and_counts_drops() -> None:
    """A client that does not take its rows keeps only the newest ``client_buffer`` rows; the rest are counted as dropped."""
    hub = ExplorerHub(client_buffer=10, recent=5)
    fast, slow = hub.subscribe(), hub.subscribe()
    assert fast is not None and slow is not None
    for i in range(25):
        hub.record(1000.0 + i / 100, "transaction.done", f"e{i}", "test", f"m{i}")
        if i % 5 == 4:
            assert len(fast.take()) == 5
    assert len(slow.buffer) == 10
    assert [r[2] for r in slow.take()] == [f"e{i}" for i in range(15, 25)]
    assert slow.dropped == 15 and fast.dropped == 0
    assert hub.recorded == 25
    assert [r[2] for r in hub.recent()] == [f"e{i}" for i in range(20, 25)]


def test_max_clients_and_unsubscribe() -> None:
    """Beyond max_clients no buffer is handed out; a client that leaves frees its place."""
    hub = ExplorerHub(max_clients=2)
    a, b = hub.subscribe(), hub.subscribe()
    assert a is not None and b is not None and hub.subscribe() is None
    hub.unsubscribe(a)
    assert hub.subscribe() is not None


def test_rates_per_second_with_gaps() -> None:
    """Events are counted per second; seconds without events are zeros."""
    now = [100.0]
    hub = ExplorerHub(clock=lambda: now[0])
    for t in (100.1, 100.2, 100.9, 103.5):
        hub.record(t, "x", "", "r", "m")
    now[0] = 104.2
    assert hub.rates() == [(100, 3), (101, 0), (102, 0), (103, 1)]
    assert hub.rate(window=4) == 1.0


def test_status_shows_leader_without_ha_and_no_secret() -> None:
    """Realms are listed with connection, subscription and role 'leader' when there is no HA information."""
    state = {
        "ready": False,
        "reasons": ["broker not connected"],
        "stream": {"connected": {"test": True}, "subscribed": {"test": True}},
        "broker": {"connected": False, "error": "broker unreachable at 127.0.0.1:5672"},
        "spool": {"depth": 7, "full": False},
    }
    status = ExplorerHub(lambda: state).status()
    assert status["realms"] == [{"label": "test", "connected": True, "subscribed": True, "role": "leader"}]
    assert status["spool"]["depth"] == 7 and status["broker"]["connected"] is False
    with_ha = ExplorerHub(lambda: {**state, "stream": {**state["stream"], "roles": {"test": "standby"}}}).status()
    assert with_ha["realms"][0]["role"] == "standby"


def test_long_entity_ids_are_cut() -> None:
    """An entity id from upstream is bounded in memory."""
    hub = ExplorerHub()
    hub.record(1.0, "x", "e" * 10_000, "r", "m")
    assert len(hub.recent()[0][2]) <= 96


# -- the bridge with the page --


@contextlib.asynccontextmanager
async def bridge_with_page(settings: Settings, client_buffer: int | None = None) -> AsyncIterator[Bridge]:
    """A Bridge object running in this loop, so the test can look at its hub."""
    metrics = Metrics(CollectorRegistry())
    spool = await Spool.open(settings.spool, max_bytes=settings.spool_max_bytes)
    bridge = Bridge(settings, metrics, spool)
    if client_buffer is not None and bridge.explorer is not None:
        bridge.explorer.client_buffer = client_buffer
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    hostport = settings.metrics_host_port
    if hostport is not None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection(*hostport)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
    try:
        yield bridge
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=30) == 0


def _published(bridge: Bridge) -> float:
    total = 0.0
    for metric in bridge.metrics.registry.collect():
        if metric.name == "orangepill_bridge_events_published":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def read_sse(resp: aiohttp.ClientResponse, want: int, timeout: float) -> list[tuple[str, Any]]:
    """Read server-sent events until ``want`` rows arrived."""
    got: list[tuple[str, Any]] = []
    rows = 0
    kind = ""
    deadline = time.monotonic() + timeout
    while rows < want and time.monotonic() < deadline:
        line = (await asyncio.wait_for(resp.content.readline(), timeout=deadline - time.monotonic())).decode()
        if line.startswith("event: "):
            kind = line[7:].strip()
        elif line.startswith("data: "):
            data = orjson.loads(line[6:])
            got.append((kind, data))
            if kind == "rows":
                rows += len(data["rows"])
    return got


@pytest.mark.broker
async def test_sse_stream_shows_status_and_events(exchange_name: str) -> None:
    """/explorer/events starts with a snapshot (realm subscribed) and then streams each accepted event."""
    port = free_port()
    async with simulator(rate=50) as sim:
        settings = bridge_settings(sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}")
        async with bridge_with_page(settings), aiohttp.ClientSession() as session:
            await sim.wait_subscribed(1)
            async with session.get(f"http://127.0.0.1:{port}/explorer/events") as resp:
                assert resp.headers["Content-Type"] == "text/event-stream"
                got = await read_sse(resp, 20, timeout=20)
            async with session.get(f"http://127.0.0.1:{port}/") as page:
                html = await page.text()
                assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            async with session.get(f"http://127.0.0.1:{port}/explorer/app.js") as js:
                assert js.status == 200 and "EventSource" in await js.text()
    kinds = [k for k, _ in got]
    assert kinds[0] == "hello"
    rows = [r for k, d in got if k == "rows" for r in d["rows"]]
    assert len(rows) >= 20
    sent = {(e.event, e.data) for e in sim.sent}
    assert all((r[1], r[2]) in sent for r in rows)
    assert all(r[3] == "test" for r in rows)
    assert "<h1>Event Stream Explorer</h1>" in html
    assert KEY not in html


async def test_explorer_off_serves_no_page(exchange_name: str) -> None:
    """With --explorer off, / is 404 while /metrics still answers."""
    port = free_port()
    async with simulator(rate=0, paused=True) as sim:
        settings = bridge_settings(sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}", explorer="off")
        async with bridge_with_page(settings) as bridge, aiohttp.ClientSession() as session:
            assert bridge.explorer is None
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 404
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200


async def _publish_run(exchange: str, n: int, slow_client: bool) -> tuple[float, float, Bridge, int]:
    """Send ``n`` events as fast as possible; return (events/s, published, bridge, rows dropped for clients)."""
    port = free_port()
    async with simulator(rate=0, count=n, paused=True) as sim:
        settings = bridge_settings(sim.url, exchange, metrics_addr=f"127.0.0.1:{port}")
        async with bridge_with_page(settings, client_buffer=100) as bridge:
            await sim.wait_subscribed(1)
            sock: socket.socket | None = None
            if slow_client:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small window; never read
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /explorer/events HTTP/1.1\r\nHost: x\r\n\r\n")
                assert bridge.explorer is not None
                assert await wait_until(lambda: bridge.explorer is not None and bridge.explorer.clients == 1, 10)
            start = time.monotonic()
            sim.resume()
            assert await wait_until(lambda: _published(bridge) >= n, timeout=120, interval=0.01)
            elapsed = time.monotonic() - start
            published = _published(bridge)
            dropped = bridge.explorer.dropped if bridge.explorer is not None else 0
            if sock is not None:
                sock.close()
    return n / elapsed, published, bridge, dropped


@pytest.mark.broker
@pytest.mark.slow
async def test_a_browser_that_never_reads_does_not_slow_publishing(exchange_name: str) -> None:
    """With an SSE client that never reads, every event is still published and that client loses rows, not the bridge."""
    n = 20_000
    rate_alone, published_alone, _, dropped_alone = await _publish_run(exchange_name, n, slow_client=False)
    rate_slow, published_slow, bridge, dropped_slow = await _publish_run(exchange_name, n, slow_client=True)
    print(f"events/s without a slow client {rate_alone:.0f}, with one {rate_slow:.0f}; rows dropped {dropped_slow}")
    assert published_alone == n and published_slow == n
    assert dropped_alone == 0
    assert dropped_slow > 0  # the never-reading client's buffer overflowed: it lost rows
    assert bridge.explorer is not None and bridge.explorer.recorded == n


_TCP_ESTABLISHED = 1


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (Linux ``tcp_info.tcpi_state``: 1 established, 7 closed, 8 close-wait)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


async def test_a_browser_that_stops_reading_is_disconnected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An Explorer client that never reads is cut off once a write has been blocked for ``_SSE_WRITE_TIMEOUT``:
    its connection and file descriptor are released at once (the unsent megabytes dropped, the client reset),
    not held until the client leaves; nothing is logged as an error."""
    monkeypatch.setattr("bridge.http._SSE_WRITE_TIMEOUT", 0.5)
    monkeypatch.setattr("bridge.http._EXPLORER_WARN", RateLimitedWarning(http_log, 60.0))  # a fresh one-a-minute limiter
    caplog.set_level(logging.DEBUG)
    await _stalled_reader_is_disconnected()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # The operator is told, once: a page stopped reading and was reset.
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stopped reading" in r.getMessage()]
    assert said == ["explorer: a page stopped reading for 0.5 s; its connection was reset"], said


def test_a_browser_that_stops_reading_is_disconnected_under_uvloop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same under uvloop, the bridge's default loop."""
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr("bridge.http._SSE_WRITE_TIMEOUT", 0.5)
    caplog.set_level(logging.DEBUG)
    uvloop.run(_stalled_reader_is_disconnected())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _stalled_reader_is_disconnected() -> None:
    hub = ExplorerHub(client_buffer=5000)
    port = free_port()
    runner = await start_http("127.0.0.1", port, CollectorRegistry(), lambda: {"ready": True}, explorer=hub)
    server = runner.server
    assert server is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, and never read
    stop = asyncio.Event()

    async def feed() -> None:  # ~1 MB of rows a frame: the kernel's buffers are full within a second or two
        i = 0
        while not stop.is_set():
            for _ in range(5000):
                hub.record(time.time(), "transaction.done", f"{i:096d}", "test", f"m{i}")
                i += 1
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        sock.send(b"GET /explorer/events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await wait_until(lambda: hub.clients == 1, 5)
        assert await wait_until(lambda: not server.connections, 15), "the stalled connection is still held"
        assert await wait_until(lambda: _tcp_state(sock) != _TCP_ESTABLISHED, 5), "the client was not disconnected"
        assert hub.clients == 0
    finally:
        stop.set()
        await feeder
        sock.close()
        await runner.cleanup()


# -- the real browser --


def _chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (Debian package chromium; .ci/run installs it)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e .[dev])"
    return None


@pytest.mark.broker
@pytest.mark.slow
async def test_explorer_page_in_headless_chromium(exchange_name: str, tmp_path: Path) -> None:
    """The page shows the realm subscribed, new events within 2 s, filters by pattern and lists documented matches."""
    missing = _chromium_missing()
    if missing:
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    port = free_port()
    async with simulator(rate=8, shape="mixed") as sim:
        settings = replace(bridge_settings(sim.url, exchange_name, metrics_addr=f"127.0.0.1:{port}"), spool="memory")
        async with bridge_with_page(settings), async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1200, "height": 1100})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"http://127.0.0.1:{port}/")
                await page.wait_for_selector(
                    '#realms tr[data-realm="test"] td[data-subscription="subscribed"]', timeout=15_000
                )
                await page.wait_for_selector("#live.ok", timeout=10_000)

                # A chosen event appears in the list within 2 s of being sent.
                for i in range(3):
                    entity = f"probe-{i}-{time.time_ns()}"
                    await sim.send_event("transaction.done", entity)
                    sent_at = time.monotonic()
                    await page.wait_for_function(
                        "(e) => [...document.querySelectorAll('#events td')].some((td) => td.textContent === e)",
                        arg=entity, timeout=5_000,
                    )  # fmt: skip
                    assert time.monotonic() - sent_at < 2.0
                entities = await page.eval_on_selector_all(
                    "#events tr", "(rows) => rows.map((r) => r.children[2].textContent)"
                )
                probes = [e.split("-")[1] for e in entities if e.startswith("probe-")]
                assert probes == ["2", "1", "0"]  # newest on top

                # Filtering by a binding pattern leaves only matching events.
                await page.fill("#filter", "transaction.#")
                await page.wait_for_timeout(1500)  # more events arrive meanwhile, filtered too
                names = await page.eval_on_selector_all("#events tr", "(rows) => rows.map((r) => r.dataset.event)")
                assert names and all(n.startswith("transaction.") for n in names), names

                # Pausing holds new rows back.
                await page.click("#pause")
                before = await page.eval_on_selector_all("#events tr", "(rows) => rows.length")
                await sim.send_event("transaction.failed", "held-back")
                await page.wait_for_timeout(700)
                assert "held-back" not in await page.inner_text("#events")
                assert await page.eval_on_selector_all("#events tr", "(rows) => rows.length") == before
                # Keyboard use: Tab from the filter box reaches the button, Enter resumes.
                await page.focus("#filter")
                await page.keyboard.press("Tab")
                assert await page.evaluate("() => document.activeElement.id") == "pause"
                await page.keyboard.press("Enter")
                await page.wait_for_function(
                    "() => document.querySelector('#events').textContent.includes('held-back')"
                )

                # The pattern panel lists the documented events a pattern catches.
                await page.fill("#pattern", "*.failed")
                await page.wait_for_timeout(200)
                listed = await page.eval_on_selector_all(
                    "#pattern-matches li", "(li) => li.map((x) => x.dataset.event)"
                )
                assert set(listed) == FAILED_DOCUMENTED

                await page.fill("#filter", "")
                await page.wait_for_timeout(1500)
                await page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
                assert (tmp_path / "explorer.png").stat().st_size > 10_000
                if os.environ.get("EXPLORER_SCREENSHOT_DOCS") == "1":
                    shutil.copy(tmp_path / "explorer.png", ROOT / "docs" / "explorer.png")
                content = await page.content()
                assert KEY not in content
                assert not errors, errors
            finally:
                await browser.close()
