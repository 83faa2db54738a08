"""What the spool holds in memory and how often it writes: the bounds and timings behind its CPU and RSS."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.spool import Spool
from bridge.spool.ledger import Ledger, Limits
from bridge.spool.store import Snapshot
from tests.helpers import wait_until
from tests.test_spool_ledger import msg


def test_uncommitted_messages_are_bounded_in_count_not_only_bytes() -> None:
    """Small messages stop ``room`` at ``pending_rows`` even far below the byte bound."""
    ledger = Ledger(Snapshot(0, 0, 1), Limits(pending_rows=100, pending_bytes=10**9))
    for n in range(99):
        ledger.add(msg(n))
    assert ledger.room
    ledger.add(msg(99))
    assert not ledger.room
    rows, _ = ledger.take_writes()
    ledger.committed(rows)
    assert ledger.room


async def test_a_put_waits_at_the_row_bound_and_goes_on_after_the_commit(tmp_path: Path) -> None:
    """With a slow commit pending, the put beyond ``pending_rows`` waits; every message is kept once it resumes."""
    spool = await Spool.open(str(tmp_path / "s.db"), limits=Limits(pending_rows=10), commit_interval=0.05)
    try:
        for n in range(50):
            await asyncio.wait_for(spool.put(msg(n)), timeout=10)
        assert spool.depth == 50
        await spool.flush()
        got = await spool.get_batch(100)
        assert [item.msg.message_id for item in got] == [f"m{n}" for n in range(50)]
    finally:
        await spool.close()


async def test_acks_alone_are_written_soon_and_with_the_next_rows_at_once(tmp_path: Path) -> None:
    """An ack with no new rows is not a transaction of its own at once but is written soon; one followed by a put goes with that commit."""
    path = tmp_path / "s.db"
    spool = await Spool.open(str(path))
    try:
        for n in range(3):
            await spool.put(msg(n))
        await spool.flush()
        first = await spool.get_batch(3)
        ledger = spool._ledger
        spool.ack([first[0].id])
        await asyncio.sleep(0.05)
        assert ledger.has_deletes  # not a transaction of its own yet
        assert await wait_until(lambda: not ledger.has_deletes, timeout=5)  # the delete timer wrote it
        spool.ack([first[1].id])
        await spool.put(msg(3))
        await spool.flush()  # the commit of the new row carries the second delete
        assert not ledger.has_deletes
    finally:
        report = await spool.close()
    assert report.kept == 2  # m2 (handed out, not acked) and m3
    reopened = await Spool.open(str(path))
    try:
        again = await reopened.get_batch(10)
        assert [item.msg.message_id for item in again] == ["m2", "m3"]
    finally:
        await reopened.close()
