"""Helpers shared by the tests and the benchmarks (conftest.py holds fixtures only).

Importable as ``tests.helpers``: free ports, polling until a condition holds,
``rabbitmqctl``, and the bridge as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bridge.app import run_bridge
from bridge.broker import declare_topology
from bridge.config import Realm, Settings
from bridge.simulator import Simulator, SimulatorConfig

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
KEY = "test-realm-key-0d6c1f"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

Predicate = Callable[[], bool]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _holds(predicate: Predicate, ignore: tuple[type[BaseException], ...]) -> bool:
    try:
        return bool(predicate())
    except ignore:
        return False


async def wait_until(
    predicate: Predicate,
    timeout: float = 15.0,
    interval: float = 0.05,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> bool:
    """Poll a condition (in the event loop) until it holds or the timeout passes; checked once more at the end.

    Exceptions of the ``ignore`` types count as "not yet" (a server not listening yet).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _holds(predicate, ignore):
            return True
        await asyncio.sleep(interval)
    return _holds(predicate, ignore)


def wait_until_sync(
    predicate: Predicate,
    timeout: float = 15.0,
    interval: float = 0.25,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> bool:
    """``wait_until`` for code without an event loop (the same rules, blocking sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _holds(predicate, ignore):
            return True
        time.sleep(interval)
    return _holds(predicate, ignore)


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    """Run ``rabbitmqctl`` on the local broker; raises RuntimeError when it fails.

    Only fault tests and the outage benchmark may use it to stop the broker.
    """
    out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


class BridgeProcess:
    """``python -m bridge run ARGS`` as a real process, its output in a log file."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        log_path: str | Path | None = None,
        clean_env: bool = False,
    ) -> None:
        base = dict(os.environ)
        if clean_env:  # the caller's ORANGEPILL_*/BRIDGE_* settings must not leak in
            base = {k: v for k, v in base.items() if not k.startswith(("ORANGEPILL_", "BRIDGE_"))}
        else:
            base.update({"BRIDGE_LOG_FORMAT": "json", "BRIDGE_UVLOOP": "0"})
        self.log_path = Path(log_path or f"/tmp/bridge-test-{uuid.uuid4().hex[:8]}.log")
        self._owns_log = log_path is None
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bridge", "run", *args],
            cwd=ROOT,
            env={**base, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def output(self) -> str:
        """Everything the process logged so far."""
        if not self._log.closed:
            self._log.flush()
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def tail(self, n: int = 2000) -> str:
        """The last ``n`` characters of the log."""
        return self.output()[-n:]

    def signal(self, sig: int) -> None:
        """Send a signal."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        """SIGKILL if still running; remove the log if it is ours."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()
        if self._owns_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def bridge_settings(stream_url: str, exchange: str, **overrides: Any) -> Settings:
    """Settings tuned for tests: loopback, fast reconnects, short timeouts."""
    base = Settings(
        stream_url=stream_url,
        realms=(Realm(label="test", key=KEY),),
        amqp_url=AMQP_URL,
        exchange=exchange,
        spool="memory",
        metrics_addr="off",
        ping_interval=0.5,
        idle_timeout=2.0,
        subscribe_timeout=3.0,
        reconnect_min=0.05,
        reconnect_max=0.5,
        reconnect_reset_after=1.0,
        publish_timeout=5.0,
        drain_timeout=5.0,
    )
    return replace(base, **overrides)


async def bind_queue(
    connection: AbstractRobustConnection, settings: Settings, *patterns: str
) -> AbstractQueue:
    """Declare the bridge's topology and a durable test queue bound to the patterns."""
    _, exchange, _ = await declare_topology(connection, settings, confirms=False)
    channel = await connection.channel()
    queue = await channel.declare_queue(
        f"{settings.exchange}.q.{uuid.uuid4().hex[:6]}", durable=True, arguments={"x-expires": 600_000}
    )
    for pattern in patterns:
        await queue.bind(exchange, routing_key=pattern)
    return queue


async def queue_of(connection: AbstractRobustConnection, name: str) -> AbstractQueue:
    """An existing queue, passively."""
    channel = await connection.channel()
    return await channel.declare_queue(name, passive=True)


async def collect(queue: AbstractQueue, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[AbstractIncomingMessage]:
    """Consume until ``n`` messages arrived (or the timeout), then ``settle`` more seconds for extras."""
    got: list[AbstractIncomingMessage] = []
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        got.append(message)
        if len(got) >= n:
            done.set()

    tag = await queue.consume(on_message)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=timeout)
        if settle:
            await asyncio.sleep(settle)
    finally:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
    return got


def seqs(messages: list[AbstractIncomingMessage]) -> list[int]:
    """The simulator's sequence numbers carried in the bodies."""
    return [int(orjson.loads(m.body)["seq"]) for m in messages]


@dataclass
class RunningBridge:
    """A bridge running in this event loop."""

    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[int]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    async def finish(self, timeout: float = 20.0) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, timeout=timeout)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[RunningBridge]:
    """Run the bridge in-process; stop it (and fail loudly if it crashed) on exit."""
    stop = asyncio.Event()
    registry = CollectorRegistry()
    task = asyncio.create_task(run_bridge(settings, stop, registry=registry))
    bridge = RunningBridge(settings=settings, stop=stop, task=task, registry=registry)
    try:
        yield bridge
    finally:
        if not task.done():
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=30)


@contextlib.asynccontextmanager
async def simulator(paused: bool = False, **config: Any) -> AsyncIterator[Simulator]:
    """The project's stream simulator on a free loopback port (``paused``: only what the test sends)."""
    config.setdefault("realm_keys", (KEY,))
    sim = Simulator(SimulatorConfig(host="127.0.0.1", port=0, **config))
    if paused:
        sim.pause()
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def process_args(stream_url: str, exchange: str, spool: str, metrics_port: int | None = None) -> list[str]:
    """Command-line flags for a test bridge process."""
    return [
        "--stream-url", stream_url,
        "--realm-key", f"test={KEY}",
        "--amqp-url", AMQP_URL,
        "--exchange", exchange,
        "--spool", spool,
        "--metrics-addr", f"127.0.0.1:{metrics_port}" if metrics_port else "off",
        "--ping-interval", "0.5",
        "--idle-timeout", "3",
        "--reconnect-min", "0.05",
        "--reconnect-max", "0.5",
        "--reconnect-reset-after", "1",
        "--drain-timeout", "5",
    ]  # fmt: skip


class FreezableProxy:
    """A loopback TCP proxy to RabbitMQ whose open links can go silent (``freeze``): nothing more is
    forwarded either way and nothing is closed, as in a network partition. Links opened after a
    freeze work normally.
    """

    def __init__(self, upstream_port: int = 5672) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.Event, list[asyncio.Task[None]], list[asyncio.StreamWriter]]] = []
        self.port = 0

    @property
    def url(self) -> str:
        """An AMQP URL that goes through the proxy."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def links(self) -> int:
        """Connections accepted so far."""
        return len(self._links)

    async def start(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        go = asyncio.Event()
        go.set()
        pumps = [asyncio.create_task(self._pump(reader, up_writer, go)),
                 asyncio.create_task(self._pump(up_reader, writer, go))]  # fmt: skip
        self._links.append((go, pumps, [writer, up_writer]))

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, go: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await go.wait()
                data = await src.read(65536)
                if not data:
                    break
                await go.wait()
                dst.write(data)
        dst.close()

    def freeze(self) -> None:
        """Every link open now goes silent."""
        for go, _, _ in self._links:
            go.clear()

    async def cut(self) -> None:
        """RabbitMQ unreachable through the proxy: every link closed, new connections refused (``restore``)."""
        await self.close()
        if self._server is not None:
            await self._server.wait_closed()
        self._links = []

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for _, pumps, writers in self._links:
            for task in pumps:
                task.cancel()
            for w in writers:
                w.close()
        await asyncio.gather(*(t for _, pumps, _ in self._links for t in pumps), return_exceptions=True)
