"""The simulator's HTTP control API, in-process and with the simulator as its own process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from bridge.errors import ProtocolError
from bridge.secrets import key_fingerprint
from bridge.simulator import Simulator, SimulatorConfig
from bridge.wire import parse_frame, subscribe_frame

KEY = "control-realm-key-42"
ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def controlled(**settings: Any) -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    settings.setdefault("realm_keys", (KEY,))
    config = SimulatorConfig(port=0, control_addr="127.0.0.1:0", **settings)
    async with Simulator(config) as sim, aiohttp.ClientSession(str(sim.control_url)) as http:
        yield sim, http


@asynccontextmanager
async def client(url: str) -> AsyncIterator[ClientConnection]:
    async with connect(url, ping_interval=None, close_timeout=0.5, max_queue=None) as ws:
        yield ws


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        return orjson.loads(await ws.recv())


async def read_until_closed(ws: ClientConnection) -> ConnectionClosed:
    """Read and discard frames until the connection closes; return how it closed."""
    while True:
        try:
            async with asyncio.timeout(10):
                await ws.recv()
        except ConnectionClosed as closed:
            return closed


async def post(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.post(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def stats(http: aiohttp.ClientSession) -> Any:
    async with http.get("/stats") as response:
        assert response.status == 200
        return await response.json()


async def test_stats_report_connections_subscribes_and_last_seq_per_realm() -> None:
    """GET /stats shows open connections, subscribes, total sent and each realm's last seq, by fingerprint only."""
    async with controlled(rate=0, count=20) as (sim, http), client(sim.url) as ws:
        await ws.send(subscribe_frame(KEY))
        await sim.wait_sent(20)
        body = await stats(http)
    assert body["open_connections"] == 1
    assert body["subscribes"] == 1
    assert body["sent_total"] == 20
    assert body["realms"] == {key_fingerprint(KEY): {"last_seq": 20}}
    assert KEY not in orjson.dumps(body).decode()


async def test_control_api_listens_on_loopback_when_no_host_is_given() -> None:
    """control_addr ':0' binds 127.0.0.1."""
    async with Simulator(SimulatorConfig(port=0, control_addr=":0")) as sim:
        assert str(sim.control_url).startswith("http://127.0.0.1:")


async def test_pause_and_resume_hold_back_and_restart_events() -> None:
    """POST /pause stops generated events, POST /resume restarts them."""
    async with controlled(rate=200) as (sim, http), client(sim.url) as ws:
        await ws.send(subscribe_frame(KEY))
        await sim.wait_sent(3)
        assert await post(http, "/pause") == {"paused": True}
        await asyncio.sleep(0.1)
        held = sim.sent_total
        await asyncio.sleep(0.3)
        assert sim.sent_total == held
        await post(http, "/resume")
        await sim.wait_sent(held + 3)


async def test_malformed_sends_n_frames_the_bridge_refuses() -> None:
    """POST /malformed?n=6 sends six frames that the bridge's parser refuses, and no seq is used."""
    async with controlled() as (sim, http), client(sim.url) as ws:
        sim.pause()
        await ws.send(subscribe_frame(KEY))
        await recv_json(ws)
        await recv_json(ws)
        assert await post(http, "/malformed?n=6") == {"sent": 6}
        for _ in range(6):
            async with asyncio.timeout(5):
                frame = await ws.recv()
            assert isinstance(frame, str)
            with pytest.raises(ProtocolError):
                parse_frame(frame)
        assert (await stats(http))["malformed_total"] == 6
        assert sim.sent_total == 0


async def test_reject_refuses_the_next_n_subscribes_with_the_text_given() -> None:
    """POST /reject?n=2&text=... answers two good subscribes with info NONE + that error, then accepts again."""
    async with controlled(ack="subscribe") as (sim, http), client(sim.url) as ws:
        sim.pause()
        await post(http, "/reject?n=2&text=Realm%20suspended")
        for _ in range(2):
            await ws.send(subscribe_frame(KEY))
            info, error = await recv_json(ws), await recv_json(ws)
            assert (info["type"], info["realm"]) == ("info", "NONE")
            assert (error["type"], error["realm"]) == ("error", "Realm suspended")
        await ws.send(subscribe_frame(KEY))
        assert (await recv_json(ws))["type"] == "subscribe"
        assert (sim.rejected, sim.subscribes) == (2, 1)


async def test_reject_of_kind_error_sends_only_a_service_error() -> None:
    """kind=error answers with just an error frame 'Service temporarily unavailable', without info NONE."""
    async with controlled(ack="subscribe", pong=True) as (sim, http), client(sim.url) as ws:
        sim.pause()
        await post(http, "/reject?n=1&kind=error")
        await ws.send(subscribe_frame(KEY))
        error = await recv_json(ws)
        assert (error["type"], error["realm"]) == ("error", "Service temporarily unavailable")
        await ws.send("PING")
        async with asyncio.timeout(5):
            assert await ws.recv() == "PONG"


async def test_drop_closes_every_connection_cleanly() -> None:
    """POST /drop closes each connection with code 1001 after what was already sent."""
    async with controlled(rate=0) as (sim, http), client(sim.url) as ws:
        await ws.send(subscribe_frame(KEY))
        await sim.wait_sent(10)
        assert await post(http, "/drop") == {"dropped": 1}
        closed = await read_until_closed(ws)
        assert isinstance(closed, ConnectionClosedOK)
        assert closed.rcvd is not None and closed.rcvd.code == 1001


async def test_silent_makes_open_links_dead_but_open() -> None:
    """POST /silent leaves the connection open but answering no WebSocket ping."""
    async with controlled(rate=50) as (sim, http), client(sim.url) as ws:
        await ws.send(subscribe_frame(KEY))
        await sim.wait_sent(2)
        await asyncio.wait_for(await ws.ping(), 5)
        assert await post(http, "/silent") == {"silenced": 1}
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)


@pytest.mark.parametrize("path", ["/malformed?n=lots", "/malformed?kind=odd", "/reject?n=-1", "/reject?kind=maybe"])
async def test_bad_requests_are_refused_with_400(path: str) -> None:
    """Bad parameters get 400 and change nothing."""
    async with controlled() as (sim, http), http.post(path) as response:
        assert response.status == 400
        assert sim.rejected == 0 and sim.malformed_total == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_simulate_command_serves_the_control_api_to_another_process() -> None:
    """`simulate --control-addr` lets another process read stats and drop links of a simulator subprocess."""
    port, control = _free_port(), _free_port()
    args = [
        "simulate",
        "--port",
        str(port),
        "--realm-key",
        KEY,
        "--rate",
        "0",
        "--control-addr",
        f"127.0.0.1:{control}",
    ]
    env = {**os.environ, "BRIDGE_LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "bridge", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{control}") as http:
            for _ in range(200):
                try:
                    body = await stats(http)
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the simulator's control API never came up")
            assert body["sent_total"] == 0
            async with client(f"ws://127.0.0.1:{port}") as ws:
                await ws.send(subscribe_frame(KEY))
                await recv_json(ws)
                await recv_json(ws)
                await recv_json(ws)  # a first notification
                assert (await stats(http))["subscribes"] == 1
                await post(http, "/drop")
                closed = await read_until_closed(ws)
                assert closed.rcvd is not None and closed.rcvd.code == 1001
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert KEY.encode() not in err
