"""A disk that fills up under the running bridge: what is not on disk at shutdown is reported lost, with exit 1."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import resource
import signal
import subprocess
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.spool import Spool
from tests.helpers import (
    PYTHON,
    ROOT,
    bind_queue,
    bridge_settings,
    collect,
    free_port,
    process_args,
    running_bridge,
    simulator,
    wait_until,
)

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


_WAL_ONLY_SCRIPT = """
import asyncio, os, signal, sys
from bridge.contract import Outbound
from bridge.spool import Spool

async def main():
    spool = await Spool.open(sys.argv[1])
    for n in range(int(sys.argv[2])):
        await spool.put(Outbound(0, "deposit.received", f"m{n}", b"x" * 1000, {}, float(n), "x"))
    await spool.flush()  # committed: in the WAL, never checkpointed into the file
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""

_SET_ASIDE_SCRIPT = """
import asyncio, sys
from bridge.app import _set_aside_earlier_runs
from tests.helpers import bridge_settings

print(asyncio.run(_set_aside_earlier_runs(bridge_settings("ws://127.0.0.1:1", "x", spool=sys.argv[1]))))
"""


async def test_an_earlier_runs_events_survive_a_start_on_a_full_disk(tmp_path: Path) -> None:
    """Rows of an earlier run that sit only in the WAL (its checkpoint cannot write: disk full) move with the file."""
    spool = str(tmp_path / "spool.db")
    killed = subprocess.run([PYTHON, "-c", _WAL_ONLY_SCRIPT, spool, "300"], cwd=ROOT, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert Path(spool + "-wal").stat().st_size > 300_000 > Path(spool).stat().st_size
    # The "disk": room for 128 KiB more, far less than the WAL holds, so the closing checkpoint fails.
    limit = Path(spool).stat().st_size + 128 * 1024

    def no_growth() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    moved = subprocess.run(
        [PYTHON, "-c", _SET_ASIDE_SCRIPT, spool], cwd=ROOT, timeout=60, capture_output=True, text=True,
        preexec_fn=no_growth,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    (carry,) = ast.literal_eval(moved.stdout.strip().splitlines()[-1])  # the list of carry files it printed
    earlier = await Spool.open(carry)  # the disk has room again
    try:
        assert earlier.depth == 300
    finally:
        await earlier.close()


async def test_a_stop_while_the_spool_is_full_keeps_what_the_stream_still_held(
    amqp: AbstractRobustConnection, exchange_name: str, tmp_path: Path
) -> None:
    """A full spool holds the stream back: the server's frames wait in the socket buffers. A stop then closed
    the link over them and said "stopped cleanly": 5,921 events gone in a probe. Now they are read into the
    spool beyond its bound at the stop, and the next start publishes every one."""
    spool = str(tmp_path / "spool.db")
    closed = free_port()  # RabbitMQ unreachable: nothing is confirmed, the spool fills
    async with simulator(rate=1000.0) as sim:
        held = bridge_settings(sim.url, exchange_name, spool=spool, spool_max_bytes=64 * 1024,
                               amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/")  # fmt: skip
        async with running_bridge(held) as bridge:
            assert await wait_until(lambda: bridge.metric("orangepill_bridge_spool_full") == 1, 30)
            await asyncio.sleep(3)  # the stream is held back meanwhile
            assert await bridge.finish(timeout=60) == 0
        sim.pause()
        sent = {e.seq for e in sim.sent}
    async with simulator(paused=True) as idle:
        settings = bridge_settings(idle.url, exchange_name, spool=spool)
        queue = await bind_queue(amqp, settings, "#")
        async with running_bridge(settings) as bridge:
            got = await collect(queue, len(sent), timeout=60, settle=1.0)
            assert await bridge.finish() == 0
    missing = sent - seqs_of(got)
    assert not missing, f"{len(missing)} of {len(sent)} events lost, e.g. {sorted(missing)[:5]}"


def seqs_of(messages: list[AbstractIncomingMessage]) -> set[int]:
    return {int(orjson.loads(m.body)["seq"]) for m in messages}


def test_the_accepted_keys_record_survives_torn_foreign_and_deleted_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """<spool>.accepted: no WARNING when it does not exist yet (a first start); a torn last line, foreign bytes or
    non-ASCII lines do not hide the whole lines, and the next write leaves only whole fingerprint lines (appending
    merged a new fingerprint into a torn line); a file deleted while the bridge runs is written again at the next
    accepted subscribe."""
    from bridge.app import AcceptedKeys

    spool = str(tmp_path / "spool.db")
    record = tmp_path / "spool.db.accepted"
    with caplog.at_level(logging.WARNING):
        assert "fp-3c2282e7a8b7" not in AcceptedKeys(spool)
    assert caplog.records == []

    record.write_bytes(b"\x00\xff\xfegarbage\nfp-3c2282e7a8b7\nfp-zzzz\nfp-0561\x00\x00")
    keys = AcceptedKeys(spool)
    assert "fp-3c2282e7a8b7" in keys and "fp-0561" not in keys
    keys.add("fp-0561731fb201")
    assert record.read_text() == "fp-0561731fb201\nfp-3c2282e7a8b7\n"
    assert "fp-0561731fb201" in AcceptedKeys(spool) and "fp-3c2282e7a8b7" in AcceptedKeys(spool)

    record.unlink()  # deleted while the bridge runs
    keys.add("fp-0561731fb201")  # a known key accepted again
    assert record.read_text() == "fp-0561731fb201\nfp-3c2282e7a8b7\n"
    assert not list(tmp_path.glob("*.tmp-*"))
    assert AcceptedKeys("memory").path is None
