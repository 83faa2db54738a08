"""The end-to-end benchmark still runs: ``python -m bench --smoke`` against the real RabbitMQ.

Asserts the shape of the JSON and that the consumer counted every event sent; never timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, shapes

ROOT = Path(__file__).resolve().parent.parent

ROW_KEYS = {
    "subject", "loop", "count", "events_per_s", "complete", "latency", "cpu_s_per_100k",
    "rss_peak_mb", "rss_steady_mb", "throughput_run", "latency_run", "cpu_us_per_event", "broker_cpu_us_per_event",
}  # fmt: skip
RUN_KEYS = {
    "count", "distinct", "duplicates", "missing", "complete", "cpu_s", "rss_peak_mb",
    "cpu_us_per_event", "broker_cpu_us_per_event",
}  # fmt: skip
HAS_NODE = shutil.which("node") is not None


def test_bench_smoke(tmp_path: Path) -> None:
    """Every subject (the Node peer too, when node is here) delivers every event and reports CPU per event."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "smoke-latest.json").read_text())
    assert {"machine", "rows", "ratios", "targets", "setup", "table"} <= report.keys()
    assert {"cores", "cpu_model", "python", "rabbitmq", "packages"} <= report["machine"].keys()
    rows = {(r["subject"], r["loop"]): r for r in report["rows"]}
    expected = {(s, loop) for s in ("ceiling", "naive", "bridge") for loop in ("uvloop", "asyncio")}
    if HAS_NODE and "node" not in report["skipped"]:
        expected.add(("node", "node"))
    else:
        assert "node" in report["skipped"], report["skipped"]
    assert set(rows) == expected
    for row in rows.values():
        assert row.keys() >= ROW_KEYS
        # CPU read from procfs for the subject and the broker: known, and positive over 1,500 events.
        assert row["cpu_us_per_event"] > 0, row["subject"]
        assert row["broker_cpu_us_per_event"] > 0, row["subject"]
        assert {"p50_ms", "p99_ms", "max_ms"} <= row["latency"].keys()
        for run in (row["throughput_run"], row["latency_run"]):
            assert run.keys() >= RUN_KEYS
            # Every event sent was counted by the consumer, none missing.
            assert run["complete"], run
            assert run["distinct"] == run["count"], run
            assert run["missing"] == 0, run
    for loop in ("uvloop", "asyncio"):
        assert {"bridge_over_ceiling", "bridge_over_naive", "bridge_over_node"} <= report["ratios"][loop].keys()
        assert {"throughput_ge_1.0_node", "cpu_per_event_le_80us"} <= report["targets"][loop].keys()
    assert "bridge" in report["table"]
    assert "broker us/ev" in report["table"]
    # The floor of the 100/s figure: a compiled relay, or why it was skipped.
    floor = report["relay_floor_at_100_per_s"]
    if "skipped" not in floor:
        assert floor["complete"], floor
        assert 0 <= floor["cpu_percent_of_core"] < 100, floor  # 200 events: a tick or two of CPU, maybe none
        assert "socat" in report["table"]
    if ("node", "node") in expected:
        # One alternating node/bridge pair (--smoke), every event counted, the ratio from both.
        (pair,) = report["paired"]["pairs"]
        assert pair["complete"], pair
        assert pair["bridge_over_node"] == pytest.approx(pair["bridge_events_per_s"] / pair["node_events_per_s"], 1e-2)
        assert report["paired"]["median"]["bridge_over_node"] == pair["bridge_over_node"]
        assert "paired node/bridge" in report["table"]
        # The two targets against the peer are judged on the pairs too, next to the table's verdict.
        node_target = report["targets"]["uvloop"]["throughput_ge_1.0_node"]
        assert node_target["value_paired"] == pair["bridge_over_node"]
        assert node_target["met_paired"] == (pair["bridge_over_node"] >= 1.0)
        assert "met_paired" in report["targets"]["uvloop"]["broker_cpu_per_event_le_node"]
        assert "(pairs: " in report["table"]
        # What the contract's headers cost the consumer, next to the Node peer's message shape.
        shape = report["consumer_cost_by_shape"]
        assert "skipped" not in shape, shape
        assert shape["contract"]["consumer_cpu_us_per_msg"] > 0 and shape["node_peer"]["consumer_cpu_us_per_msg"] > 0
        assert "the consumer's CPU per message" in report["table"]
    else:
        assert "paired" not in report


@pytest.mark.skipif(not HAS_NODE, reason="no `node` on PATH: the bench skips the Node peer")
def test_bench_node_peer_alone(tmp_path: Path) -> None:
    """The Node.js peer (installed on first use) republishes every simulator event to the exchange."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "node", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "smoke-latest.json").read_text())
    if "node" in report["skipped"]:
        pytest.skip(f"the bench skipped the Node peer: {report['skipped']['node']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = report["rows"]
    assert (row["subject"], row["loop"]) == ("node", "node")
    for run in (row["throughput_run"], row["latency_run"]):
        assert run["complete"] and run["missing"] == 0 and run["distinct"] == run["count"], run
    assert report["machine"]["node"]["amqplib"] and report["machine"]["node"]["ws"]


def test_node_peer_without_node_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without `node` on PATH the peer is reported unavailable with the reason, so the bench skips it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert common.node_peer_ready() == "no `node` on PATH"


def test_cpu_seconds_reads_procfs() -> None:
    """CPU seconds come from /proc/<pid>/stat, grow with work, and are NaN for a process that is gone."""
    import os

    before = common.cpu_seconds(os.getpid())
    sum(i * i for i in range(3_000_000))
    assert common.cpu_seconds(os.getpid()) > before
    assert common.cpu_seconds(2**22 + 12345) != common.cpu_seconds(2**22 + 12345)  # NaN


def test_profile_without_py_spy_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bench profile` needs py-spy, which no extra installs: it says so and exits 2, before any run."""
    from bench import profile

    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    monkeypatch.setattr(profile.sys, "executable", str(tmp_path / "python"))  # no py-spy next to it
    assert profile.main(loop="uvloop", count=10) == 2
    assert "pip install py-spy" in capsys.readouterr().err


def test_consumer_cost_shapes_are_the_contract_and_the_peer() -> None:
    """The bench's two message shapes: the bridge's own encoding of the contract, and the Node peer's four properties."""
    ours, peer = shapes.contract_properties(), shapes.peer_properties()
    assert ours.delivery_mode == peer.delivery_mode == 2
    assert ours.headers is not None and {"realm", "entity_id", "received_at"} <= ours.headers.keys()
    assert ours.message_type == "deposit.received" and ours.app_id == "orangepill-bridge"
    assert peer.headers is None and peer.timestamp is None
    assert len(ours.marshal()) > len(peer.marshal())


def test_bench_python_peer_alone(tmp_path: Path) -> None:
    """The Node peer's 40 lines in Python (websockets + aiormq) republish every simulator event, beside the bridge."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "pypeer", "--only", "bridge", "--loop", "uvloop",
         "--pairs", "0", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "smoke-latest.json").read_text())
    rows = {(r["subject"], r["loop"]): r for r in report["rows"]}
    assert set(rows) == {("pypeer", "uvloop"), ("bridge", "uvloop")}
    row = rows[("pypeer", "uvloop")]
    for run in (row["throughput_run"], row["latency_run"]):
        assert run["complete"] and run["missing"] == 0 and run["distinct"] == run["count"], run
    assert row["cpu_us_per_event"] > 0 and row["low_rate_run"]["complete"], row
    ratio = report["ratios"]["uvloop"]
    assert ratio["bridge_over_pypeer"] == pytest.approx(
        rows[("bridge", "uvloop")]["events_per_s"] / row["events_per_s"], 1e-2
    )
    assert "bridge/pypeer" in report["table"]
