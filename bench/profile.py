"""Profile ``orangepill-bridge run`` under full load with py-spy (``python -m bench profile``).

The bridge runs as in the benchmark (its own process, fed by the simulator at full
speed, counted by the consumer); py-spy samples it from outside for the whole run.
Writes the raw stacks and a summary (self and inclusive time per function, and per
stage of the bridge) to ``bench/results/profile-<loop>-<timestamp>.txt``.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench.run import measure

# Which stage a stack belongs to: first marker found from the leaf upwards wins.
STAGES = (
    ("sqlite (spool store)", ("SqliteStore.", "_to_row", "_from_row", "spool/store.py")),
    ("publish: aio-pika/aiormq/pamqp", ("aio_pika/", "aiormq/", "pamqp/")),
    ("publish: bridge publisher", ("publisher.py",)),
    ("spool (ledger, committer)", ("bridge/spool/",)),
    ("protocol: parse + message (wire, contract)", ("bridge/wire.py", "bridge/contract.py")),
    ("metrics: prometheus_client", ("prometheus_client/",)),
    ("websockets read", ("websockets/",)),
    ("stream client", ("stream.py",)),
)


def _py_spy() -> str | None:
    """The py-spy executable (on PATH or next to this Python), or None."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe if os.access(exe, os.X_OK) else None


# py-spy counts a thread that is preempted (runnable, waiting for a core) as running, so on a
# busy machine a call that wakes another process (a loopback send) collects samples while the
# bridge waits for the CPU. For CPU use `perf record -g -p <pid>`; this profile shows where time goes.
CAVEAT = (
    "note: py-spy samples wall time of running threads; a thread waiting for a core counts as running, "
    "so calls that wake another process (socket writes on loopback) look larger than their CPU cost"
)


def summarise(raw: Path, top: int = 40) -> str:
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        stage = "event loop / other"
        for frame in reversed(frames):
            hit = next((name for name, marks in STAGES if any(m in frame for m in marks)), None)
            if hit:
                stage = hit
                break
        stages[stage] += n
    out = [f"samples: {total}", "", "by stage (leaf-most bridge/library frame):"]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in stages.most_common()]
    out += ["", "self time:"]
    out += [f"  {n / total * 100:5.1f}%  {f[:160]}" for f, n in self_c.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {n / total * 100:5.1f}%  {f[:160]}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main(*, loop: str, count: int, rate: float = 0.0) -> int:
    py_spy = _py_spy()
    if py_spy is None:
        print("py-spy not found: install it with `.venv/bin/pip install py-spy` (it is not a dependency "
              "of the bridge or its tests)", file=sys.stderr)  # fmt: skip
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    raw = common.RESULTS / f"profile-{loop}-{stamp}.raw"

    def on_go(pid: int) -> Callable[[], Any]:
        proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
             "--output", str(raw), "--threads"],  # every thread, on-CPU samples only
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

        def stop() -> dict[str, Any]:
            proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            proc.wait(30)
            return {"raw": str(raw)}

        return stop

    res = measure("bridge", loop, count=count, rate=rate, latency=False, timeout=600, on_go=on_go)
    text = summarise(raw)
    head = (
        f"bridge on {loop}, {count:,} events at {'full speed' if not rate else f'{rate:g}/s'}: "
        f"{res['events_per_s']:,.0f} events/s, CPU {res['cpu_s_per_100k']} s/100k, "
        f"other processes {res['cpu_other_processes_s']}, foreign {res['cpu_foreign_s']} s\n{CAVEAT}\n"
    )
    (common.RESULTS / f"profile-{loop}-{stamp}.txt").write_text(head + "\n" + text + "\n")
    print(head)
    print(text)
    return 0
