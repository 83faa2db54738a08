"""Does RSS come back after each broker outage? (issue 14: "RSS slope < 1 MB/hour").

Several bridge *variants* run side by side, each with its own simulator, exchange, queue and spool,
against one private RabbitMQ node on a spare loopback port (``tests/cluster.py``; the node on 5672 is
never touched). After a warm-up, the node's app is stopped for ``--down`` s (``rabbitmqctl stop_app``,
as the chaos soak does) ``--outages`` times, ``--gap`` s apart (start_app to the next stop_app), so every
variant sees the same outages. RSS and spool depth of every bridge are sampled each second; the report
gives, per variant, RSS before the first outage, the peak during each outage and RSS after each drain
(mean of the last 5 s before the next outage), and the drain time.

A variant is ``NAME`` or ``NAME:ENV=VALUE;ENV=VALUE`` (environment of its bridge process; see
``bench/memprobe.py`` for ``OPB_WINDOW_ROWS``, ``OPB_WINDOW_BYTES``, ``OPB_MALLOPT``; glibc's
``MALLOC_ARENA_MAX`` and Python's ``PYTHONMALLOC`` work too). With ``--probe`` each bridge writes a
memory report (tracemalloc with ``PYTHONTRACEMALLOC``) before the first outage, near the end of each
outage and after each drain.

    python -m bench.outage_memory --variant current --variant small:OPB_WINDOW_ROWS=500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chaos import KEY, REALM, RESULTS, ROOT, _declare, _http, private_target
from bench.common import parse_metrics
from tests.helpers import free_port


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    workdir: Path
    sim_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    exchange: str = field(default_factory=lambda: f"memo.{uuid.uuid4().hex[:8]}")
    sim: subprocess.Popen[bytes] | None = None
    bridge: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int | None, float | None]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        try:
            return parse_metrics(_http(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2.0)[1])
        except OSError:
            return {}

    def depth(self) -> float | None:
        return self.metrics().get("orangepill_bridge_spool_depth")

    def declare(self, url: str) -> None:
        asyncio.run(_declare(url, self.exchange, f"{self.exchange}.all"))

    def start(self, url: str, rate: float, probe: bool, sim_extra: tuple[str, ...] = (), declare: bool = True) -> None:
        if declare:
            self.declare(url)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "simulator.log").open("wb") as sim_log:
            self.sim = subprocess.Popen(
                [sys.executable, "-m", "bridge", "simulate", "--host", "127.0.0.1", "--port", str(self.sim_port),
                 "--realm-key", KEY, "--rate", f"{rate:g}", "--seed", "14", *sim_extra],
                cwd=ROOT, stdout=sim_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORANGEPILL_", "BRIDGE_", "OPB_"))}
        env.update({"BRIDGE_LOG_FORMAT": "json", "OPB_PROBE_DIR": str(self.workdir), **self.env})
        args = [
            "--stream-url", f"ws://127.0.0.1:{self.sim_port}", "--realm-key", f"{REALM}={KEY}",
            "--amqp-url", url, "--exchange", self.exchange, "--spool", str(self.workdir / "spool.db"),
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}", "--explorer", "off",
            "--ping-interval", "1", "--idle-timeout", "5", "--reconnect-min", "0.1", "--reconnect-max", "2",
            "--reconnect-reset-after", "5", "--publish-timeout", "10", "--drain-timeout", "5",
        ]  # fmt: skip
        with (self.workdir / "bridge.log").open("wb") as log:
            self.bridge = subprocess.Popen([sys.executable, "-m", "bench.memprobe", "run", *args], cwd=ROOT,
                                           env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.bridge is not None
            if self.bridge.poll() is not None:
                raise RuntimeError(f"{self.name}: bridge exited: {(self.workdir / 'bridge.log').read_text()[-1500:]}")
            m = self.metrics()
            if m.get("orangepill_bridge_amqp_connected") == 1.0 and m.get("orangepill_bridge_spool_depth") is not None:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: bridge not up")

    def probe(self, trim: bool = False) -> None:
        if self.bridge is not None and self.bridge.poll() is None:
            self.bridge.send_signal(signal.SIGUSR2 if trim else signal.SIGUSR1)

    def stop(self) -> None:
        for proc in (self.bridge, self.sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _parse_variant(spec: str, root: Path) -> Variant:
    name, _, rest = spec.partition(":")
    env = dict(part.split("=", 1) for part in rest.split(";") if part)
    return Variant(name, env, root / name)


def _sampler(variants: list[Variant], t0: float, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for v in variants:
            if v.bridge is not None:
                v.samples.append((round(time.monotonic() - t0, 2), _rss(v.bridge.pid), v.depth()))


def _mb(x: float | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def _summarise(v: Variant, marks: dict[str, Any]) -> dict[str, Any]:
    def rss_between(a: float, b: float) -> list[int]:
        return [r for t, r, _ in v.samples if a <= t < b and r]

    before = rss_between(marks["first_stop"] - 6, marks["first_stop"] - 1)
    out: dict[str, Any] = {"name": v.name, "env": v.env, "before_mb": _mb(statistics.mean(before)) if before else None,
                           "outages": []}  # fmt: skip
    for o in marks["outages"]:
        peak = rss_between(o["stop"], o["next"])
        after = rss_between(o["next"] - 6, o["next"] - 1)
        drained = next((t for t, _, d in v.samples if t > o["start"] and d is not None and d <= 256), None)
        backlog = max((d for t, _, d in v.samples if o["stop"] <= t < o["next"] and d is not None), default=None)
        out["outages"].append({
            "peak_mb": _mb(max(peak)) if peak else None,
            "after_mb": _mb(statistics.mean(after)) if after else None,
            "backlog": backlog,
            "drain_s": None if drained is None else round(drained - o["start"], 1),
        })  # fmt: skip
    afters = [o["after_mb"] for o in out["outages"] if o["after_mb"] is not None]
    if afters and out["before_mb"] is not None:
        out["ratchet_mb"] = round(afters[-1] - out["before_mb"], 1)
    return out


def drain_test(variants: list[Variant], target: Any, count: int) -> list[dict[str, Any]]:
    """Per variant, one at a time: ``count`` events spooled with the broker down, then the drain timed.

    The bridge starts with the broker's app stopped, the simulator sends ``count`` events as fast as it
    can, and once the spool holds them all the app is started; the drain runs from the moment the
    bridge has its AMQP link back until its spool is empty.
    """
    out = []
    for v in variants:
        v.declare(target.url)
        target.ctl("stop_app")
        v.start(target.url, 0, False, ("--count", str(count)), declare=False)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < 600:
            d = v.depth()
            peak = max(peak, _rss(v.bridge.pid) or 0)  # type: ignore[union-attr]
            if d is not None and d >= count:
                break
            time.sleep(0.2)
        ingest_s = time.monotonic() - t0
        rss_full = _rss(v.bridge.pid)  # type: ignore[union-attr]
        target.ctl("start_app")
        t_up = None
        t_empty = None
        t1 = time.monotonic()
        while time.monotonic() - t1 < 600:
            m = v.metrics()
            peak = max(peak, _rss(v.bridge.pid) or 0)  # type: ignore[union-attr]
            if t_up is None and m.get("orangepill_bridge_amqp_connected") == 1.0:
                t_up = time.monotonic()
            if t_up is not None and m.get("orangepill_bridge_spool_depth") == 0.0:
                t_empty = time.monotonic()
                break
            time.sleep(0.1)
        time.sleep(5)
        rss_after = _rss(v.bridge.pid)  # type: ignore[union-attr]
        v.stop()
        res = {
            "name": v.name, "env": v.env, "count": count, "ingest_s": round(ingest_s, 1),
            "drain_s": None if t_empty is None or t_up is None else round(t_empty - t_up, 2),
            "events_per_s": None if t_empty is None or t_up is None else round(count / (t_empty - t_up)),
            "rss_full_mb": _mb(rss_full), "rss_peak_mb": _mb(peak), "rss_after_mb": _mb(rss_after),
        }  # fmt: skip
        _log(f"drain {v.name}: {res}")
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME or NAME:ENV=VALUE;ENV=VALUE")
    p.add_argument("--outages", type=int, default=5)
    p.add_argument("--down", type=float, default=20.0)
    p.add_argument("--gap", type=float, default=40.0, help="seconds from start_app to the next stop_app")
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--probe", action="store_true", help="memory reports (SIGUSR1) at each mark, SIGUSR2 at the end")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--drain", type=int, metavar="N",
                   help="instead of the outages: time the drain of N events spooled with the broker down")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="outage-memory-"))
    variants = [_parse_variant(s, root) for s in args.variant]
    _log(f"work dir {root}; variants {[v.name for v in variants]}")
    marks: dict[str, Any] = {"outages": []}
    stop = threading.Event()
    with private_target() as target:
        _log(f"private broker {target.node} at {target.url.split('@')[-1]}")
        if args.drain:
            try:
                results = drain_test(variants, target, args.drain)
            finally:
                for v in variants:
                    v.stop()
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            args.results_dir.mkdir(parents=True, exist_ok=True)
            path = args.results_dir / f"outage-memory-drain-{stamp}.json"
            path.write_text(json.dumps({"count": args.drain, "variants": results}, indent=1))
            print(f"report: {path}", flush=True)
            return 0
        try:
            for v in variants:
                v.start(target.url, args.rate, args.probe)
            for v in variants:
                v.wait_up()
            t0 = time.monotonic()
            threading.Thread(target=_sampler, args=(variants, t0, stop), daemon=True).start()
            time.sleep(args.warmup)
            if args.probe:
                for v in variants:
                    v.probe()
                time.sleep(2)
            for i in range(args.outages):
                o: dict[str, float] = {"stop": time.monotonic() - t0}
                marks.setdefault("first_stop", o["stop"])
                _log(f"outage {i + 1}/{args.outages}: stop_app for {args.down:g} s")
                target.ctl("stop_app")
                time.sleep(max(args.down - 2, 0))
                if args.probe:
                    for v in variants:
                        v.probe()
                time.sleep(min(args.down, 2))
                target.ctl("start_app")
                o["start"] = time.monotonic() - t0
                time.sleep(max(args.gap - 3, 0))
                if args.probe:
                    for v in variants:
                        v.probe()
                time.sleep(min(args.gap, 3))
                o["next"] = time.monotonic() - t0
                marks["outages"].append(o)
                line = "  ".join(f"{v.name}: {_mb(v.samples[-1][1])} MB" for v in variants if v.samples)
                _log(f"  after: {line}")
            if args.probe:
                for v in variants:
                    v.probe(trim=True)
                time.sleep(3)
        finally:
            stop.set()
            for v in variants:
                v.stop()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workdir": str(root),
        "marks": marks,
        "variants": [_summarise(v, marks) for v in variants],
        "samples": {v.name: v.samples for v in variants},
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"outage-memory-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    for s in report["variants"]:
        outs = " | ".join(f"peak {o['peak_mb']} after {o['after_mb']} (backlog {o['backlog']}, drain {o['drain_s']}s)"
                          for o in s["outages"])  # fmt: skip
        print(f"{s['name']:>14}: before {s['before_mb']} MB | {outs} | ratchet {s.get('ratchet_mb')} MB", flush=True)
    print(f"report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
