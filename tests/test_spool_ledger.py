"""The hand-out ledger and the spool's high-availability primitives (discard, expire)."""

from __future__ import annotations

import asyncio
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
    dropped = await spool.discard(["m0", "m3", "m10", "m15", "m20", "nope"])
    assert dropped == 4
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
