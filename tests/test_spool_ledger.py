"""The hand-out ledger and the spool's high-availability primitives (discard, expire)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bridge.contract import KIND_EVENT, Outbound
from bridge.spool import MEMORY, Spool, Spooled
from bridge.spool.ledger import Ledger, Limits, Threshold
from bridge.spool.store import Snapshot


def msg(n: int, size: int = 8, received_at: float | None = None) -> Outbound:
    """A distinct message whose body starts with its number."""
    body = f"{n:08d}".encode().ljust(size, b"x")
    at = 1000.0 + n if received_at is None else received_at
    return Outbound(KIND_EVENT, "transaction.done", f"m{n}", body, {}, at, "x")


def nums(items: list[Spooled]) -> list[int]:
    """The message numbers of a batch."""
    return [int(item.msg.message_id[1:]) for item in items]


def test_window_is_bounded_in_bytes_not_only_messages() -> None:
    """100 KB messages fill the window up to its byte bound; the rest is counted as on disk only."""
    limits = Limits(window_rows=5000, window_bytes=1024**2, pending_bytes=1024**2, in_flight_bytes=2 * 1024**2)
    ledger = Ledger(Snapshot(0, 0, 1), limits)
    rows = [ledger.add(msg(n, size=100_000)) for n in range(100)]
    assert not ledger.room  # pending bytes at the bound: put must wait
    written, _ = ledger.take_writes()
    assert written == rows
    ledger.committed(written)
    assert ledger.window_bytes <= 1024**2 + 100_000
    assert ledger.disk_only == 100 - ledger.window
    assert ledger.memory_bytes <= 1024**2 + 100_000


def test_hand_out_stops_at_the_in_flight_byte_bound() -> None:
    """Handed-out bytes stay under their bound; acks let more out; one message always goes out."""
    limits = Limits(window_rows=5000, window_bytes=10**9, pending_bytes=10**9, in_flight_bytes=300_000)
    ledger = Ledger(Snapshot(0, 0, 1), limits)
    for n in range(10):
        ledger.add(msg(n, size=100_000))
    ledger.committed(ledger.take_writes()[0])
    first = ledger.hand_out(10)
    assert nums(first) == [0, 1, 2]
    assert not ledger.ready
    assert ledger.hand_out(10) == []
    ledger.ack([first[0].id])
    assert ledger.ready
    assert nums(ledger.hand_out(10)) == [3]
    big = Ledger(Snapshot(0, 0, 1), Limits(in_flight_bytes=10))
    big.add(msg(0, size=1000))
    big.committed(big.take_writes()[0])
    assert nums(big.hand_out(5)) == [0]


def test_released_come_back_first_and_failed_writes_keep_order() -> None:
    """Released messages go out before newer ones; a failed write puts its rows back in front."""
    ledger = Ledger(Snapshot(0, 0, 1), Limits())
    for n in range(3):
        ledger.add(msg(n))
    rows, deletes = ledger.take_writes()
    ledger.add(msg(3))
    ledger.restore(rows, deletes)
    ledger.committed(ledger.take_writes()[0])
    batch = ledger.hand_out(2)
    assert ledger.release([batch[1], batch[0]]) == 2
    assert nums(ledger.hand_out(10)) == [0, 1, 2, 3]
    assert ledger.depth == 4


def test_threshold_has_hysteresis() -> None:
    """Full at the limit, room again only below 90 % of it; a forced state is full whatever the size."""
    t = Threshold(100)
    assert not t.update(99) and not t.full
    assert t.update(100) and t.full
    assert not t.update(91) and t.full
    assert t.update(89) and not t.full
    assert t.update(0, forced=True) and t.full


@pytest.mark.parametrize("where", ["file", MEMORY])
async def test_discard_drops_by_message_id_except_handed_out(tmp_path: Path, where: str) -> None:
    """discard drops matching messages wherever they wait (window, disk, buffer), never one in flight."""
    path = str(tmp_path / "s.db") if where == "file" else MEMORY
    spool = await Spool.open(path, window=4)
    for n in range(20):
        await spool.put(msg(n))
    await spool.flush()
    out = await spool.get_batch(2)  # 0, 1 in flight
    await spool.put(msg(20))  # maybe not committed yet
    found: set[str] = set()
    dropped = await spool.discard(["m0", "m3", "m10", "m15", "m20", "nope"], found=found)
    assert dropped == 4
    assert found == {"m3", "m10", "m15", "m20"}  # what was dropped, from memory and from disk alike
    assert spool.depth == 21 - 4
    spool.release(out)
    rest: list[Spooled] = []
    while spool.depth:
        batch = await asyncio.wait_for(spool.get_batch(3), 5)
        rest.extend(batch)
        spool.ack(i.id for i in batch)
    assert nums(rest) == [n for n in range(20) if n not in (3, 10, 15)]
    await spool.close()
    again = await Spool.open(path)
    assert again.depth == 0
    await again.close()


def _early_ledger(n: int, limits: Limits | None = None) -> tuple[Ledger, list[Spooled]]:
    ledger = Ledger(Snapshot(0, 0, 1), limits or Limits())
    return ledger, [ledger.add(msg(i)) for i in range(n)]


def test_early_hand_out_takes_fresh_messages_only_when_nothing_older_waits() -> None:
    """Fresh messages go out early after the window; never while a disk-only backlog is older than them."""
    ledger, _ = _early_ledger(3)
    assert ledger.hand_out(10) == []  # committed-only hand-out: nothing yet
    assert nums(ledger.hand_out(2, early=True)) == [0, 1]
    assert ledger.fresh == 1 and ledger.pending == 3
    backlog = Ledger(Snapshot(count=5, nbytes=40, next_id=6), Limits())  # 5 rows from an earlier run
    backlog.add(msg(9))
    assert not backlog.ready_for(early=True)
    assert backlog.hand_out(10, early=True) == []
    window = Ledger(Snapshot(0, 0, 1), Limits())
    window.add(msg(0))
    window.committed(window.take_writes()[0])
    window.add(msg(1))
    assert nums(window.hand_out(10, early=True)) == [0, 1]  # the window first, then the fresh one


def test_early_message_acked_before_its_commit_is_never_written() -> None:
    """An ack before the commit takes the row out of the next transaction; no delete is written either."""
    ledger, _ = _early_ledger(4)
    batch = ledger.hand_out(10, early=True)
    ledger.ack([batch[0].id, batch[2].id])
    rows, deletes = ledger.take_writes()
    assert nums(rows) == [1, 3] and deletes == []
    ledger.committed(rows)
    assert ledger.window == 0 and ledger.in_flight == 2  # written while in flight: not in the window
    ledger.ack([batch[1].id])
    assert ledger.take_writes() == ([], [batch[1].id])
    assert ledger.depth == 1 and ledger.pending_bytes == 0


def test_ack_during_a_failed_write_drops_the_row_from_the_retry() -> None:
    """Confirmed while its transaction was being written and that transaction failed: not written again."""
    ledger, _ = _early_ledger(3)
    batch = ledger.hand_out(10, early=True)
    rows, deletes = ledger.take_writes()
    ledger.ack([batch[1].id])  # the write is in progress
    ledger.restore(rows, deletes)  # and it failed
    rows, deletes = ledger.take_writes()
    assert nums(rows) == [0, 2] and deletes == []
    ledger.committed(rows)
    assert ledger.depth == 2


def test_released_early_message_goes_out_again_and_is_committed_once() -> None:
    """A release before the commit: handed out again first; the commit does not add it to the window too."""
    ledger, _ = _early_ledger(3)
    batch = ledger.hand_out(10, early=True)
    ledger.release(batch[1:])
    ledger.committed(ledger.take_writes()[0])
    assert ledger.window == 0
    again = ledger.hand_out(10, early=True)
    assert nums(again) == [1, 2]
    assert ledger.hand_out(10, early=True) == []
    ledger.ack(item.id for item in batch[:1] + again)
    assert ledger.depth == 0 and ledger.memory_bytes == 0


def test_drop_in_memory_counts_a_fresh_or_early_released_message_once() -> None:
    """A standby's discard of messages that are fresh, or released before their commit, keeps the counts right."""
    ledger, _ = _early_ledger(4)
    first = ledger.hand_out(2, early=True)  # 0 and 1 early; 2 and 3 fresh
    ledger.release(first[1:])  # 1 released, not written
    dropped = ledger.drop_in_memory(lambda item: nums([item]) == [2])
    assert dropped == 2  # 1 (released) and 3 (fresh); 0 is in flight and stays
    assert ledger.depth == 2 and ledger.pending == 2
    rows, deletes = ledger.take_writes()
    assert nums(rows) == [0, 2] and deletes == []
    ledger.committed(rows)
    assert nums(ledger.hand_out(10, early=True)) == [2]


def test_page_in_after_an_early_commit_does_not_hand_out_an_in_flight_message_again() -> None:
    """Early rows written while in flight, newer rows past a full window: paging in reads only the newer ones."""
    ledger = Ledger(Snapshot(0, 0, 1), Limits(window_rows=2))
    for i in range(3):
        ledger.add(msg(i))
    early = ledger.hand_out(10, early=True)
    for i in range(3, 8):
        ledger.add(msg(i))
    ledger.committed(ledger.take_writes()[0])  # 0-2 in flight; 3-4 in the window; 5-7 on disk only
    assert ledger.window == 2 and ledger.disk_only == 3
    ledger.ack(item.id for item in early)
    first = ledger.hand_out(10, early=True)
    assert nums(first) == [3, 4]
    request = ledger.page_request()
    assert request is not None and request.after_id == first[-1].id
    ledger.ack(item.id for item in first)
    assert ledger.depth == 3


def test_early_ids_are_kept_for_a_while_and_forgotten_once_seen() -> None:
    """A standby remembers an announced id it did not hold yet: for keep_for seconds, and at most max_ids."""
    from bridge.app import EarlyIds

    early = EarlyIds(max_ids=3)
    now = time.monotonic()
    early.add(["old"], now - 61, keep_for=60)  # announced 61 s ago: out of time
    early.add(["a", "b"], now, keep_for=60)
    assert len(early) == 2
    assert early.seen("a") and not early.seen("a")  # forgotten once seen
    early.add(["c", "d", "e"], now, keep_for=60)
    assert len(early) == 3 and not early.seen("b")  # the oldest went first
    assert early.seen("e") and not early.seen("nope")
