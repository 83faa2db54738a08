"""Tests of the durable spool: ordering, durability, back-pressure, paging, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from bridge.app import _open_spools
from bridge.contract import KIND_EVENT, KIND_QUARANTINE, Outbound
from bridge.errors import SpoolError
from bridge.metrics import Metrics
from bridge.spool import MEMORY, Limits, Spool, Spooled, SpoolStats
from bridge.spool.store import runs
from tests.helpers import bridge_settings, wait_until

REPO = Path(__file__).resolve().parents[1]


def msg(n: int, size: int = 8) -> Outbound:
    """A distinct message whose body starts with its number."""
    body = f"{n:08d}".encode().ljust(size, b"x")
    return Outbound(
        kind=KIND_EVENT,
        routing_key="transaction.done",
        message_id=f"m{n}",
        body=body,
        headers={"realm": "r1", "received_at": 1700000000000 + n},
        received_at=1700000000.5 + n,
        metric_kind="transaction.done",
    )


def nums(items: list[Spooled]) -> list[int]:
    """The message numbers of a batch, read back from the message ids."""
    return [int(item.msg.message_id[1:]) for item in items]


async def drain(spool: Spool, *, max_n: int = 1000) -> list[Spooled]:
    """Take and ack everything until the spool is empty (nothing may be left in flight)."""
    await spool.flush()
    out: list[Spooled] = []
    while spool.depth:
        batch = await asyncio.wait_for(spool.get_batch(max_n), 2)
        out.extend(batch)
        spool.ack(item.id for item in batch)
    return out


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "spool.db")


async def test_get_batch_returns_messages_in_put_order(db: str) -> None:
    """get_batch hands messages out in the order of put, with increasing ids, full content intact."""
    spool = await Spool.open(db)
    original = msg(0)
    for n in range(50):
        await spool.put(msg(n) if n else original)
    first = await spool.get_batch(20)
    spool.ack(item.id for item in first)
    rest = await drain(spool)
    items = first + rest
    assert nums(items) == list(range(50))
    assert [i.id for i in items] == sorted({i.id for i in items})
    assert items[0].msg == original
    await spool.close()


async def test_committed_only_hand_out_waits_for_the_commit(db: str) -> None:
    """With ``early=False`` a put is not handed out until its group commit has finished."""
    spool = await Spool.open(db, commit_interval=0.5)
    await spool.put(msg(0))  # an idle spool commits at once...
    assert nums(await asyncio.wait_for(spool.get_batch(10, early=False), 1)) == [0]
    await spool.put(msg(1))  # ...the next put within the interval waits for the group
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(spool.get_batch(10, early=False), 0.1)
    await spool.flush()
    assert nums(await spool.get_batch(10, early=False)) == [1]
    await spool.close()


async def test_early_hand_out_confirmed_within_the_interval_is_never_written(db: str) -> None:
    """A waiting publisher gets a put before its commit; acked within the interval, no row is written."""
    spool = await Spool.open(db, commit_interval=0.3)
    waiter = asyncio.ensure_future(spool.get_batch(10))
    await asyncio.sleep(0)
    await spool.put(msg(0))
    batch = await asyncio.wait_for(waiter, 0.1)  # well before the 0.3 s commit
    assert nums(batch) == [0]
    assert spool.stats().rows_written == 0
    spool.ack(item.id for item in batch)
    await asyncio.sleep(0.5)
    assert spool.stats().rows_written == 0
    assert spool.depth == 0
    await spool.put(msg(1))  # nobody takes it early: written at once
    await spool.flush()
    assert spool.stats().rows_written == 1
    assert nums(await drain(spool)) == [1]
    await spool.close()


async def _one_handed_out_early(db: str, *, commit_interval: float) -> tuple[Spool, list[Spooled]]:
    """A spool whose publisher waits, and one put: handed out before its commit (early hand-out)."""
    spool = await Spool.open(db, commit_interval=commit_interval)
    waiter = asyncio.ensure_future(spool.get_batch(10))
    await asyncio.sleep(0)
    await spool.put(msg(0))
    return spool, await asyncio.wait_for(waiter, 1.0)


async def test_a_group_wait_ends_once_everything_uncommitted_is_confirmed(db: str) -> None:
    """Early hand-out, confirmed early: the commit wait ends at the ack, not by its timer an interval later."""
    spool, batch = await _one_handed_out_early(db, commit_interval=5.0)
    committer = spool._committer
    # waiting out the 5 s interval for the row handed out early
    assert await wait_until(lambda: committer._group_waiting, timeout=1.0, interval=0.01)
    spool.ack(item.id for item in batch)
    assert await wait_until(lambda: not committer._group_waiting, timeout=0.2, interval=0.01)  # well before 5 s
    assert spool.stats().rows_written == 0
    await spool.close()


async def test_a_confirm_read_as_the_group_wait_times_out_still_saves_the_write(db: str) -> None:
    """A confirm that reaches the spool a couple of loop passes after the commit timer fired keeps the row unwritten."""
    spool, batch = await _one_handed_out_early(db, commit_interval=0.05)
    committer = spool._committer
    loop = asyncio.get_running_loop()
    acked = loop.create_future()

    def ack() -> None:
        spool.ack(item.id for item in batch)
        acked.set_result(None)

    def watch() -> None:
        # RabbitMQ's confirm is read in the pass where the timer fires; like aiormq's reader task and
        # the publisher's flush, it takes two more passes to reach the spool.
        if committer._now.is_set():
            loop.call_soon(loop.call_soon, ack)
        else:
            loop.call_soon(watch)

    assert await wait_until(lambda: committer._group_waiting, timeout=1.0, interval=0.001)
    watch()
    await asyncio.wait_for(acked, 1.0)
    await asyncio.sleep(0.2)  # the commit step, and any delete, are over
    assert spool.stats().rows_written == 0
    assert spool.depth == 0
    await spool.close()


EARLY_CRASH_SCRIPT = """
import asyncio, os, signal, sys
from bridge.contract import Outbound
from bridge.spool import Spool

async def main():
    spool = await Spool.open(sys.argv[1], commit_interval=0.2)
    for n in range(int(sys.argv[2])):
        await spool.put(Outbound(0, "transaction.done", f"m{n}", f"{n:08d}".encode(), {}, float(n), "x"))
    batch = await spool.get_batch(10_000)  # all of them, before any commit
    assert len(batch) == int(sys.argv[2]) and spool.stats().rows_written == 0, (len(batch), spool.stats())
    spool.ack(item.id for item in batch if int(item.msg.message_id[1:]) % 2 == 0)  # confirmed: the even ones
    await asyncio.sleep(0.6)  # > one commit interval; the odd ids are still in flight
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_sigkill_after_early_hand_out_keeps_what_was_not_confirmed(tmp_path: Path) -> None:
    """Handed out before their commit, the unconfirmed messages are on disk one interval later; the rest never."""
    path = str(tmp_path / "spool.db")
    count = 200  # below the bound of uncommitted messages (256): none is committed before the hand-out
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EARLY_CRASH_SCRIPT, path, str(count), cwd=str(REPO)
    )
    assert await proc.wait() == -signal.SIGKILL
    spool = await Spool.open(path)
    items = await drain(spool)
    assert nums(items) == list(range(1, count, 2))
    await spool.close()


BURST_CRASH_SCRIPT = """
import asyncio, os, signal, sys
from bridge.contract import Outbound
from bridge.spool import Spool

async def main():
    spool = await Spool.open(sys.argv[1])
    for n in range(int(sys.argv[2])):  # a burst: as fast as put lets it, nobody publishing
        await spool.put(Outbound(0, "transaction.done", f"m{n}", f"{n:08d}".encode(), {}, float(n), "x"))
    os.kill(os.getpid(), signal.SIGKILL)  # right after the last put returned, no flush

asyncio.run(main())
"""


async def test_a_crash_in_a_burst_loses_at_most_the_uncommitted_bound(tmp_path: Path) -> None:
    """SIGKILL right after 5,000 puts in a burst: all but at most 256 (the uncommitted bound) are on disk."""
    path = str(tmp_path / "spool.db")
    count = 5000
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BURST_CRASH_SCRIPT, path, str(count), cwd=str(REPO)
    )
    assert await proc.wait() == -signal.SIGKILL
    spool = await Spool.open(path)
    kept = nums(await drain(spool))
    await spool.close()
    assert kept == list(range(len(kept)))  # a prefix of the burst, in order
    assert Limits().pending_rows == 256  # the bound the README documents
    assert len(kept) >= count - 256


async def test_idle_spool_commits_at_once(db: str) -> None:
    """A put that no publisher is waiting for is written at once, not after the commit interval."""
    spool = await Spool.open(db, commit_interval=5.0)
    await spool.put(msg(3))
    for _ in range(100):
        if spool.stats().rows_written:
            break
        await asyncio.sleep(0.01)
    assert spool.stats().rows_written == 1
    assert nums(await asyncio.wait_for(spool.get_batch(10), 2.0)) == [3]
    await spool.close()


@pytest.mark.parametrize(("sync", "on_loop"), [("normal", True), ("full", False)])
async def test_a_spool_that_fsyncs_never_commits_on_the_loop_thread(db: str, sync: str, on_loop: bool) -> None:
    """synchronous=FULL makes each commit wait for an fsync: those commits run on the spool's thread, where
    small NORMAL ones run on the loop's thread (no hand-off); SQLite reports the level it applies."""
    spool = await Spool.open(db, synchronous=sync)
    assert spool.synchronous == sync.upper()
    store = spool._committer.store
    assert store is not None
    threads: list[int] = []
    write = store.write

    def recording_write(*args: object) -> None:
        threads.append(threading.get_ident())
        write(*args)  # type: ignore[arg-type]

    store.write = recording_write  # type: ignore[method-assign]
    for n in range(5):
        await spool.put(msg(n))
        await spool.flush()
    assert threads and all((t == threading.get_ident()) is on_loop for t in threads), threads
    assert nums(await drain(spool)) == list(range(5))
    await spool.close()


async def test_get_batch_waits_for_a_later_put(db: str) -> None:
    """A waiting get_batch wakes up when a message is committed."""
    spool = await Spool.open(db)
    waiter = asyncio.create_task(spool.get_batch(10))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await spool.put(msg(7))
    assert nums(await asyncio.wait_for(waiter, 1)) == [7]
    await spool.close()


async def test_ack_deletes_and_reopen_shows_only_unacked(db: str) -> None:
    """Acked messages are gone after reopening; unacked ones (in flight or never taken) come back in order."""
    spool = await Spool.open(db)
    for n in range(10):
        await spool.put(msg(n))
    await spool.flush()
    batch = await spool.get_batch(6)
    spool.ack([batch[0].id, batch[2].id, batch[5].id])
    assert spool.depth == 7
    await spool.close()

    spool = await Spool.open(db)
    assert spool.depth == 7
    assert spool.bytes == 7 * 8
    assert nums(await drain(spool)) == [1, 3, 4, 6, 7, 8, 9]
    await spool.close()


async def test_release_redelivers_before_newer_items(db: str) -> None:
    """Released messages come back, in id order, before anything not yet handed out."""
    spool = await Spool.open(db)
    for n in range(10):
        await spool.put(msg(n))
    await spool.flush()
    batch = await spool.get_batch(5)
    spool.ack([batch[1].id])
    spool.release([batch[4], batch[0], batch[3], batch[2]])
    again = await spool.get_batch(3)
    assert nums(again) == [0, 2, 3]
    assert nums(await spool.get_batch(100)) == [4, 5, 6, 7, 8, 9]
    await spool.close()


async def test_ack_of_unknown_or_repeated_ids_is_harmless(db: str) -> None:
    """Acks of ids never handed out, unknown or already acked change nothing."""
    spool = await Spool.open(db)
    for n in range(3):
        await spool.put(msg(n))
    await spool.flush()
    spool.ack([1, 2, 3, 999])  # none handed out yet
    assert spool.depth == 3
    batch = await spool.get_batch(1)
    spool.ack([batch[0].id])
    spool.ack([batch[0].id, -5])
    spool.release(batch)  # already acked: must not come back
    assert spool.depth == 2
    assert spool.bytes == 16
    assert nums(await drain(spool)) == [1, 2]
    await spool.close()


async def test_replay_after_reopen_comes_before_new_puts(db: str) -> None:
    """Rows left by an earlier run are handed out first, then what this run puts."""
    spool = await Spool.open(db)
    for n in range(5):
        await spool.put(msg(n))
    await spool.close()

    spool = await Spool.open(db)
    for n in range(5, 8):
        await spool.put(msg(n))
    assert nums(await drain(spool)) == list(range(8))
    await spool.close()


CRASH_SCRIPT = """
import asyncio, os, signal, sys
from bridge.contract import Outbound
from bridge.spool import Spool

async def main():
    spool = await Spool.open(sys.argv[1])
    for n in range(int(sys.argv[2])):
        body = f"{n:08d}".encode()
        await spool.put(Outbound(0, "transaction.done", f"m{n}", body, {"n": n}, float(n), "x"))
    await spool.flush()
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_sigkill_after_flush_loses_nothing(tmp_path: Path) -> None:
    """A process killed with SIGKILL right after flush leaves every message, in order, for the next open."""
    path = str(tmp_path / "deep" / "dir" / "spool.db")
    count = 3000
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASH_SCRIPT, path, str(count), cwd=str(REPO))
    assert await proc.wait() == -signal.SIGKILL
    spool = await Spool.open(path)
    assert spool.depth == count
    items = await drain(spool)
    assert nums(items) == list(range(count))
    assert items[17].msg.headers == {"n": 17}
    await spool.close()


async def test_put_waits_when_full_and_resumes_after_ack(caplog: pytest.LogCaptureFixture) -> None:
    """At max_bytes put blocks (full reported, a WARNING) and goes on once acks bring it under 90 % (INFO)."""
    seen: list[SpoolStats] = []
    spool = await Spool.open(MEMORY, max_bytes=100, on_stats=seen.append)
    caplog.set_level(logging.INFO, logger="bridge.spool")
    for n in range(10):  # 10 x 10 bytes = exactly full
        await spool.put(msg(n, size=10))
    assert spool.full
    assert seen[-1].full
    blocked = asyncio.create_task(spool.put(msg(10, size=10)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert spool.depth == 10
    batch = await spool.get_batch(3)
    spool.ack([batch[0].id])  # 90 bytes: not under 90 %, still full (no flapping at the bound)
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert spool.full
    spool.ack([batch[1].id])  # 80 bytes: room again
    await asyncio.wait_for(blocked, 1)
    assert spool.depth == 9
    assert not spool.full
    assert not seen[-1].full
    spool.ack([batch[2].id])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.getMessage()]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "room again" in r.getMessage()]
    assert len(warnings) == 1
    assert len(infos) == 1
    assert nums(await drain(spool)) == list(range(3, 11))
    await spool.close()


async def test_window_stays_bounded_with_a_large_backlog(db: str) -> None:
    """With 100,000 queued messages only the window is in memory, and all come out in order."""
    window = 2000
    count = 100_000
    spool = await Spool.open(db, window=window)
    for n in range(count):
        await spool.put(msg(n))
    await spool.flush()
    assert spool.stats().memory_bytes <= window * 8
    seen: list[int] = []
    largest = 0
    while len(seen) < count:
        batch = await asyncio.wait_for(spool.get_batch(500), 2)
        largest = max(largest, spool.stats().memory_bytes - 8 * len(batch))
        seen.extend(nums(batch))
        spool.ack(item.id for item in batch)
    assert seen == list(range(count))
    assert largest <= window * 8
    assert spool.depth == 0
    await spool.close()


async def test_backlog_on_open_is_paged_not_loaded(db: str) -> None:
    """Reopening a spool with a backlog keeps only the window in memory and replays it all in order."""
    spool = await Spool.open(db, window=100)
    for n in range(1000):
        await spool.put(msg(n))
    await spool.close()
    spool = await Spool.open(db, window=100)
    assert spool.stats().memory_bytes == 100 * 8
    assert spool.depth == 1000
    await spool.put(msg(1000))
    assert nums(await drain(spool, max_n=37)) == list(range(1001))
    await spool.close()


async def test_new_commits_wait_behind_rows_on_disk(db: str) -> None:
    """Rows committed while older rows are still on disk only are handed out after those, not before."""
    spool = await Spool.open(db, window=4)
    for n in range(10):
        await spool.put(msg(n))
    await spool.flush()
    first = await spool.get_batch(3)  # the window drops to 1 while 6 rows wait on disk
    spool.ack(item.id for item in first)
    for n in range(10, 15):
        await spool.put(msg(n))
    await spool.flush()
    assert nums(first) + nums(await drain(spool, max_n=2)) == list(range(15))
    await spool.close()


async def test_ids_never_reused_after_delete_and_reopen(db: str) -> None:
    """After every row was acked and deleted, new puts get ids above all earlier ones, also after reopen."""
    spool = await Spool.open(db)
    for n in range(5):
        await spool.put(msg(n))
    first = await drain(spool)
    await spool.close()
    spool = await Spool.open(db)
    assert spool.depth == 0
    await spool.put(msg(5))
    later = await drain(spool)
    assert later[0].id > max(i.id for i in first)
    await spool.close()


async def test_memory_mode_has_the_same_semantics(tmp_path: Path) -> None:
    """memory mode orders, releases, acks and back-pressures like a file, and writes nothing to disk."""
    os.chdir(tmp_path)
    spool = await Spool.open(MEMORY, max_bytes=80)
    for n in range(10):
        await spool.put(msg(n))
    assert spool.full
    blocked = asyncio.create_task(spool.put(msg(10)))
    batch = await spool.get_batch(4)
    assert nums(batch) == [0, 1, 2, 3]
    spool.release(batch[2:])
    spool.ack([batch[0].id, batch[1].id])
    await asyncio.wait_for(blocked, 1)
    assert nums(await drain(spool)) == list(range(2, 11))
    assert spool.depth == 0
    await spool.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SpoolError):
        await spool.put(msg(11))


async def test_file_that_is_not_a_spool_raises_spool_error(tmp_path: Path) -> None:
    """A text file, a foreign SQLite database and a newer schema each raise SpoolError naming the path."""
    text = tmp_path / "notes.txt"
    text.write_bytes(b"this is not a database at all, just some text" * 100)
    with pytest.raises(SpoolError, match=r"notes\.txt"):
        await Spool.open(str(text))

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match=r"other\.db.*not an orangepill-bridge spool"):
        await Spool.open(str(other))

    newer = tmp_path / "newer.db"
    spool = await Spool.open(str(newer))
    await spool.close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(SpoolError, match=r"newer\.db.*schema version 99"):
        await Spool.open(str(newer))


async def test_synchronous_full_is_accepted_and_nonsense_is_not(db: str) -> None:
    """synchronous FULL opens a working spool; an unknown level raises SpoolError."""
    spool = await Spool.open(db, synchronous="full")
    await spool.put(msg(1))
    assert nums(await drain(spool)) == [1]
    await spool.close()
    with pytest.raises(SpoolError, match="synchronous"):
        await Spool.open(db, synchronous="SOMETIMES")


async def test_second_open_of_the_same_file_is_refused(db: str) -> None:
    """While one spool holds the file, another open raises SpoolError instead of sharing it."""
    spool = await Spool.open(db)
    with pytest.raises(SpoolError, match="in use"):
        await Spool.open(db)
    await spool.close()
    again = await Spool.open(db)
    await again.close()


async def test_on_stats_follows_depth_bytes_full(db: str) -> None:
    """on_stats reports depth, body bytes and full after commits and acks, and the backlog after reopen."""
    seen: list[SpoolStats] = []
    spool = await Spool.open(MEMORY, on_stats=seen.append, max_bytes=50)
    assert (seen[-1].depth, seen[-1].size_bytes, seen[-1].full) == (0, 0, False)
    for n in range(5):
        await spool.put(msg(n, size=10))
    await spool.flush()
    assert (seen[-1].depth, seen[-1].size_bytes, seen[-1].full) == (5, 50, True)
    batch = await spool.get_batch(2)
    spool.ack(i.id for i in batch)
    await spool.flush()
    assert (seen[-1].depth, seen[-1].size_bytes, seen[-1].full) == (3, 30, False)
    await spool.close()

    spool = await Spool.open(db)
    for n in range(3):
        await spool.put(msg(n, size=10))
    await spool.close()
    fresh: list[SpoolStats] = []
    spool = await Spool.open(db, on_stats=fresh.append)
    assert (fresh[-1].depth, fresh[-1].size_bytes) == (3, 30)
    assert fresh[-1].disk_bytes > 0
    await spool.close()


async def test_quarantine_messages_round_trip(db: str) -> None:
    """Every Outbound field, including a quarantine kind and non-ASCII text, survives the file."""
    original = Outbound(
        kind=KIND_QUARANTINE,
        routing_key="bad_json",
        message_id="q1",
        body=b"\x00\xff{not json",
        headers={"realm": "caf\u00e9", "reason": "bad_json", "received_at": 5},
        received_at=12.25,
        metric_kind="bad_json",
    )
    spool = await Spool.open(db)
    await spool.put(original)
    await spool.close()
    spool = await Spool.open(db)
    [item] = await spool.get_batch(5)
    assert item.msg == original
    await spool.close()


async def test_close_wakes_waiters_with_spool_error(db: str) -> None:
    """A get_batch waiting on an empty spool raises SpoolError when the spool closes."""
    spool = await Spool.open(db)
    waiter = asyncio.create_task(spool.get_batch(1))
    await asyncio.sleep(0.01)
    await spool.close()
    with pytest.raises(SpoolError):
        await waiter


# -- model-based test ----------------------------------------------------------------


@settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class SpoolMachine(RuleBasedStateMachine):
    """put/get/ack/release/reopen against a model: no loss, no resurrection, oldest first."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="spool-sm-")
        self.path = os.path.join(self.dir, "s.db")
        self.spool = self.run(Spool.open(self.path, window=4, commit_interval=0.001))
        self.counter = 0
        self.waiting: set[int] = set()  # put, not handed out (or released)
        self.flight: dict[int, Spooled] = {}  # message number -> handed-out item
        self.acked: set[int] = set()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @rule(n=st.integers(1, 12))
    def put(self, n: int) -> None:
        for _ in range(n):
            self.run(self.spool.put(msg(self.counter)))
            self.waiting.add(self.counter)
            self.counter += 1

    @precondition(lambda self: self.waiting)
    @rule(k=st.integers(1, 10), flush=st.booleans())
    def get(self, k: int, flush: bool) -> None:
        if flush:  # else fresh puts may be handed out before their commit (early hand-out)
            self.run(self.spool.flush())
        # get_batch may return fewer than asked (paging); ask again so the model stays deterministic.
        want = min(k, len(self.waiting))
        while want:
            batch = self.run(asyncio.wait_for(self.spool.get_batch(want), 2))
            got = nums(batch)
            assert got == sorted(self.waiting)[: len(got)]
            assert not set(got) & self.acked
            for item, number in zip(batch, got, strict=True):
                self.waiting.discard(number)
                self.flight[number] = item
            want -= len(got)

    @precondition(lambda self: self.flight)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.flight)), unique=True))
        self.spool.ack([self.flight[n].id for n in chosen] + [10**9])
        for n in chosen:
            del self.flight[n]
            self.acked.add(n)

    @precondition(lambda self: self.flight)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.flight)), unique=True))
        self.spool.release([self.flight[n] for n in chosen])
        for n in chosen:
            del self.flight[n]
            self.waiting.add(n)

    @rule()
    def reopen(self) -> None:
        self.run(self.spool.close())
        self.spool = self.run(Spool.open(self.path, window=4, commit_interval=0.001))
        self.waiting |= set(self.flight)
        self.flight.clear()

    @invariant()
    def depth_matches_model(self) -> None:
        assert self.spool.depth == len(self.waiting) + len(self.flight)
        assert self.spool.bytes == 8 * self.spool.depth

    def teardown(self) -> None:
        try:
            self.waiting |= set(self.flight)
            for item in self.flight.values():
                self.spool.release([item])
            rest = self.run(drain(self.spool))
            assert sorted(nums(rest)) == sorted(self.waiting)
            assert nums(rest) == sorted(nums(rest))
            self.run(self.spool.close())
        finally:
            # After a failed step the spool may still be open: stop its owner task cleanly.
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(task)
            self.loop.close()


test_spool_state_machine = SpoolMachine.TestCase


def test_delete_runs_collapse_consecutive_ids() -> None:
    """Acked ids are deleted as runs of consecutive ids, whatever order they came in."""
    assert runs([5, 3, 4, 9, 1, 10, 4]) == [(1, 1), (3, 5), (9, 10)]
    assert runs([]) == []


async def test_depth_gauges_follow_an_ack_of_a_row_never_written(db: str) -> None:
    """The spool_depth and spool_bytes gauges match the spool after an ack that leaves nothing to write.

    A message put while a commit is on the spool's thread is counted by that commit's report;
    handed out early and confirmed before its own commit, it is never written, so no commit
    (the only other report) follows its ack. The gauges must not keep counting it.
    """
    settings = bridge_settings("ws://127.0.0.1:9", "x", spool=db)
    metrics = Metrics(CollectorRegistry())
    spools = await _open_spools(settings, metrics)
    spool = next(iter(spools.values()))
    committer = spool._committer
    store = committer.store
    assert store is not None
    # Commits go to the spool's thread (as after a slow commit), and this one holds it until let go.
    committer._inline_from = asyncio.get_running_loop().time() + 3600
    committer.commit_interval = 5.0  # X waits for its group commit long enough to be confirmed first
    release = threading.Event()
    write = store.write

    def held_write(rows: list[Spooled], deletes: list[int]) -> None:
        release.wait(10)
        write(rows, deletes)

    store.write = held_write  # type: ignore[method-assign]

    def gauges() -> tuple[float, float]:
        read = metrics.registry.get_sample_value
        return read("orangepill_bridge_spool_depth"), read("orangepill_bridge_spool_bytes")

    await spool.put(msg(0, size=10))  # C: its commit starts on the thread and waits there
    assert await wait_until(lambda: committer.tx_started > committer.tx_done, timeout=1.0, interval=0.005)
    held = await asyncio.wait_for(spool.get_batch(10), 1)  # C, early; stays in flight
    await spool.put(msg(1, size=20))  # X, put during C's commit
    x = await asyncio.wait_for(spool.get_batch(10), 1)
    assert nums(held) == [0] and nums(x) == [1]
    release.set()
    assert await wait_until(lambda: committer.tx_done == committer.tx_started, timeout=2.0, interval=0.005)
    assert committer.tx_done == committer.tx_started == 1
    assert gauges() == (2, 30)  # C's commit reported C and X
    spool.ack(item.id for item in x)  # X confirmed before its commit: nothing to write
    await asyncio.sleep(0.3)
    assert spool.depth == 1
    assert spool.stats().rows_written == 1  # only C
    assert gauges() == (1, 10)
    spool.ack(item.id for item in held)
    await spool.flush()
    assert gauges() == (0, 0)
    for s in spools.values():
        await s.close()


def test_a_spool_that_cannot_open_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says "disk I/O error" when a full disk stops its WAL recovery: the message adds the free space."""
    from bridge import spool as spool_module

    usage = spool_module.shutil.disk_usage(tmp_path)
    assert spool_module._free_space_note(str(tmp_path / "s.db")) == ""  # this disk has room
    monkeypatch.setattr(spool_module.shutil, "disk_usage", lambda _: usage._replace(free=4096))  # the disk: not under test
    assert spool_module._free_space_note(str(tmp_path / "s.db")) == " (the disk holding it is full: 4096 bytes free)"
