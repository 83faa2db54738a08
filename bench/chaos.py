"""Chaos soak (issue 14): steady traffic under random faults; every event accounted for, memory watched.

``python -m bench chaos --minutes N`` sets up, each in its own process:

- the simulator (``python -m bridge simulate``) at ``--rate`` events/s with its control API;
- the bridge (``python -m bridge run``), or two replicas (``--replicas 2``), each with its own disk spool
  and metrics port;
- a consumer that records every message (receive time, ``seq``, ``sent_at``, ``message_id``,
  redelivered flag) from a durable queue bound to ``#`` into a file.

Every ``--gap`` seconds (random, seeded: the seed is printed, ``--seed`` replays a run) it injects one
fault, rotating through every kind in a seeded shuffled order so that each kind occurs once per round.
The run lasts ``--minutes`` and at least one whole round. Then the simulator pauses, the backlog drains,
and the report counts sent (the simulator's last ``seq``), received, LOST (by seq), duplicates, the
longest recovery, p99 latency outside fault windows, RSS/descriptors/tasks; JSON and a PNG plot go to
``bench/results/chaos-<stamp>.{json,png}``.

The broker is a private RabbitMQ node on a spare loopback port (``tests/cluster.py``) unless
``--broker local`` (127.0.0.1:5672, under the exclusive broker lock: only on a machine nobody else uses).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import parse_metrics
from tests import helpers
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEY = "chaos-realm-key-7b2e41"
REALM = "chaos"
LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"

KINDS = ("drop", "silent", "malformed", "broker_stop", "close_all", "sigkill", "sigterm", "spool_full")
# Lost seqs whose send time (bracketed by the received neighbours) touches [kill - BEFORE, kill + AFTER]
# are in the documented SIGKILL limit: read but not yet committed, or still in the kernel's socket buffer.
SIGKILL_BEFORE = 2.0
SIGKILL_AFTER = 1.0
SMALL_SPOOL = 256 * 1024  # --spool-max-bytes of the spool-full episode (the minimum is 64 KiB)
PROCESS_WARMUP = 60.0  # seconds of each bridge process's life left out of the RSS slope
MIN_SEGMENT = 120.0  # a process must contribute this many seconds of samples to the slope
SETTLE_AFTER_FAULT = 15.0  # the "settled" RSS slope leaves out each fault and this long after it


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- configuration and the broker ---------------------------------------------------------


@dataclass(frozen=True)
class ChaosConfig:
    """What one soak does; ``gap`` and ``down`` are (min, max) seconds."""

    minutes: float = 60.0
    seed: int | None = None
    rate: float = 300.0
    replicas: int = 1
    broker: str = "private"
    gap: tuple[float, float] = (20.0, 60.0)
    down: tuple[float, float] = (10.0, 40.0)
    results_dir: Path | None = None
    kinds: tuple[str, ...] = KINDS


@dataclass
class Target:
    """The broker under test: its URL and ``rabbitmqctl`` on its node."""

    kind: str
    url: str
    node: str
    ctl: Callable[..., str]


@contextlib.contextmanager
def private_target() -> Iterator[Target]:
    """A private single RabbitMQ node on a spare loopback port; raises ``ClusterUnavailable`` if it cannot start."""
    from tests.cluster import rabbit_cluster

    with rabbit_cluster(1) as cluster:
        node = cluster.nodes[0]
        yield Target("private", node.url, node.name, lambda *a: cluster.ctl(node, *a, timeout=180))


@contextlib.contextmanager
def local_target() -> Iterator[Target]:
    """The broker on 127.0.0.1:5672, held under the exclusive broker lock for the whole run."""
    from bench.common import broker_lock

    with broker_lock(exclusive=True):
        yield Target("local", LOCAL_URL, "rabbit@localhost", lambda *a: helpers.rabbitmqctl(*a, timeout=180))


async def _declare(url: str, exchange: str, queue: str) -> None:
    import aio_pika

    from bridge.broker import declare_topology
    from bridge.config import Realm, Settings

    settings = Settings(realms=(Realm(REALM, KEY),), amqp_url=url, exchange=exchange)
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        _, x, _ = await declare_topology(connection, settings, confirms=False)
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True)
        await q.bind(x, routing_key="#")


async def _delete(url: str, exchange: str, queue: str) -> None:
    import aio_pika

    from bridge.contract import Topology

    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        names = Topology(exchange)
        for name in (queue, *names.own_queues):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in names.own_exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


# -- the consumer (its own process) ---------------------------------------------------------


def consumer_main(url: str, queue: str, out_path: str) -> None:
    """Record every message of ``queue`` as ``recv_time seq sent_at message_id redelivered`` lines until SIGTERM."""
    asyncio.run(_consume(url, queue, out_path))


async def _consume(url: str, queue: str, out_path: str) -> None:
    import logging

    import aio_pika
    import orjson

    logging.disable(logging.CRITICAL)  # aio-pika's reconnect chatter; the broker's outages are the point
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with open(out_path, "w", buffering=1 << 16) as out:

        async def on_message(message: Any) -> None:
            now = time.time()
            try:
                body = orjson.loads(message.body)
                seq, sent_at = body.get("seq"), body.get("sent_at")
            except (orjson.JSONDecodeError, AttributeError):
                seq, sent_at = None, None
            out.write(f"{now:.6f}\t{seq}\t{sent_at}\t{message.message_id}\t{int(bool(message.redelivered))}\n")
            with contextlib.suppress(Exception):
                await message.ack()

        connection = None
        while connection is None and not stop.is_set():
            try:
                connection = await aio_pika.connect_robust(url, timeout=10, reconnect_interval=0.5)
            except Exception:
                await asyncio.sleep(0.5)
        if connection is None:
            return
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=512)
        q = await channel.declare_queue(queue, durable=True, passive=True)
        await q.consume(on_message)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)
            out.flush()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=5)
        out.flush()


# -- HTTP ---------------------------------------------------------------------------------------


def _http(url: str, method: str = "GET", timeout: float = 3.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# -- bridge replicas -----------------------------------------------------------------------------


class Replica:
    """One bridge replica: its spool, metrics port, and the current process (restarts keep the spool)."""

    def __init__(self, index: int, workdir: Path, common_args: list[str]) -> None:
        self.index = index
        self.workdir = workdir
        self.spool = str(workdir / f"spool-{index}.db")
        self.metrics_port = free_port()
        self.common_args = common_args
        self.proc: helpers.BridgeProcess | None = None
        self.generation = 0
        self.started_at = 0.0

    def start(self, *extra: str) -> None:
        self.generation += 1
        args = [*self.common_args, "--spool", self.spool, "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *extra]
        self.proc = helpers.BridgeProcess(
            args,
            {"BRIDGE_LOG_FORMAT": "json"},
            log_path=self.workdir / f"bridge-{self.index}-{self.generation}.log",
            clean_env=True,
        )
        self.started_at = time.time()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.proc.poll() is None else None

    def get(self, path: str) -> tuple[int, str]:
        return _http(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2.0)

    def metrics(self) -> dict[str, float]:
        try:
            return parse_metrics(self.get("/metrics")[1])
        except OSError:
            return {}

    def subscribed(self) -> bool:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            body = json.loads(self.get("/readyz")[1])
            return bool(body.get("stream", {}).get("subscribed", {}).get(REALM))
        return False

    def wait_subscribed(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.proc.poll() is not None:
                raise RuntimeError(f"bridge {self.index} exited: {self.proc.tail() if self.proc else ''}")
            if self.subscribed():
                return
            time.sleep(0.1)
        raise TimeoutError(f"bridge {self.index} not subscribed after {timeout:g}s")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.signal(signal.SIGKILL)
            self.proc.wait(15)
            self.proc.close()

    def terminate(self, timeout: float = 30.0) -> int | None:
        return self.proc.stop(timeout) if self.proc is not None else None

    def is_leader(self) -> bool | None:
        """True/False from the ``orangepill_bridge_leader`` gauge or /readyz ``roles``; None if neither exists."""
        m = self.metrics()
        if "orangepill_bridge_leader" in m:
            return m["orangepill_bridge_leader"] >= 1
        with contextlib.suppress(OSError, ValueError, AttributeError):
            roles = json.loads(self.get("/readyz")[1]).get("roles")
            if isinstance(roles, dict) and roles:
                return any(str(v).lower() == "leader" for v in roles.values())
            if isinstance(roles, list) and roles:
                return "leader" in [str(v).lower() for v in roles]
        return None


# -- sampling -----------------------------------------------------------------------------------


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Sampler:
    """Every second: each replica's RSS, fds, asyncio tasks, spool depth/bytes/full (a thread)."""

    def __init__(self, replicas: list[Replica], t0: float) -> None:
        self.replicas = replicas
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for r in self.replicas:
                with contextlib.suppress(Exception):
                    self.samples.append(self.sample(r))

    def sample(self, r: Replica) -> dict[str, Any]:
        pid = r.pid
        rss = None
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(pid).memory_info().rss
        m = r.metrics() if pid is not None else {}
        return {
            "t": round(time.time() - self.t0, 2),
            "replica": r.index,
            "pid": pid,
            "generation": r.generation,
            "age": round(time.time() - r.started_at, 2),
            "rss": rss,
            "fds": _fds(pid) if pid is not None else None,
            "tasks": m.get("orangepill_bridge_asyncio_tasks"),
            "depth": m.get("orangepill_bridge_spool_depth"),
            "spool_bytes": m.get("orangepill_bridge_spool_bytes"),
            "full": m.get("orangepill_bridge_spool_full"),
            "amqp": m.get("orangepill_bridge_amqp_connected"),
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the soak ------------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault: when it started and ended (unix seconds) and what it did."""

    kind: str
    start: float
    end: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Soak:
    """The processes of one soak and the fault actions on them."""

    def __init__(self, cfg: ChaosConfig, target: Target, workdir: Path, seed: int) -> None:
        self.cfg = cfg
        self.target = target
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.exchange = f"chaos.{uuid.uuid4().hex[:10]}"
        self.queue = f"{self.exchange}.all"
        self.sim_port = free_port()
        self.control = f"http://127.0.0.1:{free_port()}"
        self.sim: subprocess.Popen[bytes] | None = None
        self.consumer: Any = None
        self.consumer_file = workdir / "consumer.tsv"
        self.notes: list[str] = []
        common_args = [
            "--stream-url", f"ws://127.0.0.1:{self.sim_port}",
            "--realm-key", f"{REALM}={KEY}",
            "--amqp-url", target.url,
            "--exchange", self.exchange,
            "--ping-interval", "1",
            "--idle-timeout", "5",
            "--reconnect-min", "0.1",
            "--reconnect-max", "2",
            "--reconnect-reset-after", "5",
            "--publish-timeout", "10",
            "--drain-timeout", "5",
        ]  # fmt: skip
        self.replicas = [Replica(i, workdir, common_args) for i in range(cfg.replicas)]

    # processes

    def start(self) -> None:
        asyncio.run(_declare(self.target.url, self.exchange, self.queue))
        sim_log = (self.workdir / "simulator.log").open("wb")
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "bridge", "simulate", "--host", "127.0.0.1", "--port", str(self.sim_port),
             "--realm-key", KEY, "--rate", f"{self.cfg.rate:g}", "--seed", "14",
             "--control-addr", self.control.removeprefix("http://")],
            cwd=ROOT, stdout=sim_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        sim_log.close()
        if not helpers.wait_until_sync(lambda: self.sim_stats() is not None, 30, 0.2):
            raise RuntimeError("the simulator's control API did not answer")
        ctx = mp.get_context("spawn")
        self.consumer = ctx.Process(
            target=consumer_main, args=(self.target.url, self.queue, str(self.consumer_file)), name="chaos-consumer"
        )
        self.consumer.start()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_subscribed(60)

    def stop(self) -> None:
        for r in self.replicas:
            with contextlib.suppress(Exception):
                r.terminate()
                r.kill()
        if self.consumer is not None and self.consumer.is_alive():
            self.consumer.terminate()
            self.consumer.join(15)
            if self.consumer.is_alive():
                self.consumer.kill()
        if self.sim is not None and self.sim.poll() is None:
            self.sim.terminate()
            try:
                self.sim.wait(10)
            except subprocess.TimeoutExpired:
                self.sim.kill()

    def sim_stats(self) -> dict[str, Any] | None:
        try:
            status, text = _http(self.control + "/stats")
            return json.loads(text) if status == 200 else None
        except (OSError, ValueError):
            return None

    def sim_post(self, path: str) -> dict[str, Any]:
        status, text = _http(self.control + path, "POST")
        if status != 200:
            raise RuntimeError(f"simulator {path}: {status} {text[:200]}")
        return dict(json.loads(text))

    def leader(self) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        roles = [r.is_leader() for r in self.replicas]
        if all(role is None for role in roles):
            note = "no HA metrics (orangepill_bridge_leader or /readyz roles): replica 0 taken as the leader"
            if note not in self.notes:
                self.notes.append(note)
                _log(note)
            return self.replicas[0]
        for r, role in zip(self.replicas, roles, strict=True):
            if role:
                return r
        return self.replicas[0]

    # faults

    def inject(self, kind: str) -> Fault:
        fault = Fault(kind, time.time())
        getattr(self, f"_fault_{kind}")(fault)
        fault.end = time.time()
        return fault

    def _fault_drop(self, fault: Fault) -> None:
        fault.detail = self.sim_post("/drop")

    def _fault_silent(self, fault: Fault) -> None:
        fault.detail = self.sim_post("/silent")

    def _fault_malformed(self, fault: Fault) -> None:
        n = self.rng.randint(5, 50)
        fault.detail = {"n": n, **self.sim_post(f"/malformed?n={n}")}

    def _fault_broker_stop(self, fault: Fault) -> None:
        down = round(self.rng.uniform(*self.cfg.down), 1)
        fault.detail = {"down_s": down}
        self.target.ctl("stop_app")
        try:
            time.sleep(down)
        finally:
            self.target.ctl("start_app")

    def _fault_close_all(self, fault: Fault) -> None:
        out = self.target.ctl("close_all_connections", "chaos soak")
        fault.detail = {"output": out.strip().splitlines()[-1] if out.strip() else ""}

    def _fault_sigkill(self, fault: Fault) -> None:
        r = self.leader()
        fault.detail = {"replica": r.index, "pid": r.pid}
        fault.start = time.time()
        r.kill()
        r.start()
        r.wait_subscribed(60)

    def _fault_sigterm(self, fault: Fault) -> None:
        r = self.leader()
        fault.detail = {"replica": r.index, "pid": r.pid}
        code = r.terminate()
        fault.detail["exit_code"] = code
        r.start()
        r.wait_subscribed(60)

    def _fault_spool_full(self, fault: Fault) -> None:
        """Broker down; the leader restarted with a small spool bound until it is full; broker up; bound restored."""
        r = self.leader()
        fault.detail = {"replica": r.index, "max_bytes": SMALL_SPOOL}
        self.target.ctl("stop_app")
        try:
            fault.detail["exit_code_small"] = r.terminate()
            r.start("--spool-max-bytes", str(SMALL_SPOOL))
            r.wait_subscribed(60)
            t0 = time.monotonic()
            full = helpers.wait_until_sync(lambda: r.metrics().get("orangepill_bridge_spool_full") == 1.0, 60, 0.2)
            fault.detail["full_after_s"] = round(time.monotonic() - t0, 1) if full else None
            time.sleep(self.rng.uniform(3, 8))  # held back: the socket and TCP buffers hold the stream
        finally:
            self.target.ctl("start_app")
        drained = helpers.wait_until_sync(lambda: r.metrics().get("orangepill_bridge_spool_full") == 0.0, 120, 0.2)
        fault.detail["unfull"] = drained
        fault.detail["exit_code_restore"] = r.terminate()
        r.start()
        r.wait_subscribed(60)

    # the end

    def drain(self, timeout: float = 300.0) -> dict[str, Any]:
        """Pause the simulator, wait until every spool is empty and the consumer's file stops growing."""
        self.sim_post("/pause")
        t0 = time.monotonic()
        stable_since, size = time.monotonic(), -1
        while time.monotonic() - t0 < timeout:
            depths = [r.metrics().get("orangepill_bridge_spool_depth") for r in self.replicas]
            new_size = self.consumer_file.stat().st_size if self.consumer_file.exists() else 0
            if new_size != size:
                size, stable_since = new_size, time.monotonic()
            if all(d == 0.0 for d in depths) and time.monotonic() - stable_since > 5:
                break
            time.sleep(0.5)
        return {"drain_s": round(time.monotonic() - t0, 1), "depths": depths}


def _schedule_kinds(rng: random.Random, kinds: tuple[str, ...] = KINDS) -> Iterator[str]:
    while True:
        order = list(kinds)
        rng.shuffle(order)
        yield from order


def soak(cfg: ChaosConfig, target: Target) -> dict[str, Any]:
    """Run one soak against ``target``; returns the report (also written as JSON + PNG)."""
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1, 2**31)
    _log(f"chaos soak: seed {seed} (replay with --seed {seed}), {cfg.minutes:g} min, {cfg.rate:g} events/s, "
         f"{cfg.replicas} replica(s), broker {target.kind} {target.node} ({target.url.split('@')[-1]})")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.time()
    s = Soak(cfg, target, workdir, seed)
    faults: list[Fault] = []
    sampler: Sampler | None = None
    drained: dict[str, Any] = {}
    error: str | None = None
    final: dict[str, Any] = {}
    try:
        s.start()
        t0 = time.time()
        sampler = Sampler(s.replicas, started)
        _log(f"running: bridge pid(s) {[r.pid for r in s.replicas]}, work dir {workdir}")
        kinds = _schedule_kinds(s.rng, cfg.kinds)
        deadline = t0 + cfg.minutes * 60
        next_at = t0 + s.rng.uniform(*cfg.gap)
        while True:
            seen = {f.kind for f in faults}
            if time.time() >= deadline and seen >= set(cfg.kinds):
                break
            if next_at > deadline and time.time() < deadline and seen >= set(cfg.kinds):
                time.sleep(max(0.0, min(deadline, next_at) - time.time()))
                continue
            time.sleep(max(0.0, next_at - time.time()))
            kind = next(kinds)
            fault = s.inject(kind)
            faults.append(fault)
            _log(f"fault {len(faults)}: {kind} {fault.detail} ({fault.end - fault.start:.1f}s)")
            next_at = max(fault.start + s.rng.uniform(*cfg.gap), fault.end + 3.0)
        time.sleep(10.0)  # the last fault's recovery is measured on live traffic
        _log("faults done; pausing the simulator and draining")
        drained = s.drain()
        for r in s.replicas:
            final[str(r.index)] = sampler.sample(r)
            final[str(r.index)]["metrics"] = {
                k.removeprefix("orangepill_bridge_"): v for k, v in r.metrics().items()
                if k.startswith("orangepill_bridge_") and not k.endswith(("_bucket", "_created"))
            }  # fmt: skip
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _log(f"ERROR: {error}")
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        stats = s.sim_stats() or {}
        s.stop()
        if target.kind == "local":
            with contextlib.suppress(Exception):
                asyncio.run(_delete(target.url, s.exchange, s.queue))
        for r in s.replicas:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(r.spool + suffix)
        report = analyse(
            cfg, seed, target, started, faults, sampler.samples if sampler else [], stats, s.consumer_file,
            drained, final, s.notes, error, str(workdir),
        )  # fmt: skip
        write(report, sampler.samples if sampler else [], faults, started, cfg.results_dir or RESULTS)
    return report


# -- analysis -------------------------------------------------------------------------------------


def _read_consumer(path: Path) -> list[tuple[float, int, float, str, int]]:
    rows = []
    with contextlib.suppress(OSError), path.open() as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5 or parts[1] == "None":
                continue
            with contextlib.suppress(ValueError):
                rows.append((float(parts[0]), int(parts[1]), float(parts[2]), parts[3], int(parts[4])))
    return rows


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))]


def _within_slope(points: dict[Any, list[tuple[float, float]]]) -> float | None:
    """Least-squares slope shared by several series, each with its own intercept (per process)."""
    num = den = 0.0
    for pts in points.values():
        if len(pts) < 3:
            continue
        mt = sum(t for t, _ in pts) / len(pts)
        mv = sum(v for _, v in pts) / len(pts)
        num += sum((t - mt) * (v - mv) for t, v in pts)
        den += sum((t - mt) ** 2 for t, _ in pts)
    return num / den if den > 0 else None


def analyse(
    cfg: ChaosConfig, seed: int, target: Target, started: float, faults: list[Fault],
    samples: list[dict[str, Any]], stats: dict[str, Any], consumer_file: Path, drained: dict[str, Any],
    final: dict[str, Any], notes: list[str], error: str | None, workdir: str,
) -> dict[str, Any]:  # fmt: skip
    """Every number of the report, from the consumer's file, the simulator's stats, the faults and samples."""
    rows = _read_consumer(consumer_file)
    realms = stats.get("realms", {})
    sent = sum(int(v.get("last_seq", 0)) for v in realms.values())
    first: dict[int, tuple[float, float]] = {}
    redelivered_dups = 0
    for recv, seq, sent_at, _mid, redelivered in rows:
        if seq in first:
            redelivered_dups += redelivered
        else:
            first[seq] = (recv, sent_at)
    received_seqs = sorted(first)
    lost = [q for q in range(1, sent + 1) if q not in first]

    # Lost seqs: their send time lies between their received neighbours'.
    kills = [f for f in faults if f.kind == "sigkill"]
    in_kill: list[int] = []
    elsewhere: list[dict[str, Any]] = []
    for q in lost:
        i = bisect.bisect_left(received_seqs, q)
        lo = first[received_seqs[i - 1]][1] if i > 0 else started
        hi = first[received_seqs[i]][1] if i < len(received_seqs) else time.time()
        if any(lo <= k.start + SIGKILL_AFTER and hi >= k.start - SIGKILL_BEFORE for k in kills):
            in_kill.append(q)
        else:
            near = min(faults, key=lambda f: abs(f.start - lo), default=None)
            elsewhere.append({
                "seq": q, "sent_between": [round(lo - started, 3), round(hi - started, 3)],
                "nearest_fault": None if near is None else
                {"kind": near.kind, "start": round(near.start - started, 3), "end": round(near.end - started, 3)},
            })  # fmt: skip
    per_kill = {}
    for k in kills:
        n = 0
        for q in in_kill:
            i = bisect.bisect_left(received_seqs, q)
            lo = first[received_seqs[i - 1]][1] if i > 0 else started
            if abs(lo - k.start) <= SIGKILL_BEFORE + SIGKILL_AFTER:
                n += 1
        per_kill[f"{k.start - started:.1f}"] = n

    # Recovery: from the fault's end to the first delivery of an event sent after it.
    by_sent = sorted((sa, recv) for recv, sa in first.values())
    sent_times = [sa for sa, _ in by_sent]
    recovery: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []
    for f in faults:
        i = bisect.bisect_right(sent_times, f.end)
        later = [recv for _, recv in by_sent[i : i + 2000]]
        t_rec = min(later) if later else None
        recovery.append({
            "kind": f.kind, "start": round(f.start - started, 2), "duration_s": round(f.end - f.start, 2),
            "recovery_after_end_s": None if t_rec is None else round(t_rec - f.end, 3),
            "recovery_from_start_s": None if t_rec is None else round(t_rec - f.start, 3),
        })  # fmt: skip
        windows.append((f.start - 0.5, (t_rec if t_rec is not None else f.end) + 1.0))
    windows.sort()
    starts = [w[0] for w in windows]

    def in_window(t: float) -> bool:
        i = bisect.bisect_right(starts, t)
        return i > 0 and t <= windows[i - 1][1]

    calm = [recv - sa for recv, sa in first.values() if not in_window(sa)]
    allv = [recv - sa for recv, sa in first.values()]

    by_kind: dict[str, int] = {}
    for f in faults:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
    worst = max((r for r in recovery if r["recovery_after_end_s"] is not None),
                key=lambda r: r["recovery_after_end_s"], default=None)  # fmt: skip

    # RSS / fds / tasks of the (leader) process series.
    settle = [(f.start - started, (f.end - started) + SETTLE_AFTER_FAULT) for f in faults]
    mem = _memory(cfg, samples, started, settle)
    ok_lost = not elsewhere
    return {
        "benchmark": "orangepill-bridge chaos soak",
        "started_at": datetime.fromtimestamp(started, tz=UTC).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "seed": seed,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "seed": seed},
        "broker": {"kind": target.kind, "node": target.node, "address": target.url.split("@")[-1]},
        "machine": _machine(),
        "error": error,
        "notes": notes,
        "workdir": workdir,
        "faults_by_kind": by_kind,
        "faults": [
            {**asdict(f), "start": round(f.start - started, 3), "end": round(f.end - started, 3)} for f in faults
        ],
        "events": {
            "sent": sent,
            "received": len(rows),
            "distinct": len(first),
            "lost": len(lost),
            "lost_in_sigkill_windows": len(in_kill),
            "lost_elsewhere": len(elsewhere),
            "lost_per_sigkill": per_kill,
            "lost_seqs_in_sigkill_windows": in_kill[:1000],
            "lost_elsewhere_detail": elsewhere[:200],
            "duplicates": len(rows) - len(first),
            "duplicates_redelivered_to_consumer": redelivered_dups,
            "sigkill_window_s": [-SIGKILL_BEFORE, SIGKILL_AFTER],
        },
        "recovery": {"longest": worst, "per_fault": recovery},
        "latency_ms": {
            "outside_fault_windows": {
                "n": len(calm),
                "p50": _ms(_pct(calm, 0.5)),
                "p99": _ms(_pct(calm, 0.99)),
                "max": _ms(max(calm, default=None)),
            },
            "all": {
                "n": len(allv),
                "p50": _ms(_pct(allv, 0.5)),
                "p99": _ms(_pct(allv, 0.99)),
                "max": _ms(max(allv, default=None)),
            },
        },
        "memory": mem,
        "drain": drained,
        "final": final,
        "ok": ok_lost and error is None,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 2)


def _memory(
    cfg: ChaosConfig, samples: list[dict[str, Any]], started: float, faults: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """RSS, descriptors and tasks of the bridge processes, with two slopes (see ``slope_method``)."""
    rows = [s for s in samples if s["rss"]]
    if not rows:
        return {}
    run_s = cfg.minutes * 60
    warmup = 300.0 if run_s >= 1500 else 0.2 * run_s
    windows = sorted(faults or [])

    def settled(t: float) -> bool:
        return not any(a <= t <= b for a, b in windows)

    every: dict[Any, list[tuple[float, float]]] = {}
    calm: dict[Any, list[tuple[float, float]]] = {}
    for s in rows:
        if s["t"] >= warmup and s["age"] >= PROCESS_WARMUP:
            point = (s["t"] / 3600.0, s["rss"] / 2**20)
            every.setdefault(s["pid"], []).append(point)
            if settled(s["t"]):
                calm.setdefault(s["pid"], []).append(point)

    def long_enough(series: dict[Any, list[tuple[float, float]]]) -> dict[Any, list[tuple[float, float]]]:
        return {pid: pts for pid, pts in series.items() if (pts[-1][0] - pts[0][0]) * 3600 >= MIN_SEGMENT}

    every, calm = long_enough(every), long_enough(calm)
    slope = _within_slope(every)
    calm_slope = _within_slope(calm)
    longest = max(every.values(), key=len, default=[])
    longest_slope = _within_slope({0: longest}) if longest else None
    per_replica = {}
    for index in sorted({s["replica"] for s in rows}):
        mine = [s for s in rows if s["replica"] == index]
        per_replica[str(index)] = {
            "rss_mb": {"start": round(mine[0]["rss"] / 2**20, 1), "peak": round(max(s["rss"] for s in mine) / 2**20, 1),
                       "end": round(mine[-1]["rss"] / 2**20, 1)},
            "processes": len({s["pid"] for s in mine}),
        }  # fmt: skip
    processes = []
    for pid in dict.fromkeys(s["pid"] for s in rows):
        mine = [s for s in rows if s["pid"] == pid]
        processes.append({
            "pid": pid, "replica": mine[0]["replica"],
            "from_s": round(mine[0]["t"], 1), "to_s": round(mine[-1]["t"], 1),
            "rss_mb_first_last_peak": [round(mine[0]["rss"] / 2**20, 1), round(mine[-1]["rss"] / 2**20, 1),
                                       round(max(s["rss"] for s in mine) / 2**20, 1)],
        })  # fmt: skip
    first = [s for s in rows if s["replica"] == 0]
    with_fds = [s for s in first if s["fds"] is not None]
    with_tasks = [s for s in first if s["tasks"] is not None]
    calm_minutes = sum((pts[-1][0] - pts[0][0]) * 60 for pts in calm.values())
    return {
        "replica": 0,
        "rss_mb": per_replica.get("0", {}).get("rss_mb"),
        "per_replica": per_replica,
        "slope_mb_per_hour": None if slope is None else round(slope, 3),
        "slope_settled_mb_per_hour": None if calm_slope is None else round(calm_slope, 3),
        "settled_minutes": round(calm_minutes, 1),
        "slope_method": f"least squares over the samples of every bridge process (all replicas) after {warmup:g} s of "
                        f"the run and {PROCESS_WARMUP:g} s of the process's life, processes with >= {MIN_SEGMENT:g} s "
                        "of them, one intercept per process (a restart resets RSS). 'settled' also leaves out each "
                        f"fault from its start to {SETTLE_AFTER_FAULT:g} s after its end (the outage's transient "
                        "memory and its release); null when no process lived that long",
        "longest_process": {"minutes": round((longest[-1][0] - longest[0][0]) * 60, 1) if longest else 0,
                            "slope_mb_per_hour": None if longest_slope is None else round(longest_slope, 3)},
        "processes": len({s["pid"] for s in rows}),
        "process_list": processes,
        "fds": {"start": with_fds[0]["fds"] if with_fds else None, "end": with_fds[-1]["fds"] if with_fds else None,
                "max": max((s["fds"] for s in with_fds), default=None)},
        "tasks": {"start": with_tasks[0]["tasks"] if with_tasks else None,
                  "end": with_tasks[-1]["tasks"] if with_tasks else None,
                  "max": max((s["tasks"] for s in with_tasks), default=None)},
    }  # fmt: skip


def _machine() -> dict[str, Any]:
    import importlib.metadata
    import platform

    packages = {}
    for name in ("aio-pika", "aiormq", "websockets", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    return {"cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version(), "kernel": platform.release(), "packages": packages}  # fmt: skip


# -- output ------------------------------------------------------------------------------------------


def write(report: dict[str, Any], samples: list[dict[str, Any]], faults: list[Fault], started: float,
          out_dir: Path) -> Path:  # fmt: skip
    """JSON (with the samples) and the PNG plot; prints the summary; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(started, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"chaos-{stamp}.json"
    report["plot"] = _plot(samples, faults, started, out_dir / f"chaos-{stamp}.png")
    report["samples"] = samples
    path.write_text(json.dumps(report, indent=1, default=str))
    report["json"] = str(path)
    print(summary(report), flush=True)
    _log(f"wrote {path}")
    return path


def _plot(samples: list[dict[str, Any]], faults: list[Fault], started: float, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(12, 6.5))
    colors = dict(zip(KINDS, plt.get_cmap("tab10").colors, strict=False))
    for rep in sorted({s["replica"] for s in samples}):
        rs = [s for s in samples if s["replica"] == rep and s["rss"]]
        ax1.plot([s["t"] / 60 for s in rs], [s["rss"] / 2**20 for s in rs], ".", ms=2, label=f"replica {rep} RSS")
        ds = [s for s in samples if s["replica"] == rep and s["depth"] is not None]
        ax2.plot([s["t"] / 60 for s in ds], [s["depth"] for s in ds], lw=0.8, label=f"replica {rep} spool depth")
    for ax in (ax1, ax2):
        for f in faults:
            ax.axvspan((f.start - started) / 60, (max(f.end, f.start + 1) - started) / 60,
                       color=colors[f.kind], alpha=0.35, lw=0)  # fmt: skip
    from matplotlib.patches import Patch

    ax1.legend(handles=[*ax1.get_legend_handles_labels()[0],
                        *[Patch(color=colors[k], alpha=0.35, label=k) for k in KINDS]],
               fontsize=7, ncol=5, loc="upper left")  # fmt: skip
    ax1.set_ylabel("RSS (MB)")
    ax2.set_ylabel("spool depth (events)")
    ax2.set_xlabel("minutes")
    ax1.set_title("orangepill-bridge chaos soak: bridge RSS and spool depth; shaded: faults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def summary(report: dict[str, Any]) -> str:
    """The printed report."""
    e, m, lat, rec = report["events"], report.get("memory", {}), report["latency_ms"], report["recovery"]
    longest = rec["longest"] or {}
    lines = [
        f"chaos soak: seed {report['seed']}, {report['duration_s']:.0f} s, broker {report['broker']['kind']} "
        f"{report['broker']['address']}",
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(report["faults_by_kind"].items())),
        f"events: sent {e['sent']:,}  received {e['received']:,}  distinct {e['distinct']:,}  LOST {e['lost']:,} "
        f"(in SIGKILL windows {e['lost_in_sigkill_windows']:,}, elsewhere {e['lost_elsewhere']:,})  "
        f"duplicates {e['duplicates']:,} ({e['duplicates_redelivered_to_consumer']:,} redelivered to the consumer)",
        f"longest recovery: {longest.get('recovery_after_end_s')} s after the end of {longest.get('kind')} "
        f"at {longest.get('start')} s ({longest.get('recovery_from_start_s')} s from its start)",
        f"latency outside fault windows: p50 {lat['outside_fault_windows']['p50']} ms  "
        f"p99 {lat['outside_fault_windows']['p99']} ms  max {lat['outside_fault_windows']['max']} ms "
        f"(n={lat['outside_fault_windows']['n']:,})",
    ]
    if m:
        lines += [
            f"RSS MB: start {m['rss_mb']['start']}  peak {m['rss_mb']['peak']}  end {m['rss_mb']['end']}  "
            f"slope {m['slope_mb_per_hour']} MB/h, settled {m['slope_settled_mb_per_hour']} MB/h over "
            f"{m['settled_minutes']} min, {m['processes']} process(es); longest process "
            f"{m['longest_process']['minutes']} min: {m['longest_process']['slope_mb_per_hour']} MB/h",
            f"fds: start {m['fds']['start']} end {m['fds']['end']} max {m['fds']['max']}   "
            f"asyncio tasks: start {m['tasks']['start']} end {m['tasks']['end']} max {m['tasks']['max']}",
        ]
    lines += [f"note: {n}" for n in report["notes"]]
    if report["error"]:
        lines.append(f"ERROR: {report['error']}")
    return "\n".join(lines)


def main(cfg: ChaosConfig) -> int:
    """``python -m bench chaos``: exit 0 when no event was lost outside the SIGKILL windows."""

    def _sigterm(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _sigterm)
    opener = private_target if cfg.broker == "private" else local_target
    with opener() as target:
        report = soak(cfg, target)
    return 0 if report["ok"] else 1
