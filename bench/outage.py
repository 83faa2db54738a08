"""Broker-outage benchmark (issue 3): RabbitMQ's app stopped while N events arrive, then the drain.

1. A bridge process (default settings, loopback, temp spool file) is connected and
   subscribed to a paused simulator; a durable queue ``bench.<random>.all`` is bound to ``#``.
2. Under an exclusive ``flock /tmp/orangepill-broker.lock``: ``rabbitmqctl stop_app``;
   the simulator sends N events at full speed; we record the bridge's peak RSS and
   the spool file size once all N are in the spool; then ``rabbitmqctl start_app`` and
   ``rabbitmqctl await_startup`` (always, in a ``finally``), and the lock is released.
3. The drain: time until the bridge's spool is empty (every event confirmed by
   RabbitMQ), and until a consumer has every seq 1..N from the queue.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common
from bench.common import KEY, BridgeProcess, RssSampler, Worker
from bench.workers import consumer_main, simulator_main
from tests.helpers import rabbitmqctl


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def restore_broker() -> float:
    """``start_app``, then wait until the broker has started; returns the seconds it took."""
    t0 = time.monotonic()
    try:
        rabbitmqctl("start_app")
    finally:
        # Even if start_app reported an error, wait for whatever startup is under way.
        try:
            rabbitmqctl("await_startup", "--timeout", "120", timeout=150)
        except Exception as exc:
            _log(f"await_startup failed ({exc}); checking with a connection")
            _wait_amqp(120)
    return time.monotonic() - t0


def _wait_amqp(timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 5672), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("RabbitMQ did not come back within the timeout")


def _sigterm(_signum: int, _frame: Any) -> None:
    # Turn SIGTERM into an exception so that every ``finally`` (start_app!) runs.
    raise SystemExit(143)


def _ingest_with_broker_down(sim: Worker, bridge: BridgeProcess, count: int, result: dict[str, Any]) -> float:
    """Stop RabbitMQ, let the simulator send everything into the spool, start RabbitMQ; returns when it was back."""
    rss_before = common.rss_bytes(bridge.pid)
    _log(f"bridge ready (RSS {rss_before / 2**20:.1f} MB); taking {common.LOCK_PATH}")
    with common.broker_lock(exclusive=True):
        t_lock = time.monotonic()
        t_stopped: float | None = None
        _log("rabbitmqctl stop_app")
        try:
            rabbitmqctl("stop_app")
            t_stopped = time.monotonic()
            result["ingest"] = _ingest(sim, bridge, count, t_stopped, rss_before)
            _log(f"ingest: {result['ingest']}")
        finally:
            _log("rabbitmqctl start_app")
            restart = restore_broker()
            t_started = time.monotonic()
            result["broker_stopped_seconds"] = round(t_started - t_stopped, 2) if t_stopped is not None else None
            result["lock_held_seconds"] = round(t_started - t_lock, 2)
            result["broker_restart_seconds"] = round(restart, 2)
            _log(f"broker back after {restart:.1f}s (stopped for {result['broker_stopped_seconds']}s)")
    return t_started


def _ingest(sim: Worker, bridge: BridgeProcess, count: int, t_stopped: float, rss_before: int) -> dict[str, Any]:
    sampler = RssSampler(bridge.pid, 0.2)
    cpu0 = common.cpu_seconds(bridge.pid)
    sim.send(cmd="go")
    _log(f"broker stopped; simulator sends {count:,} events")
    sent = sim.expect("sent_all", 3600)
    _log(f"simulator sent {sent['sent']:,} in {sent['seconds']:.1f}s; waiting for the spool")
    deadline = time.monotonic() + 600
    depth = 0.0
    while time.monotonic() < deadline:
        m = bridge.metrics()
        depth = m.get("orangepill_bridge_spool_depth", 0.0)
        if m.get("orangepill_bridge_events_received_total", 0.0) >= count and depth >= count:
            break
        time.sleep(0.2)
    t_ingested = time.monotonic()
    time.sleep(0.5)  # the last group commit reaches the file
    samples = sampler.stop()
    return {
        "seconds": round(t_ingested - t_stopped, 2),
        "events_per_s": round(count / (t_ingested - t_stopped), 1),
        "simulator_seconds": round(sent["seconds"], 2),
        "spool_depth": depth,
        "spool_file_mb": round(common.spool_bytes(bridge.spool) / 2**20, 1),
        "spool_file_bytes_per_event": round(common.spool_bytes(bridge.spool) / count, 1),
        "bridge_rss_before_mb": round(rss_before / 2**20, 1),
        "bridge_rss_peak_mb": round(common.peak_rss_bytes(bridge.pid) / 2**20, 1),
        "bridge_rss_sampled_max_mb": round(max(samples, default=0) / 2**20, 1),
        "bridge_rss_end_mb": round(samples[-1] / 2**20, 1) if samples else None,
        "bridge_cpu_s": round(common.cpu_seconds(bridge.pid) - cpu0, 2),
    }


def _drain(
    bridge: BridgeProcess, consumer: Worker, count: int, t_started: float, result: dict[str, Any]
) -> bool:
    """Wait until the spool is empty and the consumer has everything; returns whether every event arrived."""
    cpu1 = common.cpu_seconds(bridge.pid)
    sampler = RssSampler(bridge.pid, 0.5)
    t_reconnected = None
    t_empty = None
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        m = bridge.metrics()
        if t_reconnected is None and m.get("orangepill_bridge_amqp_connected") == 1.0:
            t_reconnected = time.monotonic()
        if m.get("orangepill_bridge_spool_depth", 1.0) == 0.0:
            t_empty = time.monotonic()
            break
        time.sleep(0.2)
    drain_cpu = common.cpu_seconds(bridge.pid) - cpu1
    got = consumer.expect("done", 3600)
    t_consumed = time.monotonic()
    samples = sampler.stop()
    publish_span = (t_empty - (t_reconnected or t_started)) if t_empty else None
    result["drain"] = {
        "reconnect_seconds": round(t_reconnected - t_started, 2) if t_reconnected else None,
        "spool_empty_seconds_after_start_app": round(t_empty - t_started, 2) if t_empty else None,
        "publish_events_per_s": round(count / publish_span, 1) if publish_span else None,
        "all_consumed_seconds_after_start_app": round(t_consumed - t_started, 2),
        "consumer_events_per_s": round((got["distinct"] - 1) / (got["last_at"] - got["first_at"]), 1)
        if got["last_at"] > got["first_at"] else None,
        "bridge_cpu_s": round(drain_cpu, 2),
        "bridge_cpu_s_per_100k": round(drain_cpu / count * 100_000, 2),
        "bridge_rss_sampled_max_mb": round(max(samples, default=0) / 2**20, 1),
        "bridge_rss_peak_mb_whole_run": round(common.peak_rss_bytes(bridge.pid) / 2**20, 1),
        "spool_file_mb_after_drain": round(common.spool_bytes(bridge.spool) / 2**20, 1),
    }
    result["consumer"] = {k: got[k] for k in ("complete", "received", "distinct", "duplicates", "missing",
                                               "missing_sample", "out_of_range")}  # fmt: skip
    result["bridge_metrics"] = {
        k: bridge.metrics().get(f"orangepill_bridge_{k}")
        for k in ("events_received_total", "events_published_total", "publish_failures_total",
                  "amqp_connects_total", "spool_depth")
    }  # fmt: skip
    _log(f"drain: {result['drain']}")
    _log(f"consumer: {result['consumer']}")
    return bool(got["complete"] and got["missing"] == 0)


def _write_report(out_dir: Path, started: float, count: int, info: dict[str, Any], ok: bool,
                  result: dict[str, Any]) -> None:  # fmt: skip
    report = {
        "benchmark": "orangepill-bridge broker outage",
        "started_at": datetime.fromtimestamp(started, tz=UTC).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "ok": ok,
        **result,
    }
    stamp = datetime.fromtimestamp(started, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"outage-{count}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    (out_dir / "outage-latest.json").write_text(json.dumps(report, indent=2))
    _log(f"wrote {path} ({report['duration_s']} s); every event delivered: {ok}")


def main(*, count: int, uvloop_on: bool = True, results_dir: Path | None = None) -> int:
    """Run the outage benchmark with ``count`` events; write ``bench/results/outage-*.json``."""
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.time()
    out_dir = results_dir or common.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.machine()
    exchange = common.new_exchange()
    queue = f"{exchange}.all"
    tmp = tempfile.TemporaryDirectory(prefix="bench-outage-")
    workers: list[Worker] = []
    bridge: BridgeProcess | None = None
    result: dict[str, Any] = {"count": count, "loop": "uvloop" if uvloop_on else "asyncio"}
    ok = False
    try:
        common.declare(exchange, queue)
        sim = Worker("simulator", simulator_main, KEY, 0.0, count)
        workers.append(sim)
        port = sim.expect("ready", 30)["port"]
        bridge = BridgeProcess(f"ws://127.0.0.1:{port}", exchange, uvloop_on=uvloop_on, spool_dir=tmp.name)
        bridge.wait_ready(30)
        sim.expect("subscribed", 30)
        t_started = _ingest_with_broker_down(sim, bridge, count, result)
        consumer = Worker("consumer", consumer_main, queue, count, False, 3600)
        workers.append(consumer)
        ok = _drain(bridge, consumer, count, t_started, result)
    finally:
        try:
            if bridge is not None:
                result["bridge_exit_code"] = bridge.stop()
                result["bridge_log_tail"] = bridge.tail(1500)
            for w in reversed(workers):
                w.close()
        finally:
            common.delete(exchange, queue)
            tmp.cleanup()
    _write_report(out_dir, started, count, info, ok, result)
    return 0 if ok else 1
