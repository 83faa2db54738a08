"""The processes of the benchmark other than the bridge: consumer, simulator, ceiling and naive publishers.

Each runs in its own process (multiprocessing, ``spawn``) so that it never shares
an event loop, or a GIL, with the process being measured. They talk to the
orchestrator over a ``multiprocessing.Pipe``: the worker sends dicts (``ready``,
``done`` …) and reads commands (``go``, ``stop``) without blocking its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import orjson

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

# Event names the ceiling publisher cycles through (same routing-key shapes as the simulator's).
EVENT_NAMES = (
    "account.created",
    "account.incoming",
    "deposit.created",
    "deposit.done",
    "transaction.created",
    "transaction.done",
    "withdrawal.created",
    "user.identity.verified",
)


def _run(main: Any, *args: Any, uvloop_on: bool = True) -> None:
    if uvloop_on:
        import uvloop

        uvloop.run(main(*args))
    else:
        asyncio.run(main(*args))


class _Commands:
    """Commands from the orchestrator, read from the pipe by the loop's reader callback."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self.extra: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                cmd = msg.get("cmd")
                if cmd == "go":
                    self.go.set()
                elif cmd == "stop":
                    self.stop.set()
                else:
                    self.extra.put_nowait(msg)
        except (EOFError, OSError):
            self.stop.set()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.conn.fileno())

    def send(self, **msg: Any) -> None:
        self.conn.send(msg)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    values.sort()
    n = len(values)

    def pick(q: float) -> float:
        return values[min(n - 1, max(0, int(q * n + 0.5) - 1))] * 1000.0

    return {
        "p50_ms": round(pick(0.50), 3),
        "p99_ms": round(pick(0.99), 3),
        "max_ms": round(values[-1] * 1000.0, 3),
        "mean_ms": round(sum(values) / n * 1000.0, 3),
    }


# -- consumer -------------------------------------------------------------------------


def consumer_main(conn: Connection, queue: str, expected: int, latency: bool, timeout: float) -> None:
    """Count events on ``queue`` (bound to ``#``) until ``expected`` distinct seqs arrived."""
    _run(_consumer, conn, queue, expected, latency, timeout)


# ~75 lines on purpose: the consumer's hot callback and its bookkeeping share local state (closures
# are cheaper per message than attribute lookups), and the whole worker protocol is readable in one place.
async def _consumer(conn: Connection, queue: str, expected: int, latency: bool, timeout: float) -> None:
    import aiormq

    cmds = _Commands(conn)
    seen = bytearray(expected + 2)
    state = {"count": 0, "distinct": 0, "dups": 0, "out_of_range": 0, "first": 0.0, "last": 0.0}
    lat: list[float] = []
    done = asyncio.Event()
    loads = orjson.loads
    now_fn = time.time

    def on_message(message: Any) -> None:
        now = now_fn()
        body = loads(message.body)
        seq = body.get("seq")
        if state["count"] == 0:
            state["first"] = now
        state["last"] = now
        state["count"] += 1
        if latency:
            lat.append(now - body["sent_at"])
        if not isinstance(seq, int) or not 0 < seq <= expected:
            state["out_of_range"] += 1
            return
        if seen[seq]:
            state["dups"] += 1
        else:
            seen[seq] = 1
            state["distinct"] += 1
            if state["distinct"] >= expected:
                done.set()

    async def callback(message: Any) -> None:
        on_message(message)

    # The broker may be stopped (outage benchmark): retry until it accepts us.
    deadline = time.monotonic() + timeout
    connection = None
    while connection is None:
        try:
            connection = await aiormq.connect(AMQP_URL)
        except Exception:
            if time.monotonic() > deadline or cmds.stop.is_set():
                cmds.send(kind="error", error="consumer cannot connect")
                return
            await asyncio.sleep(0.2)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=5000)
    await channel.basic_consume(queue, callback, no_ack=True)
    cmds.send(kind="ready", pid=os.getpid())
    stop_wait = asyncio.ensure_future(cmds.stop.wait())
    done_wait = asyncio.ensure_future(done.wait())
    await asyncio.wait({stop_wait, done_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    # Catch duplicates that arrive right after the last distinct one.
    if done.is_set():
        await asyncio.sleep(0.3)
    stop_wait.cancel()
    done_wait.cancel()
    missing = [i for i in range(1, expected + 1) if not seen[i]]
    result = {
        "kind": "done",
        "complete": state["distinct"] >= expected,
        "expected": expected,
        "received": state["count"],
        "distinct": state["distinct"],
        "duplicates": state["dups"],
        "out_of_range": state["out_of_range"],
        "missing": len(missing),
        "missing_sample": missing[:20],
        "first_at": state["first"],
        "last_at": state["last"],
        "latency": _percentiles(lat) if latency else None,
    }
    cmds.send(**result)
    with contextlib.suppress(Exception):
        await connection.close()


# -- simulator -------------------------------------------------------------------------


def simulator_main(conn: Connection, key: str, rate: float, count: int) -> None:
    """Serve the project's simulator, paused until ``go``; report subscribe and all-sent."""
    _run(_simulator, conn, key, rate, count)


async def _simulator(conn: Connection, key: str, rate: float, count: int) -> None:
    import logging

    from bridge.simulator import Simulator, SimulatorConfig

    logging.basicConfig(level=logging.WARNING)
    cmds = _Commands(conn)
    sim = Simulator(SimulatorConfig(host="127.0.0.1", port=0, realm_keys=(key,), rate=rate, count=count))
    sim.pause()
    await sim.start()
    cmds.send(kind="ready", port=sim.port, pid=os.getpid())
    reported_sub = False
    cleared = 0
    go_at = None
    all_sent_reported = False
    while not cmds.stop.is_set():
        if not reported_sub and sim.subscribes >= 1:
            reported_sub = True
            cmds.send(kind="subscribed")
        if cmds.go.is_set() and go_at is None:
            go_at = time.time()
            sim.resume()
        # The simulator records every event it sent: keep this process's memory flat.
        if len(sim.sent) > 50_000:
            cleared += len(sim.sent)
            sim.sent.clear()
        total = cleared + len(sim.sent)
        if go_at is not None and not all_sent_reported and total >= count:
            all_sent_reported = True
            cmds.send(kind="sent_all", sent=total, seconds=time.time() - go_at)
        await asyncio.sleep(0.02)
    await sim.stop()
    cmds.send(kind="stopped", sent=cleared + len(sim.sent))


# -- ceiling: raw aio-pika with a confirm window -----------------------------------------


def _body(seq: int, sent_at: float) -> bytes:
    event = EVENT_NAMES[seq % len(EVENT_NAMES)]
    return orjson.dumps(
        {
            "type": "notification",
            "event": event,
            "data": f"{seq:024x}",
            "timestamp": str(int(sent_at * 1000)),
            "seq": seq,
            "sent_at": sent_at,
        }
    )


def ceiling_main(conn: Connection, exchange: str, count: int, rate: float, window: int, uvloop_on: bool) -> None:
    """Publish ``count`` persistent messages with ``window`` confirms in flight, no WebSocket."""
    _run(_ceiling, conn, exchange, count, rate, window, uvloop_on=uvloop_on)


def _message(seq: int) -> tuple[Any, str]:
    import aio_pika
    from aio_pika.abc import DeliveryMode

    now = time.time()
    body = _body(seq, now)
    event = EVENT_NAMES[seq % len(EVENT_NAMES)]
    # The same properties the bridge sets (see bridge.publisher.build_message).
    message = aio_pika.Message(
        body,
        delivery_mode=DeliveryMode.PERSISTENT,
        content_type="application/json",
        content_encoding="utf-8",
        message_id=hashlib.sha256(body).hexdigest()[:32],
        timestamp=datetime.fromtimestamp(now, tz=UTC),
        type=event,
        app_id="orangepill-bridge",
        headers={"realm": "bench", "entity_id": f"{seq:024x}", "received_at": int(now * 1000)},
    )
    return message, event


async def _ceiling(conn: Connection, exchange_name: str, count: int, rate: float, window: int) -> None:
    import aio_pika

    cmds = _Commands(conn)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
    exchange = await channel.get_exchange(exchange_name, ensure=True)
    sem = asyncio.Semaphore(window)
    failures = 0
    pending: set[asyncio.Task[None]] = set()

    async def publish(seq: int) -> None:
        nonlocal failures
        try:
            message, key = _message(seq)
            await exchange.publish(message, key, mandatory=True, timeout=30)
        except Exception:
            failures += 1
        finally:
            sem.release()

    cmds.send(kind="ready", pid=os.getpid())
    await cmds.go.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for seq in range(1, count + 1):
        if rate > 0:
            due = t0 + (seq - 1) / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        task = asyncio.create_task(publish(seq))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    cmds.send(kind="published", failures=failures, seconds=loop.time() - t0)
    await cmds.stop.wait()
    await connection.close()


# -- naive: read the stream, await each confirm -------------------------------------------


def naive_main(conn: Connection, url: str, key: str, exchange: str, count: int, uvloop_on: bool) -> None:
    """The bridge most teams write first: one frame, one publish, one awaited confirm."""
    _run(_naive, conn, url, key, exchange, count, uvloop_on=uvloop_on)


async def _naive(conn: Connection, url: str, key: str, exchange_name: str, count: int) -> None:
    import aio_pika
    from aio_pika.abc import DeliveryMode
    from websockets.asyncio.client import connect

    cmds = _Commands(conn)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name, ensure=True)
    published = 0
    async with connect(url, ping_interval=None, compression=None) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "realm": key}).decode())
        cmds.send(kind="ready", pid=os.getpid())
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame.get("type") != "notification":
                continue
            event = frame.get("event") or frame.get("data", {}).get("event")
            message = aio_pika.Message(
                raw.encode() if isinstance(raw, str) else raw,
                delivery_mode=DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=hashlib.sha256(raw.encode() if isinstance(raw, str) else raw).hexdigest()[:32],
                app_id="orangepill-bridge",
            )
            await exchange.publish(message, event)
            published += 1
            if published >= count:
                break
    cmds.send(kind="published", published=published)
    await cmds.stop.wait()
    await connection.close()


# -- pypeer: the Node peer's 40 lines in Python, with the design card's libraries -------------


def pypeer_main(conn: Connection, url: str, key: str, exchange: str, count: int, uvloop_on: bool) -> None:
    """``bench/node-peer/peer.js`` line for line in Python: websockets + an aiormq confirm channel.

    At most 256 unconfirmed publishes, persistent, the peer's four properties, no headers,
    no spool, no mandatory flag; the reader stops while 256 frames wait (the peer's
    ``ws.pause()``). What this stack costs per event before any of the bridge's work.
    """
    _run(_pypeer, conn, url, key, exchange, count, uvloop_on=uvloop_on)


async def _pypeer(conn: Connection, url: str, key: str, exchange: str, count: int) -> None:
    import aiormq
    from pamqp.commands import Basic
    from websockets.asyncio.client import connect

    cmds = _Commands(conn)
    amqp = await aiormq.connect(AMQP_URL)
    channel = await amqp.channel(publisher_confirms=True)
    window = asyncio.Semaphore(256)
    published = failed = 0
    done = asyncio.Event()

    async def publish(raw: bytes, event: str) -> None:
        nonlocal failed, published
        props = Basic.Properties(
            delivery_mode=2, content_type="application/json", app_id="orangepill-python-peer",
            message_id=hashlib.sha256(raw).hexdigest()[:32],
        )  # fmt: skip
        try:
            confirm = await channel.basic_publish(raw, exchange=exchange, routing_key=event, properties=props)
            failed += not isinstance(confirm, Basic.Ack)
        except Exception:
            failed += 1
        finally:
            window.release()
            published += 1
            if published >= count:
                done.set()

    tasks: set[asyncio.Task[None]] = set()
    created = 0
    async with connect(url, ping_interval=None, compression=None, max_queue=256) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "realm": key}).decode())
        cmds.send(kind="ready", pid=os.getpid())
        async for text in ws:
            raw = text.encode() if isinstance(text, str) else text
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # the text PING keepalive, junk
            if not isinstance(frame, dict) or frame.get("type") != "notification":
                continue
            event = frame.get("event") or (frame.get("data") or {}).get("event")
            if not event:
                continue
            await window.acquire()  # 256 in flight: stop reading, as the peer's ws.pause()
            task = asyncio.create_task(publish(raw, event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            created += 1
            if created >= count:
                break
        await done.wait()
    cmds.send(kind="published", published=published, failed=failed)
    await cmds.stop.wait()
    await amqp.close()


# -- node: the 40-line Node.js peer (ws + amqplib confirm channel) ------------------------


def node_main(conn: Connection, peer_dir: str, url: str, key: str, exchange: str, count: int) -> None:
    """Run ``node peer.js`` and relay its JSON lines; ``ready`` carries node's pid (the measured one)."""
    import json
    import subprocess
    import threading

    env = {**os.environ, "PEER_REALM_KEY": key, "PEER_AMQP_URL": AMQP_URL}
    proc = subprocess.Popen(
        ["node", "peer.js", url, exchange, str(count)],
        cwd=peer_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    stopping = threading.Event()

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                conn.send(json.loads(line))
        err = proc.stderr.read() if proc.stderr is not None else ""
        code = proc.wait()
        if stopping.is_set():
            return
        with contextlib.suppress(Exception):
            conn.send({"kind": "error", "error": f"node peer exited with {code}: {err.strip()[-300:]}"})

    threading.Thread(target=relay, daemon=True).start()
    try:
        while proc.poll() is None:
            if conn.poll(0.2) and conn.recv().get("cmd") == "stop":
                break
    except (EOFError, OSError):
        pass
    finally:
        stopping.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def peak_rss_self() -> int:
    """This process's peak RSS in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
