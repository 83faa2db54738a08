"""The hand-out ledger: which spooled message is where, pure and synchronous.

A message moves through these places, and the ledger counts messages and body
bytes in each so that memory stays bounded in bytes, not only in messages::

    add() ──▶ fresh ──committed()──▶ window ─────hand_out()──▶ in flight ──ack()──▶ deletes
                │           │            ▲                        ▲   │
                │           └─▶ disk only┘ paged_in()   released ◀┼───┘ release()
                └──────────────── hand_out(early=True) ───────────┘

Two things are tracked for each message: where it is for hand-out (fresh, window,
disk only, in flight, released) and whether it is written (pending, being written,
on disk). ``fresh`` messages are not on disk yet; ``window`` and ``disk only`` are
committed and not handed out; every disk-only id is above every window id, so
order is kept by paging in from ``tail_id``.

Early hand-out: once nothing older waits (no disk-only backlog, an empty window),
a fresh message may go to the publisher before its commit. Its row is still
written at the next group commit, unless RabbitMQ confirmed it first: then it is
never written at all (``ack`` takes it out of ``pending``). A message is therefore
always in RabbitMQ's hands or in a commit that is at most one group-commit
interval away, as it was before; but a quick broker saves the disk write.

No I/O and no asyncio here: the committer and the facade drive it, and it is
tested through these methods alone.
"""

from __future__ import annotations

import collections
import heapq
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bridge.contract import Outbound
from bridge.spool.store import Snapshot, Spooled

__all__ = ["Ledger", "Limits", "PageRequest", "Threshold"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds of the in-memory parts, in messages and bytes.

    Attributes:
        window_rows: most committed messages kept in memory for hand-out. Small on purpose: a broker
            outage fills the window, and RSS keeps that high-water mark after the drain (pymalloc
            frees an arena only once it is empty); 1000 drains as fast as 5000 did (issue 14).
        window_bytes: most body bytes in the window (one message may cross it).
        pending_bytes: uncommitted body bytes at which ``room`` turns False.
        pending_rows: uncommitted messages at which ``room`` turns False. This bounds what a
            crash (SIGKILL, OOM) can lose of what was read: the stream stops reading until the
            commit has them. 256 is about 13 ms of a 20,000 events/s burst; with 8,192 a SIGKILL
            in a burst lost up to 16,384 events read (8,192 waiting, 8,192 being written).
        in_flight_bytes: handed-out (and released) body bytes above which the
            window hands out nothing more until acks come.
    """

    window_rows: int = 1000
    window_bytes: int = 8 * 1024**2
    pending_bytes: int = 1024**2
    in_flight_bytes: int = 16 * 1024**2
    pending_rows: int = 256

    @classmethod
    def unbounded_window(cls, pending_bytes: int) -> Limits:
        """Limits for a spool without disk: the window is the whole backlog."""
        return cls(window_rows=sys.maxsize, window_bytes=sys.maxsize, pending_bytes=pending_bytes,
                   in_flight_bytes=sys.maxsize)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Read rows with an id above ``after_id``: at most ``rows`` of them, stop after ``nbytes``."""

    after_id: int
    rows: int
    nbytes: int


def _size(item: Spooled) -> int:
    return len(item.msg.body)


class Ledger:
    """Counts and places every message between ``add`` and ``ack``."""

    def __init__(self, snapshot: Snapshot, limits: Limits) -> None:
        self.limits = limits
        self.next_id = snapshot.next_id
        self.depth = snapshot.count
        self.bytes = snapshot.nbytes
        self.committed_id = snapshot.next_id - 1
        self._pending: dict[int, Spooled] = {}  # not written yet, in id order
        self.pending_bytes = 0
        self._writing: dict[int, Spooled] = {}  # the transaction being written (neither pending nor on disk)
        self._acked_while_writing: set[int] = set()
        self.writing_bytes = 0
        self._fresh: collections.deque[Spooled] = collections.deque()  # not committed, not handed out
        self.early_id = 0  # highest id handed out before its commit
        self.rows_written = 0
        self._deletes: list[int] = []
        self._window: collections.deque[Spooled] = collections.deque()
        self.window_bytes = 0
        self.tail_id = 0
        self.disk_only = snapshot.count
        self.disk_only_bytes = snapshot.nbytes
        self._released: list[tuple[int, Spooled]] = []
        self._released_bytes = 0
        self._in_flight: dict[int, int] = {}
        self.in_flight_bytes = 0

    # -- views ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages added and not yet committed."""
        return len(self._pending)

    @property
    def fresh(self) -> int:
        """Messages not committed and not handed out (early hand-out takes them from here)."""
        return len(self._fresh)

    @property
    def window(self) -> int:
        """Committed messages in memory, not handed out."""
        return len(self._window)

    @property
    def in_flight(self) -> int:
        """Messages handed out and neither acked nor released."""
        return len(self._in_flight)

    @property
    def memory_bytes(self) -> int:
        """Body bytes the ledger holds in memory (pending, window, released, in flight).

        A message handed out before its commit counts twice (pending and in flight): a bound, not a sum.
        """
        return self.pending_bytes + self.window_bytes + self._released_bytes + self.in_flight_bytes

    @property
    def has_deletes(self) -> bool:
        """Acks or drops wait to be written."""
        return bool(self._deletes)

    @property
    def deletes(self) -> int:
        """Acks or drops waiting to be written."""
        return len(self._deletes)

    @property
    def room(self) -> bool:
        """True while an ``add`` keeps pending bytes within bounds (an empty pending always has room)."""
        pending = self._pending
        limits = self.limits
        return not pending or (self.pending_bytes < limits.pending_bytes and len(pending) < limits.pending_rows)

    @property
    def ready(self) -> bool:
        """True if ``hand_out(early=True)`` would return something."""
        return self.ready_for(early=True)

    def ready_for(self, *, early: bool) -> bool:
        """True if ``hand_out(early=early)`` would return something."""
        if self._released:
            return True
        if self._window:
            return self._may_hand_out_window()
        return early and bool(self._fresh) and not self.disk_only and self._may_hand_out_window()

    def _may_hand_out_window(self) -> bool:
        held = self.in_flight_bytes + self._released_bytes
        return held < self.limits.in_flight_bytes or not self._in_flight

    # -- put side ------------------------------------------------------------------

    def add(self, msg: Outbound) -> Spooled:
        """Take a message: it gets the next id and waits for a commit."""
        item = Spooled(self.next_id, msg)
        self.next_id += 1
        self._pending[item.id] = item
        self._fresh.append(item)
        size = len(msg.body)
        self.pending_bytes += size
        self.depth += 1
        self.bytes += size
        return item

    def take_writes(self) -> tuple[list[Spooled], list[int]]:
        """Everything to write in the next transaction: pending rows and deletes."""
        self._writing, self._pending = self._pending, {}
        rows = list(self._writing.values())
        self.writing_bytes = self.pending_bytes
        self.pending_bytes = 0
        deletes, self._deletes = self._deletes, []
        return rows, deletes

    def restore(self, rows: list[Spooled], deletes: list[int]) -> None:
        """The transaction failed: its rows and deletes go back in front of newer ones.

        A row confirmed while it was being written is not written again, and its delete is dropped.
        """
        acked = self._acked_while_writing
        if acked:
            rows = [item for item in rows if item.id not in acked]
            self._deletes = [i for i in self._deletes if i not in acked]
            acked.clear()
        pending = {item.id: item for item in rows}
        pending.update(self._pending)
        self._pending = pending
        self.pending_bytes += sum(map(_size, rows))
        self._writing = {}
        self.writing_bytes = 0
        self._deletes[:0] = deletes

    def committed(self, rows: list[Spooled]) -> None:
        """The rows are on disk: into the window while it has room, else counted as on disk only.

        Rows handed out early are already in flight (or released, or acked) and stay where they are.
        """
        self._writing = {}
        self._acked_while_writing.clear()
        self.writing_bytes = 0
        if not rows:
            return
        self.rows_written += len(rows)
        self.committed_id = max(self.committed_id, rows[-1].id)
        limits = self.limits
        fresh = self._fresh
        early_id = self.early_id
        for item in rows:
            if item.id <= early_id:
                # Handed out already; everything older is too, and disk-only rows are paged in
                # from above tail_id: move it past this row, or a page-in would hand it out again.
                self.tail_id = item.id
                continue
            if fresh and fresh[0] is item:
                fresh.popleft()
            size = _size(item)
            fits = len(self._window) < limits.window_rows and self.window_bytes < limits.window_bytes
            if not self.disk_only and fits:
                self._window.append(item)
                self.window_bytes += size
                self.tail_id = item.id
            else:
                self.disk_only += 1
                self.disk_only_bytes += size

    # -- hand-out side -------------------------------------------------------------

    def hand_out(self, max_n: int, *, early: bool = False) -> list[Spooled]:
        """Up to ``max_n`` messages, released ones first, then the window, in id order.

        ``early``: once the window and the disk-only backlog are empty, fresh (not yet committed)
        messages too; their commit follows, unless RabbitMQ confirms them first.
        """
        batch: list[Spooled] = []
        while self._released and len(batch) < max_n:
            item = heapq.heappop(self._released)[1]
            self._released_bytes -= _size(item)
            batch.append(item)
        window = self._window
        cap = self.limits.in_flight_bytes
        held = self.in_flight_bytes + self._released_bytes + sum(map(_size, batch))
        while window and len(batch) < max_n:
            # One message always goes out when nothing is held, however big it is.
            if held >= cap and (batch or self._in_flight):
                break
            item = window.popleft()
            size = _size(item)
            self.window_bytes -= size
            held += size
            batch.append(item)
        if early and not window and not self.disk_only:
            fresh = self._fresh
            while fresh and len(batch) < max_n:
                if held >= cap and (batch or self._in_flight):
                    break
                item = fresh.popleft()
                held += _size(item)
                batch.append(item)
                self.early_id = item.id
        for item in batch:
            size = _size(item)
            self._in_flight[item.id] = size
            self.in_flight_bytes += size
        return batch

    def ack(self, ids: Iterable[int]) -> int:
        """Forget confirmed messages (their delete waits for the next commit); how many were in flight."""
        n = 0
        for i in ids:
            size = self._in_flight.pop(i, None)
            if size is None:
                continue
            self.in_flight_bytes -= size
            if self._pending.pop(i, None) is not None:
                self.pending_bytes -= size  # confirmed before its commit: never written
            else:
                if i in self._writing:
                    self._acked_while_writing.add(i)
                self._deletes.append(i)
            self.depth -= 1
            self.bytes -= size
            n += 1
        return n

    def release(self, items: Iterable[Spooled]) -> int:
        """Hand messages out again, before anything newer; how many were in flight."""
        n = 0
        for item in items:
            size = self._in_flight.pop(item.id, None)
            if size is None:
                continue
            self.in_flight_bytes -= size
            self._released_bytes += size
            heapq.heappush(self._released, (item.id, item))
            n += 1
        return n

    # -- paging --------------------------------------------------------------------

    def page_request(self) -> PageRequest | None:
        """What to read from disk to refill a half-empty window, or None."""
        limits = self.limits
        if not self.disk_only:
            return None
        if len(self._window) > limits.window_rows // 2 or self.window_bytes > limits.window_bytes // 2:
            return None
        rows = min(limits.window_rows - len(self._window), self.disk_only)
        return PageRequest(self.tail_id, max(rows, 1), max(limits.window_bytes - self.window_bytes, 1))

    def paged_in(self, rows: list[Spooled]) -> bool:
        """Rows read for a ``page_request``; False (and the disk-only count reset) if none came."""
        if not rows:
            self.disk_only = 0
            self.disk_only_bytes = 0
            return False
        for item in rows:
            self._window.append(item)
            self.window_bytes += _size(item)
        self.tail_id = rows[-1].id
        self.disk_only -= len(rows)
        self.disk_only_bytes -= sum(map(_size, rows))
        return True

    # -- dropping (high availability) ---------------------------------------------

    def drop_in_memory(self, keep: Callable[[Spooled], bool]) -> int:
        """Drop fresh, window and released messages for which ``keep`` is False; how many.

        Messages in flight are kept. Call it between commits (nothing is being written).
        """
        dropped = 0
        kept_fresh: collections.deque[Spooled] = collections.deque()
        for item in self._fresh:
            if keep(item):
                kept_fresh.append(item)
            else:
                self._forget(item)
                dropped += 1
        self._fresh = kept_fresh
        kept_window: collections.deque[Spooled] = collections.deque()
        for item in self._window:
            if keep(item):
                kept_window.append(item)
            else:
                self.window_bytes -= _size(item)
                self._forget(item)
                dropped += 1
        self._window = kept_window
        kept_released = [(i, item) for i, item in self._released if keep(item)]
        for _, item in self._released:
            if not keep(item):
                self._released_bytes -= _size(item)
                self._forget(item)
                dropped += 1
        heapq.heapify(kept_released)
        self._released = kept_released
        return dropped

    def dropped_on_disk(self, gone: Iterable[tuple[int, int, str]]) -> int:
        """Rows (id, size, message_id) the store deleted from the disk-only part; how many."""
        n = 0
        for _, size, _ in gone:
            self.disk_only -= 1
            self.disk_only_bytes -= size
            self.depth -= 1
            self.bytes -= size
            n += 1
        return n

    def _forget(self, item: Spooled) -> None:
        """Count a dropped message out: unwritten, it is not written; written (or being written), deleted."""
        size = _size(item)
        self.depth -= 1
        self.bytes -= size
        if self._pending.pop(item.id, None) is not None:
            self.pending_bytes -= size
        else:
            self._deletes.append(item.id)


class Threshold:
    """Full at ``limit`` bytes, room again only below ``resume`` x ``limit`` (no flapping at the bound)."""

    def __init__(self, limit: int, resume: float = 0.9) -> None:
        self.limit = limit
        self.resume = resume
        self.full = False

    def update(self, size: int, *, forced: bool = False) -> bool:
        """Feed the current size (``forced``: full whatever the size); True if ``full`` changed."""
        bound = self.limit * (self.resume if self.full else 1.0)
        full = forced or size >= bound
        changed = full != self.full
        self.full = full
        return changed
