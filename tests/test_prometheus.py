"""The alert rules and dashboard queries, evaluated by a real Prometheus.

promtool checks and unit-tests the rules; then a simulator, a bridge (against the
real RabbitMQ) and a Prometheus run on loopback, every dashboard query and alert
expression is evaluated over Prometheus's HTTP API, and stopping the simulator
must make the stream-disconnected alert fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml

from bridge.contract import Topology

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "orangepill-bridge.json"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BRIDGE = [sys.executable, "-m", "bridge"]
METRIC_RE = re.compile(r"\borangepill_bridge_[a-zA-Z0-9_:]+")
UP_RE = re.compile(r"\bup\{[^}]*\}")
SCRAPE_JOB = "orangepill-bridge"
# What Grafana would put in place of its own variables at a 1 s scrape interval.
GRAFANA_BUILTINS = {"__rate_interval": "5s", "__interval": "1s", "__interval_ms": "1000", "__range": "1m"}
# Alerts a healthy bridge may show in this test: nothing consumes the test exchange,
# so every event lands in its unrouted queue.
EXPECTED_WHILE_HEALTHY = {"OrangepillUnroutableEvents"}


# ── Prometheus binaries ──────────────────────────────────────────────────────


def _binaries() -> tuple[str, str] | None:
    found = [shutil.which(name) or f"/usr/bin/{name}" for name in ("prometheus", "promtool")]
    if all(os.access(path, os.X_OK) for path in found):
        return found[0], found[1]
    return None


@pytest.fixture(scope="module")
def binaries() -> tuple[str, str]:
    """(prometheus, promtool), installed from Debian's package when missing; skip if that fails."""
    found = _binaries()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("prometheus/promtool missing and apt-get is not usable (need root on Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    errors = []
    for steps in ([install], [["apt-get", "update"], install]):
        try:
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True, timeout=300, env=env, check=False)
                if done.returncode != 0:
                    errors.append(done.stderr.strip()[-300:])
                    break
        except subprocess.TimeoutExpired as exc:
            errors.append(f"{exc.cmd} timed out")
        if (found := _binaries()) is not None:
            return found
    pytest.skip(f"prometheus is not installed and `apt-get install prometheus` failed: {errors}")


def promtool(binaries: tuple[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binaries[1], *args], capture_output=True, text=True, timeout=60, check=False)


def load_rules() -> dict[str, Any]:
    with RULES.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


# ── promtool ─────────────────────────────────────────────────────────────────


def test_promtool_accepts_the_rules(binaries: tuple[str, str]) -> None:
    """`promtool check rules` accepts prometheus/alerts.yml and counts every rule in it."""
    done = promtool(binaries, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    count = sum(len(g["rules"]) for g in load_rules()["groups"])
    assert f"SUCCESS: {count} rules found" in done.stdout


def test_promtool_accepts_the_compose_config(binaries: tuple[str, str]) -> None:
    """`promtool check config` accepts prometheus/prometheus.yml together with the rule files it names."""
    done = promtool(binaries, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


L = 'job="orangepill-bridge", instance="bridge:9180"'
LABELS = {"job": "orangepill-bridge", "instance": "bridge:9180"}

# promtool unit tests: (input series, [(eval time, alert, [expected extra labels of each firing alert])]).
# Annotations are stripped from the rules under test, so only expressions, for: and labels are checked.
def _labels(extra: dict[str, str]) -> dict[str, str]:
    """The series labels plus the alert's own; a value of "" drops a label the alert aggregates away."""
    return {k: v for k, v in {**LABELS, **extra}.items() if v != ""}


SCENARIOS: list[tuple[dict[str, str], list[tuple[str, str, list[dict[str, str]]]]]] = [
    (  # two replicas; the leader of fp-a stops leading at 3m and the other never takes over
        {
            f'orangepill_bridge_leader{{{L}, realm="fp-a"}}': "1x3 0x10",
            'orangepill_bridge_leader{job="orangepill-bridge", instance="bridge2:9180", realm="fp-a"}': "0x13",
            f'orangepill_bridge_leader{{{L}, realm="fp-b"}}': "0x13",
            'orangepill_bridge_leader{job="orangepill-bridge", instance="bridge2:9180", realm="fp-b"}': "1x13",
        },
        [
            ("2m", "OrangepillRealmWithoutLeader", []),
            ("5m", "OrangepillRealmWithoutLeader", [{"severity": "critical", "realm": "fp-a", "instance": ""}]),
        ],
    ),
    (  # a failover: the standby leads from the next sample on, so no alert
        {
            f'orangepill_bridge_leader{{{L}, realm="fp-a"}}': "1x3 0x10",
            'orangepill_bridge_leader{job="orangepill-bridge", instance="bridge2:9180", realm="fp-a"}': "0x3 1x10",
        },
        [("5m", "OrangepillRealmWithoutLeader", [])],
    ),
    (
        {f"up{{{L}}}": "1 0x5", f"orangepill_bridge_stream_connected{{{L}}}": "1 1 0x10"},
        [
            ("3m", "OrangepillBridgeDown", [{"severity": "critical"}]),
            ("1m", "OrangepillStreamDisconnected", []),
            ("3m", "OrangepillStreamDisconnected", []),  # pending: down for 1 of 2 minutes
            ("5m", "OrangepillStreamDisconnected", [{"severity": "critical"}]),
        ],
    ),
    (
        {
            f'orangepill_bridge_subscribed{{{L}, realm="fp-a"}}': "1 0x10",
            f'orangepill_bridge_subscribed{{{L}, realm="fp-b"}}': "1x10",
        },
        [("5m", "OrangepillRealmNotSubscribed", [{"severity": "critical", "realm": "fp-a"}])],
    ),
    (  # the key of fp-a is rejected at 2m: that realm stopped, fp-b goes on; the alert fires at once, and
        # the rejected realm raises neither "not subscribed" nor "without leader" (its lock was given up)
        {
            f'orangepill_bridge_realm_rejected{{{L}, realm="fp-a"}}': "0 0 1x10",
            f'orangepill_bridge_realm_rejected{{{L}, realm="fp-b"}}': "0x12",
            f'orangepill_bridge_subscribed{{{L}, realm="fp-a"}}': "1 1 0x10",
            f'orangepill_bridge_subscribed{{{L}, realm="fp-b"}}': "1x12",
            f'orangepill_bridge_leader{{{L}, realm="fp-a"}}': "1 1 0x10",
            f'orangepill_bridge_leader{{{L}, realm="fp-b"}}': "1x12",
        },
        [
            ("1m", "OrangepillRealmKeyRejected", []),
            ("2m", "OrangepillRealmKeyRejected", [{"severity": "critical", "realm": "fp-a"}]),
            ("8m", "OrangepillRealmNotSubscribed", []),
            ("8m", "OrangepillRealmWithoutLeader", []),
        ],
    ),
    (  # connected for 45 minutes and never an event: fires once 30 min + for: 5m have passed
        {
            f"orangepill_bridge_stream_connected{{{L}}}": "1x45",
            f"orangepill_bridge_last_event_timestamp_seconds{{{L}}}": "0x45",
        },
        [("20m", "OrangepillNoEvents", []), ("40m", "OrangepillNoEvents", [{"severity": "warning"}])],
    ),
    (  # events flowing: the last event timestamp follows the clock
        {
            f"orangepill_bridge_stream_connected{{{L}}}": "1x45",
            f"orangepill_bridge_last_event_timestamp_seconds{{{L}}}": "0+60x45",
        },
        [("40m", "OrangepillNoEvents", [])],
    ),
    (  # the bridge started 14 minutes ago: too early to call a quiet stream unusual
        {
            f"orangepill_bridge_stream_connected{{{L}}}": "_x30 1x15",
            f"orangepill_bridge_last_event_timestamp_seconds{{{L}}}": "_x30 0x15",
        },
        [("44m", "OrangepillNoEvents", [])],
    ),
    (  # the link dropped 19 minutes ago: OrangepillStreamDisconnected's business, not this one's
        {
            f"orangepill_bridge_stream_connected{{{L}}}": "1x20 0 1x24",
            f"orangepill_bridge_last_event_timestamp_seconds{{{L}}}": "0x45",
        },
        [("40m", "OrangepillNoEvents", [])],
    ),
    (
        {f"orangepill_bridge_spool_depth{{{L}}}": "0+200x30"},
        [
            ("5m", "OrangepillSpoolBacklogGrowing", []),
            ("25m", "OrangepillSpoolBacklogGrowing", [{"severity": "warning"}]),
        ],
    ),
    (  # a large but steady spool (draining as fast as it fills) is not growing
        {f"orangepill_bridge_spool_depth{{{L}}}": "5000x30"},
        [("25m", "OrangepillSpoolBacklogGrowing", [])],
    ),
    (
        {f"orangepill_bridge_spool_full{{{L}}}": "0 1x5", f"orangepill_bridge_amqp_connected{{{L}}}": "1 0x5"},
        [
            ("1m", "OrangepillSpoolFull", []),
            ("3m", "OrangepillSpoolFull", [{"severity": "critical"}]),
            ("3m", "OrangepillBrokerDown", [{"severity": "critical"}]),
        ],
    ),
    (
        {
            f'orangepill_bridge_publish_failures_total{{{L}, reason="channel"}}': "0+60x15",
            f'orangepill_bridge_publish_failures_total{{{L}, reason="nack"}}': "0x15",
        },
        [
            ("3m", "OrangepillPublishFailures", []),
            ("10m", "OrangepillPublishFailures", [{"severity": "warning", "reason": "channel"}]),
        ],
    ),
    (
        {
            f'orangepill_bridge_events_rejected_total{{{L}, reason="bad_json"}}': "0 0 5x10",
            f'orangepill_bridge_events_rejected_total{{{L}, reason="missing_event"}}': "0x12",
        },
        [("4m", "OrangepillFramesQuarantined", [{"severity": "warning", "reason": "bad_json"}])],
    ),
    (  # a disk alarm on RabbitMQ blocks publishing from 2m to 6m
        {f"orangepill_bridge_amqp_blocked{{{L}}}": "0x2 1x4 0x5", f"orangepill_bridge_amqp_connected{{{L}}}": "1x11"},
        [
            ("2m", "OrangepillBrokerBlocksPublishing", []),
            ("4m", "OrangepillBrokerBlocksPublishing", [{"severity": "critical"}]),
            ("8m", "OrangepillBrokerBlocksPublishing", []),
            ("4m", "OrangepillBrokerDown", []),
        ],
    ),
    (  # RabbitMQ refuses one event for good at 3m: it is moved to the quarantine
        {
            f'orangepill_bridge_events_quarantined_total{{{L}, reason="unpublishable"}}': "0x3 1x40",
            f'orangepill_bridge_events_quarantined_total{{{L}, reason="bad_json"}}': "0+5x43",
        },
        [
            ("2m", "OrangepillEventsRefusedByBroker", []),
            ("4m", "OrangepillEventsRefusedByBroker", [{"severity": "critical"}]),
            ("40m", "OrangepillEventsRefusedByBroker", []),
        ],
    ),
    (  # the quarantine refuses it too (a body above max_message_size): it waits in the spool, retried alone
        {
            f'orangepill_bridge_publish_failures_total{{{L}, reason="refused"}}': "0x3 1 1 2x40",
            f'orangepill_bridge_events_quarantined_total{{{L}, reason="unpublishable"}}': "0x45",
        },
        [
            ("2m", "OrangepillEventsRefusedByBroker", []),
            ("4m", "OrangepillEventsRefusedByBroker", [{"severity": "critical"}]),
            ("40m", "OrangepillEventsRefusedByBroker", []),
        ],
    ),
    (  # the alternate exchange fills the unrouted queue
        {
            f'orangepill_bridge_queue_messages{{{L}, queue="unrouted"}}': "0+10x10",
            f"orangepill_bridge_events_unroutable_total{{{L}}}": "0x10",
        },
        [("4m", "OrangepillUnroutableEvents", [{"severity": "warning"}])],
    ),
    (  # a queue that holds old messages but does not grow is not news
        {
            f'orangepill_bridge_queue_messages{{{L}, queue="unrouted"}}': "100x20",
            f"orangepill_bridge_events_unroutable_total{{{L}}}": "0x20",
        },
        [("15m", "OrangepillUnroutableEvents", [])],
    ),
    (  # every observation between 5 s and 10 s
        {
            f'orangepill_bridge_publish_latency_seconds_bucket{{{L}, le="5.0"}}': "0x20",
            f'orangepill_bridge_publish_latency_seconds_bucket{{{L}, le="10.0"}}': "0+10x20",
            f'orangepill_bridge_publish_latency_seconds_bucket{{{L}, le="+Inf"}}': "0+10x20",
        },
        [
            ("8m", "OrangepillPublishLatencyHigh", []),
            ("18m", "OrangepillPublishLatencyHigh", [{"severity": "warning"}]),
        ],
    ),
    (  # every observation under 10 ms
        {
            f'orangepill_bridge_publish_latency_seconds_bucket{{{L}, le="0.01"}}': "0+10x20",
            f'orangepill_bridge_publish_latency_seconds_bucket{{{L}, le="+Inf"}}': "0+10x20",
        },
        [("18m", "OrangepillPublishLatencyHigh", [])],
    ),
    (
        {f'orangepill_bridge_stream_disconnects_total{{{L}, reason="closed"}}': "0+1x20"},
        [("12m", "OrangepillStreamFlapping", [{"severity": "warning"}])],
    ),
    (  # failed handshakes while the stream is down are not flapping
        {f'orangepill_bridge_stream_disconnects_total{{{L}, reason="connect_failed"}}': "0+10x20"},
        [("12m", "OrangepillStreamFlapping", [])],
    ),
]


def test_alert_rules_fire_when_they_should(binaries: tuple[str, str], tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires on its failure and stays quiet on look-alike healthy input."""
    doc = load_rules()
    for rule in alert_rules(doc):
        rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": _labels(x)} for x in exp]}
                for at, name, exp in checks
            ],
        }
        for series, checks in SCENARIOS
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    done = promtool(binaries, "test", "rules", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {name for _, checks in SCENARIOS for _, name, _ in checks}
    assert tested == {r["alert"] for r in alert_rules(load_rules())}, "every alert needs a scenario"


# ── live: simulator → bridge → RabbitMQ, scraped by Prometheus ────────────────


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs()}")


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Prom:
    """A Prometheus HTTP API client on loopback."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = http_get(f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        assert status in (200, 400, 422), (status, body[:300])
        return doc

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def active_alerts(self) -> dict[str, str]:
        """Alert name → state (pending or firing), the most advanced one per name."""
        out: dict[str, str] = {}
        for alert in self.api("alerts")["data"]["alerts"]:
            name = alert["labels"]["alertname"]
            if out.get(name) != "firing":
                out[name] = alert["state"]
        return out


def substitute(expr: str, instance: str) -> str:
    values = {**GRAFANA_BUILTINS, "instance": instance}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name]  # a KeyError names a variable the dashboard does not define

    return re.sub(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))", one, expr)


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title/refId, PromQL) for every target of every panel, rows included."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])] if p["type"] != "row"]
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels for t in p["targets"]]


def live_config(tmp_path: Path, bridge_target: str) -> Path:
    """The repo's prometheus.yml and rules, on a 1 s clock, scraping only the local bridge."""
    with (PROMETHEUS_DIR / "prometheus.yml").open(encoding="utf-8") as f:
        config = yaml.safe_load(f)
    (job,) = [s for s in config["scrape_configs"] if s["job_name"] == SCRAPE_JOB]
    job["static_configs"] = [{"targets": [bridge_target]}]
    config["scrape_configs"] = [job]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    rules = load_rules()
    for rule in alert_rules(rules):
        if rule.get("for", "0m") not in ("0s", "0m"):
            rule["for"] = "5s"
    rule_files = []
    for name in config["rule_files"]:
        (tmp_path / Path(name).name).write_text(yaml.safe_dump(rules), encoding="utf-8")
        rule_files.append(Path(name).name)
    config["rule_files"] = rule_files
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def delete_topology(exchange: str) -> list[str]:
    """Delete the test exchange and the queues the bridge declared for it; return what failed."""
    failed = []
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=10)
    except Exception as exc:  # reported by the caller, without hiding the test's own failure
        return [f"connect to {AMQP_URL}: {exc!r}"]
    async with connection:
        names = Topology(exchange)
        steps = [
            ("queue", names.unrouted),
            ("queue", names.quarantine),
            ("exchange", names.exchange),
            ("exchange", names.unrouted),  # the alternate exchange
            ("exchange", names.ha),  # the replicas' announcements
        ]
        for kind, name in steps:
            channel = await connection.channel()  # a failed delete closes its channel
            try:
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
            except Exception as exc:  # report, keep deleting the rest
                failed.append(f"{kind} {name}: {exc!r}")
            finally:
                if not channel.is_closed:
                    await channel.close()
    return failed


class Processes:
    """Named subprocesses with their output in files under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        self.started.append((proc, log))
        return proc

    def stop_all(self) -> None:
        """SIGTERM every process still running, SIGKILL those that do not exit; idempotent."""
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log.close()
        self.started.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} (tail) ---\n{p.read_text(errors='replace')[-2000:]}" for p in self.folder.glob("*.log")
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Processes started by a test; all of them are stopped afterwards, whatever happened."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.mark.broker
@pytest.mark.timeout(150)
def test_dashboard_and_alerts_against_a_live_bridge(
    binaries: tuple[str, str],
    tmp_path: Path,
    processes: Processes,
) -> None:
    """Every panel query and every metric an alert uses has data; stopping the stream fires the alert."""
    if not port_open(5672):
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest), which this test needs")
    sim_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    instance = f"127.0.0.1:{metrics_port}"
    exchange = f"test.prom.{secrets.token_hex(4)}"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    logs = processes.logs
    try:
        sim = processes.start(
            "simulator",
            [*BRIDGE, "simulate", "--host", "127.0.0.1", "--port", str(sim_port), "--realm-key", "prometheus-realm-key-01", "--rate", "50"],
        )
        wait_until("the simulator", lambda: port_open(sim_port), 20, logs)
        bridge = processes.start(
            "bridge",
            [
                *BRIDGE, "run",
                "--stream-url", f"ws://127.0.0.1:{sim_port}",
                "--realm-key", "prometheus-realm-key-01",
                "--amqp-url", AMQP_URL,
                "--exchange", exchange,
                "--spool", "memory",
                "--metrics-addr", instance,
            ],
        )  # fmt: skip
        wait_until("the bridge's /healthz", lambda: http_get(f"http://{instance}/healthz")[0] == 200, 20, logs)

        config = live_config(tmp_path, instance)
        processes.start(
            "prometheus",
            [
                binaries[0],
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
        )
        prom = Prom(prom_port)
        wait_until("Prometheus ready", lambda: http_get(f"{prom.base}/-/ready")[0] == 200, 30, logs)

        def scraped_enough() -> bool:
            result = prom.query(f'count_over_time(up{{job="{SCRAPE_JOB}"}}[1m]) >= 6 and up == 1')["data"]["result"]
            return bool(result)

        wait_until("six successful scrapes of the bridge", scraped_enough, 30, logs)

        queries = panel_queries(dashboard)
        assert len(queries) >= 20

        def empty_panels() -> list[str]:
            bad = []
            for where, expr in queries:
                doc = prom.query(substitute(expr, instance))
                assert doc["status"] == "success", f"{where}: {doc.get('error')} in {expr}"
                if not doc["data"]["result"]:
                    bad.append(f"{where}: {expr}")
            return bad

        # Some series appear only after a first poll (the queue depths every 10 s): give them time.
        deadline = time.monotonic() + 25
        while (empty := empty_panels()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not empty, "panel queries without data:\n" + "\n".join(empty)

        (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        values = prom.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})["data"]
        assert instance in values

        for rule in alert_rules(load_rules()):
            doc = prom.query(rule["expr"])
            assert doc["status"] == "success", f"{rule['alert']}: {doc.get('error')}"
            selectors = [f'{m}{{instance="{instance}"}}' for m in METRIC_RE.findall(rule["expr"])]
            selectors += UP_RE.findall(rule["expr"])
            assert selectors, rule["alert"]
            for selector in selectors:
                assert prom.query(selector)["data"]["result"], f"{rule['alert']}: no data for {selector}"

        active = prom.active_alerts()
        assert set(active) <= EXPECTED_WHILE_HEALTHY, f"alerts on a healthy bridge: {active}"
        assert bridge.poll() is None, logs()

        sim.terminate()
        sim.wait(timeout=15)

        def disconnected_alert_fires() -> bool:
            return prom.active_alerts().get("OrangepillStreamDisconnected") == "firing"

        wait_until("OrangepillStreamDisconnected to fire", disconnected_alert_fires, 40, logs)
        assert prom.active_alerts().get("OrangepillRealmNotSubscribed") in ("pending", "firing")
        (fired,) = [
            a
            for a in prom.api("alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == "OrangepillStreamDisconnected"
        ]
        assert instance in fired["annotations"]["summary"]  # the template rendered with the alert's labels
        assert fired["labels"]["severity"] == "critical"
    finally:
        # The bridge first: a running bridge re-declares what is deleted under it.
        processes.stop_all()
        failed = asyncio.run(delete_topology(exchange))
    assert not failed, failed
