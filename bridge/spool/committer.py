"""The spool's owner task: group-commit timing, paging in, checkpoints, disk-error retry.

One coroutine performs every disk step in sequence (commit, page in, checkpoint),
so the ledger and the file never disagree. Small steps run on the event loop's
thread; big ones and checkpoints on the spool's own thread (see ``_INLINE_MAX_ROWS``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from bridge.errors import SpoolError
from bridge.spool.ledger import Ledger
from bridge.spool.store import DiskUsage, Spooled, SqliteStore, is_corruption

__all__ = ["Committer"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_FIRST_BACKOFF: Final = 0.01
_MAX_BACKOFF: Final = 1.0
# A commit of this many rows or more means the stream is busy: commit less often
# (5 x commit_interval) so that more rows share each transaction.
_BUSY_ROWS: Final = 32
# Small commits run on the loop's thread: about 0.1 ms of SQLite, where a hand-off
# to the spool thread costs a GIL round trip that waits up to the 5 ms switch
# interval while the loop is busy. A commit that takes longer than _INLINE_SLOW
# (a slow disk) sends commits to the thread again for _INLINE_PAUSE seconds.
_INLINE_MAX_ROWS: Final = 256  # also the page size of backlog reads on the loop's thread
_INLINE_MAX_BYTES: Final = 256 * 1024
_INLINE_SLOW: Final = 0.005
_INLINE_PAUSE: Final = 5.0
# Deletes of acked rows ride along with the next commit of new rows. Without one, they
# are written on their own after _DELETE_DELAY or once _DELETE_BATCH of them wait: at
# a steady stream this halves the transactions (and the WAL they fill, hence the
# checkpoints). A crash in between republishes those few messages: duplicates, never a loss.
_DELETE_DELAY: Final = 0.2
_DELETE_BATCH: Final = 256
# Loop passes a group wait that ends by its timer leaves to confirms already read (see _group_wait).
_SETTLE_PASSES: Final = 4


class Committer:
    """Owns the store: commits what the ledger collected and pages the backlog back in."""

    def __init__(
        self,
        path: str,
        store: SqliteStore | None,
        executor: ThreadPoolExecutor | None,
        ledger: Ledger,
        *,
        commit_interval: float,
        commit_batch: int,
        commit_bytes: int,
        on_change: Callable[[], None],
        want_checkpoint: Callable[[DiskUsage], bool],
        taker_waiting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.path = path
        self.store = store
        self.executor = executor
        self.ledger = ledger
        self.commit_interval = commit_interval
        self.commit_batch = commit_batch
        self.commit_bytes = commit_bytes
        self._on_change = on_change
        self._want_checkpoint = want_checkpoint
        self._taker_waiting = taker_waiting
        self.usage = store.usage() if store is not None else DiskUsage(0, 0)
        self.tx_started = 0
        self.tx_done = 0
        self.disk_error: BaseException | None = None
        self.disk_error_since = 0.0
        self.failed: BaseException | None = None
        self.closing = False
        self.flushers = 0
        self._last_commit = 0.0
        self._last_rows = 0
        self._inline_from = 0.0  # steps may run on the loop's thread from this time
        # FULL and EXTRA fsync at each commit: never on the loop's thread, where it would stall the stream.
        self._inline_writes = store is None or store.synchronous in ("OFF", "NORMAL")
        self._read_failing = False
        self._wake = asyncio.Event()  # there is work
        self._now = asyncio.Event()  # commit now, do not wait for the interval
        self._group_waiting = False  # in the group-commit wait
        self._delete_timer: asyncio.TimerHandle | None = None
        self.lock = asyncio.Lock()  # one disk step at a time (the owner, discard, expire)

    # -- signals from the facade -----------------------------------------------------

    def wake(self, *, now: bool = False) -> None:
        """There is work; ``now``: do not wait for the commit interval."""
        self._wake.set()
        if now or self.ledger.pending >= self.commit_batch or self.ledger.pending_bytes >= self.commit_bytes:
            self._now.set()

    def pending_confirmed(self) -> None:
        """Acks came: once every uncommitted row is confirmed (early hand-out), a group wait has no reason left.

        It ends now, in the loop pass that took the confirm, instead of by its timer one interval
        later: at a low rate that timer was one more wake-up of the process for every event.
        """
        if self._group_waiting and not self.ledger.pending:
            self._now.set()

    def wake_deletes(self, *, urgent: bool = False) -> None:
        """Acks were taken: write their deletes with the next commit, or soon (see ``_DELETE_DELAY``).

        ``urgent`` (the spool is full), a backlog on disk (acks make room in the window
        to page in), a flush or a close: at once, as for new rows.
        """
        ledger = self.ledger
        if urgent or ledger.disk_only or self.flushers or self.closing or ledger.deletes >= _DELETE_BATCH:
            self.wake()
            return
        if ledger.pending or self._wake.is_set():
            return  # a commit is coming anyway and takes the deletes along
        if self._delete_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called from outside the loop (a test driving it): write at once
                self.wake()
                return
            self._delete_timer = loop.call_later(_DELETE_DELAY, self._deletes_due)

    def _deletes_due(self) -> None:
        self._delete_timer = None
        if self.ledger.has_deletes:
            self.wake()

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the spool's thread."""
        assert self.executor is not None
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- the owner loop --------------------------------------------------------------

    async def run(self) -> None:
        """Commit, page in and checkpoint until closed and nothing is left to write."""
        backoff = _FIRST_BACKOFF
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._group_wait()
                async with self.lock:
                    ok = await self._commit() and await self.page_in()
                    if ok:
                        await self._checkpoint_if_wanted()
                if not ok:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    self._wake.set()
                    continue
                backoff = _FIRST_BACKOFF
                if self.closing and not self.ledger.pending and not self.ledger.has_deletes:
                    return
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("spool %s: commit loop failed: %s", self.path, exc, exc_info=True)
                self.failed = exc
            self._on_change()
            raise

    async def _group_wait(self) -> None:
        """Adaptive group commit: an idle spool commits at once, a busy one at most once per interval."""
        ledger = self.ledger
        if (
            self.store is None
            or not ledger.pending
            or ledger.pending >= self.commit_batch
            or ledger.pending_bytes >= self.commit_bytes
            or self.flushers
            or self.closing
            or self.disk_error is not None
        ):
            self._last_commit = asyncio.get_running_loop().time()
            return
        loop = asyncio.get_running_loop()
        interval = self.commit_interval * (1 if self._last_rows < _BUSY_ROWS else 5)
        wait = self._last_commit + interval - loop.time()
        if not ledger.fresh or self._taker_waiting():
            # Every pending message is with the publisher (early hand-out), or is about to be: give
            # RabbitMQ the interval to confirm them; what it confirms in time is never written.
            wait = max(wait, interval)
        if wait > 0:
            # A timer that sets the event, not asyncio.timeout: at a low rate this wait ends by the
            # timer for nearly every event, and a timeout does it by cancelling the task and raising.
            self._now.clear()
            timer = loop.call_later(wait, self._now.set)
            self._group_waiting = True
            try:
                await self._now.wait()
                # The timer may fire in the same loop pass that read RabbitMQ's confirm: that confirm
                # reaches the ledger through aiormq's reader tasks and the publisher's flush, a few
                # passes later. Let them run (no sleep, no wake-up) so a row confirmed in time is not
                # written and deleted again; at 100 events/s that was every row.
                for _ in range(_SETTLE_PASSES):
                    if not ledger.pending or ledger.fresh:
                        break
                    await asyncio.sleep(0)
            finally:
                self._group_waiting = False
                timer.cancel()
        self._last_commit = loop.time()

    async def _commit(self) -> bool:
        """Write the pending rows and deletes in one transaction; False if the disk refused."""
        ledger = self.ledger
        rows, deletes = ledger.take_writes()
        if not rows and not deletes:
            return True  # nothing to write (keeps _last_rows: an empty step says nothing about the load)
        self._last_rows = len(rows)
        self.tx_started += 1
        tx = self.tx_started
        if self.store is not None:
            try:
                await self._write(self.store, rows, deletes)
            except (sqlite3.Error, OSError) as exc:
                ledger.restore(rows, deletes)
                if is_corruption(exc):
                    raise SpoolError(f"spool {self.path} is damaged: {exc}") from exc
                self._disk_refused(exc)
                return False
            except BaseException:
                # Cancelled (close gave up): nothing is dropped from the count of what is lost.
                ledger.restore(rows, deletes)
                raise
            if self.disk_error is not None:
                since = time.monotonic() - self.disk_error_since
                log.info("spool %s: commits work again after %.1f s", self.path, since)
                self.disk_error = None
        ledger.committed(rows)
        self.tx_done = tx
        self._on_change()
        return True

    def _disk_refused(self, exc: BaseException) -> None:
        if self.disk_error is None:
            log.error(
                "spool %s: commit failed (%s); keeping %d messages in memory, pausing puts, retrying",
                self.path, exc, self.ledger.pending, exc_info=True,
            )  # fmt: skip
            self.disk_error = exc
            self.disk_error_since = time.monotonic()
        self._on_change()

    async def _write(self, store: SqliteStore, rows: list[Spooled], deletes: list[int]) -> None:
        """One transaction: inline when small and the disk is quick, else on the spool thread."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        small = len(rows) + len(deletes) <= _INLINE_MAX_ROWS and sum(len(r.msg.body) for r in rows) <= _INLINE_MAX_BYTES
        if small and self._inline_writes and now >= self._inline_from:
            store.write(rows, deletes)
            self.usage = store.usage()
            took = loop.time() - now
            if took > _INLINE_SLOW:
                self._inline_from = loop.time() + _INLINE_PAUSE
                log.debug("spool %s: a commit took %.1f ms; committing on the spool thread", self.path, took * 1e3)
        else:
            await self.call(store.write, rows, deletes)
            self.usage = await self.call(store.usage)

    async def _checkpoint_if_wanted(self) -> None:
        """Checkpoint on the spool thread when the facade wants it (a big WAL, or a full spool).

        Checked after every step, not only after a write: a full spool whose messages are all
        confirmed before their commit writes nothing, yet its WAL must shrink for it to have room.
        """
        store = self.store
        if store is None or not self._want_checkpoint(self.usage):
            return
        try:
            await self.call(store.checkpoint)
            self.usage = await self.call(store.usage)
        except (sqlite3.Error, OSError) as exc:
            log.warning("spool %s: WAL checkpoint failed (%s); will retry", self.path, exc, exc_info=True)
        self._on_change()

    async def page_in(self) -> bool:
        """Refill the window from disk when it is half empty; False if the read failed."""
        store = self.store
        if store is None:
            return True
        loop = asyncio.get_running_loop()
        while (request := self.ledger.page_request()) is not None:
            try:
                now = loop.time()
                if now >= self._inline_from:
                    rows = store.read_after(request.after_id, min(request.rows, _INLINE_MAX_ROWS), request.nbytes)
                    if loop.time() - now > _INLINE_SLOW:
                        self._inline_from = loop.time() + _INLINE_PAUSE
                else:
                    rows = await self.call(store.read_after, request.after_id, request.rows, request.nbytes)
            except (sqlite3.Error, OSError) as exc:
                if is_corruption(exc):
                    raise SpoolError(f"spool {self.path} is damaged: {exc}") from exc
                if not self._read_failing:
                    log.error("spool %s: reading the backlog failed (%s); retrying", self.path, exc, exc_info=True)
                    self._read_failing = True
                return False
            self._read_failing = False
            if not self.ledger.paged_in(rows):
                log.error("spool %s: expected more rows on disk after id %d, found none", self.path, request.after_id)
            self._on_change()
        return True
