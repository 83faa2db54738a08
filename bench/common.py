"""Shared pieces of the benchmarks: worker processes, the bridge process, topology, machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.workers import AMQP_URL
from bridge.contract import Topology
from tests import helpers
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEY = "bench-realm-key-5e1f0a"
_CTX = mp.get_context("spawn")


def new_exchange() -> str:
    """A unique exchange name for one measurement."""
    return f"bench.{uuid.uuid4().hex[:10]}"


# -- topology ---------------------------------------------------------------------------


async def _declare(exchange: str, queue: str) -> None:
    import aio_pika

    from bridge.broker import declare_topology
    from bridge.config import Realm, Settings

    settings = Settings(realms=(Realm("bench", KEY),), amqp_url=AMQP_URL, exchange=exchange)
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        # Exactly the bridge's topology (alternate exchange, quarantine queue) ...
        _, x, _ = await declare_topology(connection, settings, confirms=False)
        channel = await connection.channel()
        # ... plus the consumer's durable queue bound to every event.
        q = await channel.declare_queue(queue, durable=True, arguments={"x-expires": 1_800_000})
        await q.bind(x, routing_key="#")


async def _delete(exchange: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel()
        names = Topology(exchange)
        for name in (queue, *names.own_queues):
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            if channel.is_closed:
                channel = await connection.channel()
        for name in names.own_exchanges:
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
            if channel.is_closed:
                channel = await connection.channel()


def declare(exchange: str, queue: str) -> None:
    """Declare the bridge's topology on ``exchange`` and a durable queue bound to ``#``."""
    asyncio.run(_declare(exchange, queue))


def delete(exchange: str, queue: str) -> None:
    """Delete everything ``declare`` (and the bridge) created; never raises."""
    with contextlib.suppress(Exception):
        asyncio.run(_delete(exchange, queue))


# -- processes -----------------------------------------------------------------------------


class Worker:
    """A worker process from ``bench.workers`` and its pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=target, args=(child, *args), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child.close()
        self.inbox: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, **cmd: Any) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(cmd)

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """Wait for a message of ``kind`` (messages of other kinds are kept in ``inbox``)."""
        for i, msg in enumerate(self.inbox):
            if msg.get("kind") == kind:
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {kind!r} within {timeout:.0f}s")
            if self.conn.poll(min(left, 0.5)):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    raise RuntimeError(f"{self.name} exited (code {self.proc.exitcode})") from None
                if msg.get("kind") == "error":
                    raise RuntimeError(f"{self.name}: {msg.get('error')}")
                if msg.get("kind") == kind:
                    return dict(msg)
                self.inbox.append(msg)
            elif not self.proc.is_alive():
                raise RuntimeError(f"{self.name} exited (code {self.proc.exitcode}) before {kind!r}")

    def close(self, timeout: float = 10.0) -> None:
        self.send(cmd="stop")
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class BridgeProcess(helpers.BridgeProcess):
    """``python -m bridge run`` as a subprocess: default settings, loopback, a temp spool file."""

    def __init__(self, stream_url: str, exchange: str, *, uvloop_on: bool, spool_dir: str) -> None:
        self.metrics_port = free_port()
        self.spool = os.path.join(spool_dir, "spool.db")
        super().__init__(
            [
                "--stream-url", stream_url,
                "--realm-key", f"bench={KEY}",
                "--amqp-url", AMQP_URL,
                "--exchange", exchange,
                "--spool", self.spool,
                "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
                # Extra flags for experiments (e.g. "--spool memory"); results record them.
                *shlex.split(os.environ.get("BENCH_BRIDGE_ARGS", "")),
            ],
            {"BRIDGE_UVLOOP": "1" if uvloop_on else "0"},
            log_path=os.path.join(spool_dir, "bridge.log"),
            clean_env=True,
        )  # fmt: skip

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0, *, broker: bool = True) -> None:
        """Wait until /readyz says ready (``broker=False``: until the realm is subscribed)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(OSError):
                status, text = self._get("/readyz")
                last = text
                if status == 200:
                    return
                if not broker:
                    with contextlib.suppress(ValueError, AttributeError):
                        if json.loads(text).get("stream", {}).get("subscribed", {}).get("bench"):
                            return
            time.sleep(0.1)
        raise TimeoutError(f"bridge not ready after {timeout}s: {last} {self.tail()}")

    def metrics(self) -> dict[str, float]:
        """The bridge's /metrics, summed over labels, by sample name."""
        with contextlib.suppress(OSError):
            return parse_metrics(self._get("/metrics")[1])
        return {}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over labels}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def spool_bytes(path: str) -> int:
    """Size of the spool file with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(path + suffix)
    return total


LOCK_PATH = "/tmp/orangepill-broker.lock"


@contextlib.contextmanager
def broker_lock(*, exclusive: bool) -> Iterator[None]:
    """``flock`` on the shared broker lock: exclusive while we stop the broker, shared while
    we measure (so nobody stops it under a measurement; a stopper waits one measurement)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core, every process)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from ``/proc/<pid>/stat``; NaN if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return float("nan")
    # Fields after the ")" that closes the command name: state is field 3, utime 14 and stime 15.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS (VmHWM)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def broker_pid() -> int | None:
    """The RabbitMQ node on 5672 (``beam.smp``), to account for its CPU.

    ``pgrep -o``: the oldest ``beam.smp``, the system's node; private test clusters
    (tests/cluster.py) start later ones.
    """
    try:
        out = subprocess.run(["pgrep", "-o", "-x", "beam.smp"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.split()
    return int(first[0]) if first else None


# -- the Node.js peer ----------------------------------------------------------------------

NODE_PEER = ROOT / "bench" / "node-peer"


def node_peer_ready() -> str | None:
    """Install the Node peer's packages on first use; None when it can run, else why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "no `node` on PATH"
    if all((NODE_PEER / "node_modules" / name / "package.json").exists() for name in ("ws", "amqplib")):
        return None
    if npm is None:
        return "no `npm` on PATH to install ws and amqplib"
    try:
        out = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund"],
            cwd=NODE_PEER, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"npm install failed: {exc}"
    if out.returncode != 0:
        lines = [x for x in (out.stderr or out.stdout).strip().splitlines() if "nodedir" not in x]
        return f"npm install failed (exit {out.returncode}): {' '.join(lines[-3:])[:300]}"
    return None


class RssSampler:
    """Samples a process's RSS in a thread while a measurement runs."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes(self.pid)
            if value:
                self.samples.append(value)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(2)
        return self.samples


# -- the machine ----------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rabbitmq_version() -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"unknown ({out.stderr.strip()[:100]})"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def node_versions() -> dict[str, str | None]:
    """Node.js and the peer's installed ws/amqplib versions (None when absent)."""
    out: dict[str, str | None] = {"node": None, "ws": None, "amqplib": None}
    node = shutil.which("node")
    if node is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["node"] = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    for name in ("ws", "amqplib"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = json.loads((NODE_PEER / "node_modules" / name / "package.json").read_text())["version"]
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    packages = {}
    for name in ("orangepill-bridge", "websockets", "aio-pika", "aiormq", "pamqp", "orjson", "uvloop", "psutil"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    mem = psutil.virtual_memory()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(mem.total / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "rabbitmq": rabbitmq_version(),
        "packages": packages,
        "node": node_versions(),
        "tmpdir": tempfile.gettempdir(),
    }
