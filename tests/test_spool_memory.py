"""Memory stays bounded in bytes: big events during a long broker outage do not grow the bridge's RSS."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import BridgeProcess, free_port, process_args, simulator

EVENTS = 3000
BODY = 100_000
RSS_BOUND = 200 * 1024**2


@pytest.mark.slow
async def test_rss_stays_under_200_mb_with_100_kb_events_and_the_broker_down(tmp_path: Path) -> None:
    """3,000 events of 100 KB (300 MB) spooled to disk with the broker unreachable keep peak RSS under 200 MB."""
    dead_port = free_port()  # nothing listens: the broker is "down" without touching RabbitMQ
    spool = tmp_path / "spool.db"
    async with simulator(paused=True) as sim:
        args = process_args(sim.url, "test.rss.unused", str(spool))
        args[args.index("--amqp-url") + 1] = f"amqp://guest:guest@127.0.0.1:{dead_port}/"
        proc = BridgeProcess(args)
        try:
            ps = psutil.Process(proc.proc.pid)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await sim.send_event("transaction.done", "warmup")
                    break
                except RuntimeError:
                    assert time.monotonic() < deadline, proc.output()
                    await asyncio.sleep(0.2)
            peak = 0
            pad = "x" * BODY
            for n in range(EVENTS):
                await sim.send_event("transaction.done", f"e{n}", extra={"pad": pad})
                if n % 50 == 0:
                    peak = max(peak, ps.memory_info().rss)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                peak = max(peak, ps.memory_info().rss)
                if spool.exists() and spool.stat().st_size + _wal(spool) >= EVENTS * BODY:
                    break
                await asyncio.sleep(0.1)
            for _ in range(20):
                peak = max(peak, ps.memory_info().rss)
                await asyncio.sleep(0.1)
            on_disk = spool.stat().st_size + _wal(spool)
            assert on_disk >= EVENTS * BODY, (on_disk, proc.output()[-2000:])
            print(f"peak RSS {peak / 1024**2:.0f} MB, on disk {on_disk / 1024**2:.0f} MB")
            assert peak < RSS_BOUND, f"peak RSS {peak / 1024**2:.0f} MB"
        finally:
            proc.close()


def _wal(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0
