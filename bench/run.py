"""The end-to-end benchmark: ceiling, naive and bridge, each on uvloop and on the default loop, and a Node.js peer.

Every measurement is a fresh set of processes on a fresh exchange ``bench.<random>``:
the consumer (its own process, counting on a durable queue bound to ``#``), the
simulator (its own process) and the subject (the ceiling publisher, the naive bridge,
``orangepill-bridge run``, or the Node.js peer ``bench/node-peer/peer.js``). CPU is read
from ``/proc/<pid>/stat`` (utime + stime) of the subject and of the broker's ``beam.smp``;
RSS from the subject only. The Node peer runs once, on Node's own loop (``loop`` = ``node``);
if ``node`` or the npm registry is missing, the bench says so and skips it. ``--only pypeer``
adds the Node peer's 40 lines written in Python with the same libraries as the bridge
(websockets + aiormq): what that stack reaches before any of the bridge's own work.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common
from bench.common import KEY, BridgeProcess, RssSampler, Worker
from bench.floor import relay_floor
from bench.shapes import consumer_cost
from bench.workers import ceiling_main, consumer_main, naive_main, node_main, pypeer_main, simulator_main

SUBJECTS = ("ceiling", "naive", "node", "bridge")
NODE_LOOP = "node"
LOOPS = ("uvloop", "asyncio")
LATENCY_RATE = 1000.0
LOW_RATE = 100.0  # the bridge's "typical" load: CPU share of one core (target < 2 %)
LOW_SECONDS = 20.0
WINDOW = 256
MIN_SECONDS = 10.0

# Throughput phases size N from a short pilot so that the main run lasts >= 10 s.
_PILOT = {"ceiling": 4000, "naive": 2000, "node": 4000, "pypeer": 4000, "bridge": 4000}
_N_MIN, _N_MAX = 10_000, 400_000


def _mb(n: float) -> float:
    return round(n / 1024**2, 1)


def measure(
    subject: str, loop: str, *, count: int, rate: float, latency: bool, timeout: float,
    on_go: Callable[[int], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One measurement: ``count`` events of ``subject`` at ``rate`` (0 = full speed).

    ``on_go(pid)`` runs right after the start signal (the profiler attaches there).
    """
    with common.broker_lock(exclusive=False):
        return _measure(subject, loop, count=count, rate=rate, latency=latency, timeout=timeout, on_go=on_go)


# Long (~100 lines) on purpose: one measurement is one straight script (start workers, wait for each
# stage, sample, tear down in finally); split, its timeline would be spread over several functions.
def _measure(
    subject: str, loop: str, *, count: int, rate: float, latency: bool, timeout: float,
    on_go: Callable[[int], Any] | None,
) -> dict[str, Any]:  # fmt: skip
    uv = loop == "uvloop"
    exchange = common.new_exchange()
    queue = f"{exchange}.all"
    common.declare(exchange, queue)
    workers: list[Worker] = []
    bridge: BridgeProcess | None = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-")
    result: dict[str, Any] = {"subject": subject, "loop": loop, "count": count, "rate": rate}
    try:
        consumer = Worker("consumer", consumer_main, queue, count, latency, timeout)
        workers.append(consumer)
        consumer.expect("ready", 30)
        sim: Worker | None = None
        if subject == "ceiling":
            pub = Worker("ceiling", ceiling_main, exchange, count, rate, WINDOW, uv)
            workers.append(pub)
            pub.expect("ready", 30)
            pid, starter = pub.pid, pub
        else:
            sim = Worker("simulator", simulator_main, KEY, rate, count)
            workers.append(sim)
            port = sim.expect("ready", 30)["port"]
            url = f"ws://127.0.0.1:{port}"
            if subject == "naive":
                pub = Worker("naive", naive_main, url, KEY, exchange, count, uv)
                workers.append(pub)
                pub.expect("ready", 30)
                pid = pub.pid
            elif subject == "pypeer":
                pub = Worker("pypeer", pypeer_main, url, KEY, exchange, count, uv)
                workers.append(pub)
                pub.expect("ready", 30)
                pid = pub.pid
            elif subject == "node":
                pub = Worker("node", node_main, str(common.NODE_PEER), url, KEY, exchange, count)
                workers.append(pub)
                pid = pub.expect("ready", 30)["pid"]  # node's own pid, not its Python relay's
            else:
                bridge = BridgeProcess(url, exchange, uvloop_on=uv, spool_dir=tmp.name)
                bridge.wait_ready(30)
                pid = bridge.pid
            sim.expect("subscribed", 30)
            starter = sim
        others = {"consumer": consumer.pid, "broker": common.broker_pid()}
        if sim is not None:
            others["simulator"] = sim.pid
        busy0 = common.busy_cpu_seconds()
        cpu0 = common.cpu_seconds(pid)
        cpu_others0 = {k: common.cpu_seconds(v) for k, v in others.items() if v}
        sampler = RssSampler(pid)
        t0 = time.time()
        starter.send(cmd="go")
        hook = on_go(pid) if on_go is not None else None
        got = consumer.expect("done", timeout + 5)
        t1 = time.time()
        if hook is not None:
            result["profile"] = hook()
        cpu = common.cpu_seconds(pid) - cpu0
        cpu_others = {k: round(common.cpu_seconds(others[k]) - v, 3) for k, v in cpu_others0.items()}  # type: ignore[index]
        busy = common.busy_cpu_seconds() - busy0
        samples = sampler.stop()
        peak = common.peak_rss_bytes(pid)
        span = got["last_at"] - got["first_at"]
        n = got["distinct"]
        result.update(
            complete=got["complete"],
            received=got["received"],
            distinct=n,
            duplicates=got["duplicates"],
            missing=got["missing"],
            seconds_first_to_last=round(span, 3),
            seconds_total=round(t1 - t0, 3),
            events_per_s=round((n - 1) / span, 1) if span > 0 and n > 1 else None,
            latency=got["latency"],
            cpu_s=round(cpu, 3),
            cpu_s_per_100k=round(cpu / n * 100_000, 2) if n else None,
            cpu_us_per_event=_per_event_us(cpu, n),
            broker_cpu_us_per_event=_per_event_us(cpu_others.get("broker"), n),
            cpu_other_processes_s=cpu_others,
            # Machine-wide busy CPU not spent by the subject, consumer, simulator or broker:
            # other users of this machine (a large value means a disturbed measurement).
            cpu_foreign_s=round(busy - cpu - sum(cpu_others.values()), 2),
            cpu_machine_busy_s=round(busy, 2),
            wall_s=round(t1 - t0, 3),
            rss_peak_mb=_mb(peak),
            rss_steady_mb=_mb(statistics.median(samples[len(samples) // 2 :])) if samples else None,
            rss_last_mb=_mb(samples[-1]) if samples else None,
        )
        if bridge is not None:
            m = bridge.metrics()
            result["bridge_metrics"] = {
                k: m.get(f"orangepill_bridge_{k}")
                for k in ("events_received_total", "events_published_total", "publish_failures_total", "spool_depth")
            }
            result["spool_file_mb"] = _mb(common.spool_bytes(bridge.spool))
        return result
    finally:
        try:
            if bridge is not None:
                result["bridge_exit_code"] = bridge.stop()
            for w in reversed(workers):
                w.close()
        finally:
            common.delete(exchange, queue)
            tmp.cleanup()


def _per_event_us(cpu_s: float | None, n: int) -> float | None:
    """CPU microseconds per event, or None when unknown."""
    if cpu_s is None or not n or math.isnan(cpu_s):
        return None
    return round(cpu_s / n * 1e6, 1)


def _log(text: str) -> None:
    print(text, flush=True)


def throughput(subject: str, loop: str, smoke: bool, count: int | None) -> dict[str, Any]:
    """Full-speed run, N sized from a pilot so that it lasts >= 10 s."""
    if smoke:
        return measure(subject, loop, count=count or 1500, rate=0, latency=False, timeout=60)
    if count is None:
        pilot = measure(subject, loop, count=_PILOT[subject], rate=0, latency=False, timeout=60)
        rate = pilot["events_per_s"] or 1000.0
        count = int(min(_N_MAX, max(_N_MIN, math.ceil(rate * (MIN_SECONDS * 1.4) / 1000) * 1000)))
        _log(f"    pilot {subject}/{loop}: {rate:,.0f}/s -> N={count:,}")
    res = measure(subject, loop, count=count, rate=0, latency=False, timeout=max(120, count / 300))
    if res["seconds_first_to_last"] < MIN_SECONDS and count < _N_MAX:
        count = int(min(_N_MAX, math.ceil(count * (MIN_SECONDS + 2) / max(res["seconds_first_to_last"], 0.5))))
        _log(f"    {subject}/{loop} ran only {res['seconds_first_to_last']:.1f}s; again with N={count:,}")
        res = measure(subject, loop, count=count, rate=0, latency=False, timeout=max(120, count / 300))
    return res


def latency(subject: str, loop: str, smoke: bool) -> dict[str, Any]:
    """Fixed offered rate (1,000/s) for >= 10 s; latency = consumer receipt - sent_at."""
    count = 300 if smoke else int(LATENCY_RATE * (MIN_SECONDS + 1))
    return measure(subject, loop, count=count, rate=LATENCY_RATE, latency=True, timeout=60)


def low_rate(subject: str, loop: str, smoke: bool) -> dict[str, Any]:
    """The bridge at 100 events/s for 20 s: its CPU as a share of one core."""
    count = 200 if smoke else int(LOW_RATE * LOW_SECONDS)
    res = measure(subject, loop, count=count, rate=LOW_RATE, latency=False, timeout=120)
    span = res["wall_s"] or 0.0
    res["cpu_percent_of_core"] = round(100.0 * res["cpu_s"] / span, 2) if span > 0 else None
    return res


def paired(rounds: int, smoke: bool, count: int | None) -> dict[str, Any]:
    """The bridge (uvloop) against the Node peer in alternating full-speed runs of the same N.

    The VM's speed drifts by up to 2x over a day, and a lone run of each subject minutes
    apart compares two different machines. Pairs run back to back, node then bridge, and
    the median of the per-pair ratios is the figure to quote.
    """
    n = count or (1500 if smoke else 60_000)
    pairs: list[dict[str, Any]] = []
    for i in range(rounds):
        node = measure("node", NODE_LOOP, count=n, rate=0, latency=False, timeout=max(120, n / 300))
        bridge = measure("bridge", "uvloop", count=n, rate=0, latency=False, timeout=max(120, n / 300))
        pair = {
            "node_events_per_s": node["events_per_s"],
            "bridge_events_per_s": bridge["events_per_s"],
            "bridge_over_node": _ratio(bridge["events_per_s"], node["events_per_s"]),
            "node_cpu_us_per_event": node["cpu_us_per_event"],
            "bridge_cpu_us_per_event": bridge["cpu_us_per_event"],
            "node_broker_cpu_us_per_event": node["broker_cpu_us_per_event"],
            "bridge_broker_cpu_us_per_event": bridge["broker_cpu_us_per_event"],
            "complete": node["complete"] and bridge["complete"],
            "foreign_cpu_s": round((node["cpu_foreign_s"] or 0) + (bridge["cpu_foreign_s"] or 0), 2),
        }
        pairs.append(pair)
        _log(
            f"  pair {i + 1}/{rounds}: node {_fmt(node['events_per_s'])}/s, bridge {_fmt(bridge['events_per_s'])}/s "
            f"(ratio {_fmt(pair['bridge_over_node'], '.2f')}; CPU us/ev {_fmt(node['cpu_us_per_event'], '.1f')} / "
            f"{_fmt(bridge['cpu_us_per_event'], '.1f')})"
        )

    def median(key: str) -> float | None:
        values = [p[key] for p in pairs if p[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "count": n,
        "pairs": pairs,
        "median": {key: median(key) for key in pairs[0] if key not in ("complete", "foreign_cpu_s")} if pairs else {},
        "complete": all(p["complete"] for p in pairs),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios bridge/ceiling, bridge/naive and bridge/node for each loop, and the targets."""
    by = {(r["subject"], r["loop"]): r for r in rows}
    node = by.get(("node", NODE_LOOP))
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for loop in LOOPS:
        b, c, n = by.get(("bridge", loop)), by.get(("ceiling", loop)), by.get(("naive", loop))
        if not b:
            continue
        ratios[loop] = {
            "bridge_over_ceiling": _ratio(b["events_per_s"], c["events_per_s"]) if c else None,
            "bridge_over_naive": _ratio(b["events_per_s"], n["events_per_s"]) if n else None,
            "bridge_over_node": _ratio(b["events_per_s"], node["events_per_s"]) if node else None,
        }
        if (py := by.get(("pypeer", loop))) is not None:
            # The Node peer's 40 lines in Python with the same libraries: what the stack itself reaches.
            ratios[loop]["pypeer_over_node"] = _ratio(py["events_per_s"], node["events_per_s"]) if node else None
            ratios[loop]["bridge_over_pypeer"] = _ratio(b["events_per_s"], py["events_per_s"])
        r_node = ratios[loop]["bridge_over_node"]
        cpu_ev = b.get("cpu_us_per_event")
        broker_ev, node_broker_ev = b.get("broker_cpu_us_per_event"), (node or {}).get("broker_cpu_us_per_event")
        r = ratios[loop]["bridge_over_ceiling"]
        p99 = (b.get("latency") or {}).get("p99_ms")
        rss = b.get("rss_steady_mb")
        targets[loop] = {
            "throughput_ge_0.8_ceiling": {"value": r, "met": r is not None and r >= 0.8},
            "throughput_ge_1.0_node": {"value": r_node, "met": r_node is not None and r_node >= 1.0},
            "cpu_per_event_le_80us": {"value": cpu_ev, "met": cpu_ev is not None and cpu_ev <= 80.0},
            "broker_cpu_per_event_le_node": {
                "value": _ratio(broker_ev, node_broker_ev),  # bridge's broker cost / the peer's
                "met": broker_ev is not None and node_broker_ev is not None and broker_ev <= node_broker_ev,
            },
            "p99_lt_5ms_at_1000_per_s": {"value": p99, "met": p99 is not None and p99 < 5.0},
            "rss_steady_lt_80mb": {"value": rss, "met": rss is not None and rss < 80.0},
            "cpu_at_100_per_s_lt_2pct_core": {
                "value": b.get("cpu_percent_at_100_per_s"),
                "met": (b.get("cpu_percent_at_100_per_s") or 100.0) < 2.0,
                # The same measurement of the references: what the cost is made of on this machine.
                "node_peer": (node or {}).get("cpu_percent_at_100_per_s"),
                "ceiling_uvloop": (by.get(("ceiling", "uvloop")) or {}).get("cpu_percent_at_100_per_s"),
            },
            "rss_peak_mb": b.get("rss_peak_mb"),
        }
    return {"ratios": ratios, "targets": targets}


def judge_pairs(summary: dict[str, Any], pair_report: dict[str, Any]) -> None:
    """The two targets against the Node peer, judged again on the median of the alternating pairs.

    The table's rows of node and bridge run minutes apart, and the VM's speed drifts in between;
    the pairs run back to back. Both verdicts are kept: ``met`` (the table) and ``met_paired``.
    """
    med = pair_report.get("median") or {}
    targets = summary["targets"].get("uvloop")
    if not targets or not pair_report.get("pairs"):
        return
    ratio = med.get("bridge_over_node")
    broker = _ratio(med.get("bridge_broker_cpu_us_per_event"), med.get("node_broker_cpu_us_per_event"))
    for name, value, met in (
        ("throughput_ge_1.0_node", ratio, ratio is not None and ratio >= 1.0),
        ("broker_cpu_per_event_le_node", broker, broker is not None and broker <= 1.0),
    ):
        targets[name].update(value_paired=value, met_paired=met)


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, spec)


def table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The results as printed."""
    head = (
        f"{'row':<8} {'loop':<8} {'events/s':>9} {'N':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'CPU s/100k':>10} {'CPU us/ev':>9} {'broker us/ev':>12} {'peak RSS MB':>11} {'steady RSS MB':>13} "
        f"{'CPU % at 100/s':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = r.get("latency") or {}
        lines.append(
            f"{r['subject']:<8} {r['loop']:<8} {_fmt(r['events_per_s']):>9} {_fmt(r['count']):>8} "
            f"{_fmt(lat.get('p50_ms'), '.2f'):>7} {_fmt(lat.get('p99_ms'), '.2f'):>7} "
            f"{_fmt(lat.get('max_ms'), '.1f'):>7} "
            f"{_fmt(r['cpu_s_per_100k'], '.1f'):>10} {_fmt(r.get('cpu_us_per_event'), '.1f'):>9} "
            f"{_fmt(r.get('broker_cpu_us_per_event'), '.1f'):>12} {_fmt(r['rss_peak_mb'], '.1f'):>11} "
            f"{_fmt(r.get('rss_steady_mb'), '.1f'):>13} {_fmt(r.get('cpu_percent_at_100_per_s'), '.2f'):>14}"
        )
    lines.append("")
    for loop, ratio in summary["ratios"].items():
        lines.append(
            f"{loop:<8} bridge/ceiling = {_fmt(ratio['bridge_over_ceiling'], '.2f')}   "
            f"bridge/naive = {_fmt(ratio['bridge_over_naive'], '.2f')}   "
            f"bridge/node = {_fmt(ratio['bridge_over_node'], '.2f')}"
            + (
                f"   pypeer/node = {_fmt(ratio['pypeer_over_node'], '.2f')}   "
                f"bridge/pypeer = {_fmt(ratio['bridge_over_pypeer'], '.2f')}"
                if "bridge_over_pypeer" in ratio
                else ""
            )
        )
    for loop, t in summary["targets"].items():
        marks = []
        for name, item in t.items():
            if isinstance(item, dict):
                mark = f"{name}: {_fmt(item['value'], '.2f')} {'met' if item['met'] else 'MISSED'}"
                if "met_paired" in item:
                    mark += f" (pairs: {_fmt(item['value_paired'], '.2f')} {'met' if item['met_paired'] else 'MISSED'})"
                marks.append(mark)
        lines.append(f"targets {loop:<8} " + "; ".join(marks))
    floor = summary.get("relay_floor_at_100_per_s")
    if floor is not None:
        low = {f"{r['subject']}/{r['loop']}": r.get("cpu_percent_at_100_per_s") for r in rows}
        refs = ", ".join(f"{name} {_fmt(v, '.2f')} %" for name, v in low.items() if v is not None)
        why = f" ({floor['skipped']})" if "skipped" in floor else ""
        lines.append(
            f"CPU at 100/s, share of one core: {refs}; a compiled relay (socat, one wake-up per event, no AMQP) "
            f"{_fmt(floor['cpu_percent_of_core'], '.2f')} %{why}"
        )
    shape = summary.get("consumer_cost_by_shape")
    if shape is not None and "skipped" not in shape:
        lines.append(
            f"the consumer's CPU per message: {_fmt(shape['contract']['consumer_cpu_us_per_msg'], '.1f')} us on the "
            f"contract's messages, {_fmt(shape['node_peer']['consumer_cpu_us_per_msg'], '.1f')} us on the Node "
            f"peer's (4 properties, no headers); median of {shape['rounds']} alternating drains of {shape['count']:,}"
        )
    return "\n".join(lines)


def merge(tput: dict[str, Any], lat: dict[str, Any]) -> dict[str, Any]:
    """One row: throughput, CPU and peak RSS from the full-speed run; latency and steady RSS at 1,000/s."""
    return {
        "subject": tput["subject"],
        "loop": tput["loop"],
        "count": tput["count"],
        "events_per_s": tput["events_per_s"],
        "complete": tput["complete"] and lat["complete"],
        "latency": lat["latency"],
        "cpu_s_per_100k": tput["cpu_s_per_100k"],
        "cpu_s_per_100k_at_1000_per_s": lat["cpu_s_per_100k"],
        "cpu_us_per_event": tput["cpu_us_per_event"],
        "broker_cpu_us_per_event": tput["broker_cpu_us_per_event"],
        "cpu_us_per_event_at_1000_per_s": lat["cpu_us_per_event"],
        "broker_cpu_us_per_event_at_1000_per_s": lat["broker_cpu_us_per_event"],
        "rss_peak_mb": tput["rss_peak_mb"],
        "rss_steady_mb": lat["rss_steady_mb"],
        "throughput_run": tput,
        "latency_run": lat,
    }


# ~55 lines: a flat list of the measurements the report holds, in order; nothing to factor out.
def main(*, smoke: bool = False, results_dir: Path | None = None, only: list[str] | None = None,
         loops: list[str] | None = None, count: int | None = None, pairs: int = 3) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark, print the table, write the JSON; return the report."""
    started = time.time()
    out_dir = results_dir or common.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.machine()
    _log(f"machine: {info['cores']} cores, {info['cpu_model']}, Python {info['python']}, RabbitMQ {info['rabbitmq']}")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for subject in only or SUBJECTS:
        if subject == "node":
            reason = common.node_peer_ready()
            if reason is not None:
                skipped["node"] = reason
                _log(f"  node     skipped: {reason}")
                continue
        for loop in [NODE_LOOP] if subject == "node" else loops or LOOPS:
            _log(f"  {subject:<8} {loop:<8} throughput ...")
            t = throughput(subject, loop, smoke, count)
            rate = t["events_per_s"] or 0
            _log(f"  {subject:<8} {loop:<8} {rate:,.0f}/s over {t['seconds_first_to_last']:.1f}s; latency ...")
            lat = latency(subject, loop, smoke)
            row = merge(t, lat)
            if subject in ("bridge", "node", "pypeer") or (subject == "ceiling" and loop == "uvloop"):
                # The Node peer and raw aio-pika at 100/s are the reference for the bridge's low-rate cost.
                low = low_rate(subject, loop, smoke)
                row["cpu_percent_at_100_per_s"] = low["cpu_percent_of_core"]
                row["low_rate_run"] = low
                _log(f"  {subject:<8} {loop:<8} at 100/s: {low['cpu_percent_of_core']} % of one core")
            rows.append(row)
            p = lat["latency"] or {}
            _log(f"  {subject:<8} {loop:<8} p50 {p.get('p50_ms')} ms p99 {p.get('p99_ms')} ms")
    summary = summarise(rows)
    if any(r["subject"] == "bridge" for r in rows):
        # What one wake-up per event costs a compiled relay here: the floor of the 100/s figure.
        try:
            floor = relay_floor(rate=LOW_RATE, count=200 if smoke else int(LOW_RATE * LOW_SECONDS))
        except (OSError, subprocess.SubprocessError) as exc:  # a reference row: never lose the run over it
            floor = {"skipped": f"socat relay failed: {exc}", "cpu_percent_of_core": None}
        summary["relay_floor_at_100_per_s"] = floor
        _log(f"  socat relay at 100/s: {floor['cpu_percent_of_core']} % of one core {floor.get('skipped', '')}")
        for t in summary["targets"].values():
            t["cpu_at_100_per_s_lt_2pct_core"]["socat_relay"] = floor["cpu_percent_of_core"]
    if any(r["subject"] == "bridge" for r in rows) and any(r["subject"] == "node" for r in rows):
        # The contract's properties and headers cost the consumer too: its share of the end-to-end gap.
        try:
            shape = consumer_cost(2000, 1) if smoke else consumer_cost()
        except Exception as exc:  # a reference row: never lose the run over it
            shape = {"skipped": f"consumer cost by shape failed: {type(exc).__name__}: {exc}"}
        summary["consumer_cost_by_shape"] = shape
        if "skipped" not in shape:
            ours, peer = shape["contract"], shape["node_peer"]
            _log(
                f"  consumer CPU per message: contract {ours['consumer_cpu_us_per_msg']} us, Node peer's shape "
                f"{peer['consumer_cpu_us_per_msg']} us (header frames {ours['header_frame_bytes']} / "
                f"{peer['header_frame_bytes']} B)"
            )
    pair_report: dict[str, Any] | None = None
    if pairs and "node" not in skipped and (only is None or {"node", "bridge"} <= set(only)):
        _log(f"  node vs bridge/uvloop: {pairs} alternating pairs ...")
        pair_report = paired(pairs, smoke, count)
        summary["paired"] = pair_report
        judge_pairs(summary, pair_report)
    report = {
        "benchmark": "orangepill-bridge end-to-end",
        "mode": "smoke" if smoke else "full",
        "started_at": datetime.fromtimestamp(started, tz=UTC).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "setup": {
            "amqp_url": "amqp://guest:***@127.0.0.1:5672/",
            "messages": (
                "persistent, to a durable topic exchange with alternate exchange; "
                "consumer queue durable, bound to '#'"
            ),
            "ceiling_confirm_window": WINDOW,
            "latency_offered_rate_per_s": LATENCY_RATE,
            "consumer": "own process, aiormq, uvloop, no_ack",
            "simulator": "bridge.simulator in its own process, uvloop, rate=0 (full speed) or 1000/s",
            "bridge": "python -m bridge run, default settings except loopback addresses and a temp spool file",
            "node_peer": (
                "bench/node-peer/peer.js on Node's loop: ws + amqplib confirm channel, 256 unconfirmed publishes, "
                "persistent, no spool, no mandatory flag, no headers"
            ),
            "cpu": (
                "utime+stime from /proc/<pid>/stat of the subject process, from 'go' to the consumer's last event; "
                "broker = the oldest beam.smp (pgrep -o), which also carries the consumer's deliveries"
            ),
            "rss_peak": "VmHWM of the subject process during the full-speed run",
            "rss_steady": "median RSS over the second half of the 1,000/s run",
            "cpu_at_100_per_s": (
                "utime+stime of the subject over 2,000 events offered at 100/s, as a share of one core: the bridge "
                "(both loops), and as references the Node peer and raw aio-pika (uvloop)"
            ),
        },
        "rows": rows,
        "skipped": skipped,
        **summary,
    }
    text = table(rows, summary)
    if pair_report is not None and pair_report["pairs"]:
        med = pair_report["median"]
        text += (
            f"\npaired node/bridge (uvloop) runs of N={pair_report['count']:,}, "
            f"median of {len(pair_report['pairs'])}: bridge/node = {_fmt(med['bridge_over_node'], '.2f')}; "
            f"CPU us/ev node {_fmt(med['node_cpu_us_per_event'], '.1f')}, "
            f"bridge {_fmt(med['bridge_cpu_us_per_event'], '.1f')}; "
            f"broker us/ev node {_fmt(med['node_broker_cpu_us_per_event'], '.1f')}, "
            f"bridge {_fmt(med['bridge_broker_cpu_us_per_event'], '.1f')}"
        )
    print()
    print(text, flush=True)
    stamp = datetime.fromtimestamp(started, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = "smoke-" if smoke else ""
    report["table"] = text
    blob = json.dumps(report, indent=2)
    (out_dir / f"{prefix}{stamp}.json").write_text(blob)
    (out_dir / f"{prefix}latest.json").write_text(blob)
    _log(f"\nwrote {out_dir / f'{prefix}{stamp}.json'} and {prefix}latest.json ({report['duration_s']} s)")
    return report
