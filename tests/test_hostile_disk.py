"""A disk that fills up under the running bridge: what is not on disk at shutdown is reported lost, with exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.helpers import PYTHON, ROOT, free_port, process_args, simulator, wait_until

pytestmark = pytest.mark.slow

_FSIZE = 2 * 1024**2  # the "disk": no file of the bridge may grow beyond 2 MiB


def _limit_file_size() -> None:
    """In the child: a file-size limit, and SIGXFSZ ignored so a write fails with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FSIZE, _FSIZE))


def _records(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(orjson.loads(line))
    return out


async def test_full_disk_at_shutdown_counts_the_lost_events_and_exits_1(tmp_path: Path, exchange_name: str) -> None:
    """With the spool file at its size limit and the broker down, SIGTERM ends with an ERROR counting lost events, exit 1."""
    spool = tmp_path / "spool.db"
    log = tmp_path / "bridge.log"
    async with simulator(rate=2000, data_bytes=1000) as sim:
        args = process_args(sim.url, exchange_name, str(spool))
        args[args.index("--amqp-url") + 1] = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # broker "down"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [PYTHON, "-m", "bridge", "run", *args, "--drain-timeout", "3"],
                cwd=ROOT,
                env={"PATH": "/usr/bin:/bin", "BRIDGE_LOG_FORMAT": "json", "BRIDGE_UVLOOP": "0"},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_limit_file_size,  # only setrlimit and a signal disposition
            )
            try:
                assert await wait_until(lambda: "commit failed" in log.read_text(errors="replace"), timeout=90), (
                    log.read_text(errors="replace")[-3000:]
                )
                await asyncio.sleep(1.0)  # events keep arriving while the disk refuses them
                assert proc.poll() is None, "the bridge died of the full disk"
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    text = log.read_text(errors="replace")
    records = _records(log)
    lost = [r for r in records if r.get("level") == "error" and "accepted events are lost" in str(r.get("msg"))]
    assert code == 1, text[-3000:]
    assert len(lost) == 1, text[-3000:]
    count = int(str(lost[0]["msg"]).split()[0])
    assert count > 0
    assert "stopped cleanly" not in text
    assert spool.stat().st_size <= _FSIZE
