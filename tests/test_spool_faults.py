"""Spool under hostile files and disks: foreign files, the bound on disk, damage, a disk that refuses writes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.contract import KIND_EVENT, Outbound
from bridge.errors import SpoolError, SpoolPathError
from bridge.spool import Spool, Spooled
from tests.helpers import PYTHON, ROOT

REPO = Path(__file__).resolve().parents[1]


def msg(n: int, size: int = 8) -> Outbound:
    """A distinct message whose body starts with its number."""
    body = f"{n:08d}".encode().ljust(size, b"x")
    return Outbound(KIND_EVENT, "transaction.done", f"m{n}", body, {"realm": "r1"}, 1700000000.0 + n, "x")


def nums(items: list[Spooled]) -> list[int]:
    """The message numbers of a batch."""
    return [int(item.msg.message_id[1:]) for item in items]


async def drain(spool: Spool) -> list[Spooled]:
    """Take and ack everything."""
    await spool.flush()
    out: list[Spooled] = []
    while spool.depth:
        batch = await asyncio.wait_for(spool.get_batch(1000), 5)
        out.extend(batch)
        spool.ack(item.id for item in batch)
    return out


def disk_bytes(path: Path) -> int:
    """The database file plus its WAL, as the OS counts them."""
    return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))


async def test_foreign_sqlite_file_is_refused_unchanged(tmp_path: Path) -> None:
    """A foreign SQLite file (rollback journal) is refused and not a byte of it changes (no switch to WAL)."""
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    assert before[18:20] == b"\x01\x01"
    with pytest.raises(SpoolError, match=r"other\.db.*not an orangepill-bridge spool"):
        await Spool.open(str(other))
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


async def test_disk_use_stays_within_max_bytes(tmp_path: Path) -> None:
    """With nothing acked, the file plus its WAL stay within --spool-max-bytes (not 2.9 x it) and put waits."""
    path = tmp_path / "s.db"
    bound = 4 * 1024**2
    spool = await Spool.open(str(path), max_bytes=bound)
    accepted = 0
    while True:
        try:
            await asyncio.wait_for(spool.put(msg(accepted, size=100)), 1.0)
        except TimeoutError:
            if spool.full:
                break
            continue  # a slow commit on a busy machine, not the bound
        accepted += 1
        if accepted % 1000 == 0:
            assert disk_bytes(path) <= bound * 1.05
    assert spool.full
    await spool.flush()
    used = disk_bytes(path)
    assert used <= bound * 1.05, used
    assert accepted * 100 >= bound * 0.25  # the bound is not eaten by overhead alone
    report = await spool.close()
    assert (report.kept, report.lost) == (accepted, 0)
    assert disk_bytes(path) <= bound * 1.05


async def _fill_and_close(path: Path, count: int, size: int) -> None:
    spool = await Spool.open(str(path))
    for n in range(count):
        await spool.put(msg(n, size=size))
    await spool.close()


def _damage(path: Path) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xa5" * 20000)


async def test_damaged_spool_is_salvaged_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool with overwritten pages opens: readable rows move to a fresh file, the damaged one is set aside."""
    path = tmp_path / "spool.db"
    await _fill_and_close(path, 3000, 200)
    _damage(path)
    caplog.set_level(logging.ERROR, logger="bridge.spool")
    spool = await Spool.open(str(path))
    saved = spool.depth
    assert 0 < saved < 3000
    got = nums(await drain(spool))
    assert got == sorted(got)
    assert len(got) == saved
    assert set(got) <= set(range(3000))
    await spool.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"saved {saved} readable events" in m for m in errors)
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name and p.name.endswith("Z")]
    assert len(aside) == 1
    assert aside[0].startswith("spool.db.corrupt-")


async def test_damage_found_at_run_time_fails_health_and_hand_out(tmp_path: Path) -> None:
    """A page damaged while running makes health() false and get_batch raise; the rows stay for a salvage."""
    path = tmp_path / "spool.db"
    await _fill_and_close(path, 3000, 2000)
    spool = await Spool.open(str(path), window=10)
    assert spool.health().ok
    _damage(path)

    async def take_all() -> None:
        while True:
            batch = await asyncio.wait_for(spool.get_batch(10), 10)
            spool.ack(item.id for item in batch)

    with pytest.raises(SpoolError, match="damaged"):
        await take_all()
    health = spool.health()
    assert not health.ok
    assert "damaged" in health.reason
    with pytest.raises(SpoolError):
        await spool.put(msg(99999))
    report = await spool.close(give_up_after=2)
    assert report.lost == 0
    again = await Spool.open(str(path))
    assert again.depth > 0
    await again.close()


DISK_FULL_SCRIPT = """
import asyncio, json, resource, signal, sys, time
from bridge.contract import Outbound
from bridge.spool import Spool

async def main():
    path, limit = sys.argv[1], int(sys.argv[2])
    spool = await Spool.open(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    accepted = 0
    while True:
        body = f"{accepted:08d}".encode().ljust(10000, b"x")
        try:
            await asyncio.wait_for(spool.put(Outbound(0, "t.x", f"m{accepted}", body, {}, 1.0, "x")), 2.0)
        except TimeoutError:
            break
        accepted += 1
    full, health = spool.full, spool.health()
    if sys.argv[3] == "recover":
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for _ in range(200):
            await asyncio.sleep(0.05)
            if not spool.full:
                break
    start = time.monotonic()
    report = await spool.close(give_up_after=2.0)
    print(json.dumps({"accepted": accepted, "full": full, "health_ok": health.ok, "health": health.reason,
                      "kept": report.kept, "lost": report.lost, "error": report.error,
                      "close_s": time.monotonic() - start}))

asyncio.run(main())
"""


def _run_disk_full(path: Path, mode: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(path), str(2 * 1024**2), mode],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


async def test_a_small_file_spool_is_no_longer_full_once_everything_is_acked(tmp_path: Path) -> None:
    """A 256 KiB file spool fills up, and once every event is confirmed it has room again (the WAL is checkpointed)."""
    spool = await Spool.open(str(tmp_path / "s.db"), max_bytes=256 * 1024)
    accepted = 0
    while not spool.full:
        try:
            await asyncio.wait_for(spool.put(msg(accepted, size=300)), 1.0)
        except TimeoutError:
            continue  # full now, or a slow commit on a busy machine
        accepted += 1
    await spool.flush()
    while spool.depth:
        batch = await spool.get_batch(256)
        spool.ack(item.id for item in batch)
    for _ in range(100):
        if not spool.full:
            break
        await asyncio.sleep(0.05)
    assert not spool.full, spool.stats()
    await spool.close()


async def test_full_disk_pauses_puts_and_counts_the_lost(tmp_path: Path) -> None:
    """A disk that refuses writes (file-size limit) pauses put; close gives up in bounded time, counting kept and lost."""
    path = tmp_path / "s.db"
    out = _run_disk_full(path, "stay")
    assert out["full"] is True
    assert out["lost"] and int(str(out["lost"])) > 0
    assert int(str(out["kept"])) + int(str(out["lost"])) == out["accepted"]
    assert float(str(out["close_s"])) < 6.0
    assert out["error"] and "gave up" in str(out["error"])
    spool = await Spool.open(str(path))
    assert spool.depth == out["kept"]
    assert nums(await drain(spool)) == list(range(int(str(out["kept"]))))
    await spool.close()


async def test_full_disk_keeps_everything_once_space_returns(tmp_path: Path) -> None:
    """When the file-size limit is lifted, the commits are retried and every accepted message is kept."""
    path = tmp_path / "s.db"
    out = _run_disk_full(path, "recover")
    assert out["full"] is True
    assert out["lost"] == 0
    assert out["kept"] == out["accepted"]
    spool = await Spool.open(str(path))
    assert nums(await drain(spool)) == list(range(int(str(out["accepted"]))))
    await spool.close()


async def test_a_spool_truncated_at_a_page_boundary_is_salvaged_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool cut short by whole pages ("database disk image is malformed") is set aside and a fresh one opens;
    an ERROR says what could not be saved (a truncated file gave "saved 0 readable events" and nothing more)."""
    path = tmp_path / "spool.db"
    await _fill_and_close(path, 1500, 200)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 4096)  # its last page gone
    with caplog.at_level(logging.ERROR):
        spool = await Spool.open(str(path))
    saved = spool.depth
    assert 0 <= saved < 1500
    assert "ids could not be read" in caplog.text or "nothing could be read from the damaged file" in caplog.text
    got = nums(await drain(spool))
    assert got == sorted(got) and len(got) == saved
    await spool.close()
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name and p.name.endswith("Z")]
    assert len(aside) == 1 and aside[0].startswith("spool.db.corrupt-")
    # Opening again works: the fresh spool is healthy.
    again = await Spool.open(str(path))
    await again.close()


async def test_a_foreign_file_that_sqlite_calls_malformed_is_still_refused(tmp_path: Path) -> None:
    """The salvage of an unopenable file needs the spool's own header: anything else is left where it is."""
    path = tmp_path / "spool.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\x00" * 4076)  # a header, no spool
    before = path.read_bytes()
    with pytest.raises((SpoolError, sqlite3.DatabaseError)):
        await Spool.open(str(path))
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]


@pytest.mark.parametrize("kind", ["directory", "random_bytes", "other_sqlite"])
async def test_a_spool_path_that_can_never_be_a_spool_is_bad_configuration(tmp_path: Path, kind: str) -> None:
    """A directory, a non-SQLite file or someone else's SQLite database as --spool: exit code 2, named, untouched."""
    path = tmp_path / "spool.db"
    if kind == "directory":
        path.mkdir()
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(8192))
    else:
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
        other.commit()
        other.close()
    before = None if kind == "directory" else path.read_bytes()
    with pytest.raises(SpoolPathError) as info:
        await Spool.open(str(path))
    assert info.value.exit_code == 2
    assert str(path) in str(info.value)
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root's override")
@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("ro.db", "is not readable and writable by this process (a read-only file?)"),
        ("locked/sub/spool.db", "does not exist and cannot be created by this process"),
    ],
)
def test_a_spool_this_process_may_not_write_is_bad_configuration(tmp_path: Path, where: str, says: str) -> None:
    """A read-only spool file said "disk I/O error" (exit 1), a missing directory it may not create
    "[Errno 13]" (exit 1), where a directory it may not write in said so (exit 2): now all three say why, exit 2.
    Run as root without the permission override (setpriv), as an unprivileged service would."""
    (tmp_path / "ro.db").touch(mode=0o444)
    (tmp_path / "locked").mkdir(mode=0o555)
    script = f"import asyncio; from bridge.spool import Spool; asyncio.run(Spool.open({str(tmp_path / where)!r}))"
    result = subprocess.run(
        ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
         PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "SpoolPathError" in result.stderr and says in result.stderr, result.stderr[-2000:]
