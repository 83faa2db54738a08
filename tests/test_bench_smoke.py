"""The end-to-end benchmark still runs: ``python -m bench --smoke`` against the real RabbitMQ.

Asserts the shape of the JSON and that the consumer counted every event sent; never timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROW_KEYS = {
    "subject", "loop", "count", "events_per_s", "complete", "latency", "cpu_s_per_100k",
    "rss_peak_mb", "rss_steady_mb", "throughput_run", "latency_run",
}  # fmt: skip
RUN_KEYS = {"count", "distinct", "duplicates", "missing", "complete", "cpu_s", "rss_peak_mb"}


def test_bench_smoke(tmp_path: Path) -> None:
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
    assert set(rows) == {(s, loop) for s in ("ceiling", "naive", "bridge") for loop in ("uvloop", "asyncio")}
    for row in rows.values():
        assert row.keys() >= ROW_KEYS
        assert {"p50_ms", "p99_ms", "max_ms"} <= row["latency"].keys()
        for run in (row["throughput_run"], row["latency_run"]):
            assert run.keys() >= RUN_KEYS
            # Every event sent was counted by the consumer, none missing.
            assert run["complete"], run
            assert run["distinct"] == run["count"], run
            assert run["missing"] == 0, run
    for loop in ("uvloop", "asyncio"):
        assert {"bridge_over_ceiling", "bridge_over_naive"} <= report["ratios"][loop].keys()
    assert "bridge" in report["table"]
