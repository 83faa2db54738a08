"""The durable outbox between the stream reader and the RabbitMQ publisher.

Every event is written to disk (SQLite, WAL mode) within one group-commit interval
of its ``put`` unless RabbitMQ confirmed it first, and its row is deleted only after
RabbitMQ confirmed it, so neither a broker outage nor a crash loses an event
(at-least-once). Flow of one message::

    put() ──▶ pending ──group commit──▶ SQLite ──▶ window / disk only ──get_batch()──▶ in flight
                 │                                     ▲                                │
                 │                                     └──────────── release() ◀────────┤
                 └────── get_batch() when nothing older waits (early hand-out) ─────────┤
                                                                                       ack() ──▶ DELETE
                                                                      (or never written, if acked before its commit)

Early hand-out is the fast path of a healthy bridge: the publisher sends a message
while its commit waits for the group-commit interval, and a message RabbitMQ confirms
within it is never written. A message not confirmed by then is committed as before,
so the time an event spends in neither RabbitMQ's hands nor on disk is not longer
than without early hand-out (and the publish is already on the wire by then).

The parts: ``store`` (the SQLite file only), ``ledger`` (pure bookkeeping of where
each message is, bounded in messages and bytes), ``committer`` (the one task that
does every disk step, with group-commit timing and disk-error retry), and this
facade, which waits and wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from bridge.contract import Outbound
from bridge.errors import SpoolError, SpoolPathError
from bridge.spool.committer import Committer
from bridge.spool.ledger import Ledger, Limits, Threshold
from bridge.spool.store import SYNCHRONOUS, DiskUsage, Snapshot, Spooled, SqliteStore

__all__ = ["MEMORY", "CloseReport", "Limits", "Spool", "SpoolHealth", "SpoolStats", "Spooled"]

log = logging.getLogger(__name__)

MEMORY: Final = "memory"
"""The ``--spool`` value that keeps the spool in memory only (lost on exit)."""

DEFAULT_WINDOW: Final = Limits().window_rows
_FULL_LOG_EVERY: Final = 60.0
_WAL_MIN: Final = 1024**2
_WAL_MAX: Final = 64 * 1024**2
# Disk bytes per body byte of a row before any is on disk (id, message id, headers, b-tree):
# measured about 1.6 for 100-byte bodies; learned from the file after the first commits.
_DISK_PER_BODY_DEFAULT: Final = 2.0
_DISK_PER_BODY_MAX: Final = 16.0


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """The spool's gauges, reported to ``on_stats`` after each commit and each change of ``full``.

    Attributes:
        depth: messages put and not yet acked.
        size_bytes: body bytes of those messages.
        full: ``put`` waits (at the bound, or the disk refuses writes).
        disk_bytes: bytes the spool takes on disk (pages in use plus the WAL file); 0 in memory.
        memory_bytes: body bytes held in memory (uncommitted, window, handed out).
        rows_written: messages written to disk since open (the rest were confirmed before their commit).
    """

    depth: int
    size_bytes: int
    full: bool
    disk_bytes: int
    memory_bytes: int
    rows_written: int = 0


@dataclass(frozen=True, slots=True)
class SpoolHealth:
    """Whether the spool works; ``reason`` says why not (or what degrades it)."""

    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class CloseReport:
    """The outcome of ``close()``.

    Attributes:
        kept: unacked messages on disk, handed out again at the next open.
        lost: messages accepted but not on disk (memory spool, or a disk that refused them).
        error: why the close was not clean, or None.
    """

    kept: int
    lost: int
    error: str | None = None


class Spool:
    """A durable, bounded outbox of ``Outbound`` messages with at-least-once hand-out.

    Durability: the file is in WAL mode. With ``synchronous="NORMAL"`` (the default) a
    committed message survives a crash or SIGKILL of the process; after a power loss
    or OS crash the last commits may be lost. ``synchronous="FULL"`` also survives
    power loss, at the cost of an fsync per group commit.

    Use ``await Spool.open(...)``, not the constructor.
    """

    def __init__(
        self,
        path: str,
        ledger: Ledger,
        store: SqliteStore | None,
        executor: ThreadPoolExecutor | None,
        *,
        max_bytes: int,
        on_stats: Callable[[SpoolStats], None] | None,
        commit_interval: float,
        commit_batch: int,
        wal_limit: int,
    ) -> None:
        self._path = path
        self._ledger = ledger
        self._wal_limit = wal_limit
        self._early_waiting = 0  # get_batch(early=True) calls waiting for messages
        self._acked_while_full = False  # acks freed space since the last checkpoint of a full spool
        self._committer = Committer(
            path, store, executor, ledger,
            commit_interval=commit_interval, commit_batch=commit_batch,
            commit_bytes=max(ledger.limits.pending_bytes // 4, 1),
            on_change=self._changed, want_checkpoint=self._want_checkpoint,
            taker_waiting=lambda: self._early_waiting > 0,
        )  # fmt: skip
        self._max_bytes = max_bytes
        self._threshold = Threshold(max_bytes)
        self._disk_per_body = _DISK_PER_BODY_DEFAULT
        self._on_stats = on_stats
        self._full_logged_at = -_FULL_LOG_EVERY
        self._full_announced = False
        self._closing = False
        self._closed = False
        self._ready = asyncio.Event()  # something to hand out
        self._space = asyncio.Event()  # a waiting put may go on
        self._committed = asyncio.Event()  # a commit finished (for flush)
        self._owner: asyncio.Task[None] | None = None

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        max_bytes: int = 2 * 1024**3,
        on_stats: Callable[[SpoolStats], None] | None = None,
        commit_interval: float = 0.002,
        commit_batch: int = Limits().pending_rows,
        synchronous: str = "NORMAL",
        window: int = DEFAULT_WINDOW,
        limits: Limits | None = None,
    ) -> Spool:
        """Open (or create) a spool and start its commit loop.

        Rows left by an earlier run are handed out first, in id order. A damaged file
        is salvaged: readable rows go into a fresh file, the damaged one is moved aside.

        Args:
            path: an SQLite file (created with its directory if missing), or ``"memory"``.
            max_bytes: bytes at which ``put`` starts to wait for acks: on disk (pages in
                use plus the WAL) for a file, body bytes for ``"memory"``.
            on_stats: called with the gauges after each commit and change of ``full``.
            commit_interval: least time between two commits (s); an idle spool commits at
                once, a busy one (>= 32 rows in its last commit) waits 5 x this long.
            commit_batch: commit at once when this many puts are buffered.
            synchronous: SQLite ``synchronous`` level: ``NORMAL`` survives a process
                crash, ``FULL`` also a power loss.
            window: most committed messages kept in memory for ``get_batch``.
            limits: byte bounds of the in-memory parts (``window`` overrides its rows).

        Returns:
            The open spool.

        Raises:
            SpoolError: the file cannot be opened or created, is not a spool, has a
                newer schema, or is in use by another process; or a parameter is
                invalid. The message names the path and the cause.
        """
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise SpoolError(f"spool {path}: synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        if max_bytes <= 0 or commit_batch <= 0 or window <= 0 or commit_interval < 0:
            raise SpoolError(f"spool {path}: max_bytes, commit_batch and window must be > 0 and commit_interval >= 0")
        base = limits or Limits()
        wal_limit = min(max(max_bytes // 16, _WAL_MIN), _WAL_MAX)
        if path == MEMORY:
            ledger = Ledger(Snapshot(0, 0, 1), Limits.unbounded_window(base.pending_bytes))
            store, executor = None, None
        else:
            ledger_limits = Limits(window_rows=window, window_bytes=base.window_bytes,
                                   pending_bytes=base.pending_bytes, in_flight_bytes=base.in_flight_bytes,
                                   pending_rows=base.pending_rows)
            store, executor, ledger = await _open_file(path, sync, wal_limit, ledger_limits)
        spool = cls(path, ledger, store, executor, max_bytes=max_bytes, on_stats=on_stats,
                    commit_interval=commit_interval, commit_batch=commit_batch, wal_limit=wal_limit)
        committer = spool._committer
        if store is not None:
            async with committer.lock:
                await committer.page_in()
        spool._owner = asyncio.get_running_loop().create_task(committer.run(), name=f"spool-owner:{path}")
        spool._changed()
        if ledger.depth:
            log.info("spool %s: %d messages (%d bytes) from an earlier run", path, ledger.depth, ledger.bytes)
        return spool

    # -- public API ----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file of this spool, or ``"memory"``."""
        return self._path

    @property
    def synchronous(self) -> str:
        """SQLite's ``synchronous`` level in use, as SQLite reports it (``NORMAL``, ``FULL``), or ``memory``."""
        store = self._committer.store
        return MEMORY if store is None else store.synchronous

    @property
    def depth(self) -> int:
        """Messages put and not yet acked (buffered and committed)."""
        return self._ledger.depth

    @property
    def bytes(self) -> int:
        """Body bytes of the messages counted in ``depth``."""
        return self._ledger.bytes

    @property
    def full(self) -> bool:
        """True while ``put`` waits: at ``max_bytes``, or the disk refuses commits."""
        return self._threshold.full

    def stats(self) -> SpoolStats:
        """The gauges now."""
        ledger = self._ledger
        return SpoolStats(
            depth=ledger.depth,
            size_bytes=ledger.bytes,
            full=self._threshold.full,
            disk_bytes=self._committer.usage.total,
            memory_bytes=ledger.memory_bytes,
            rows_written=ledger.rows_written,
        )

    def health(self) -> SpoolHealth:
        """Whether the spool works: False once it failed (damaged file, lost disk) or closed."""
        committer = self._committer
        if committer.failed is not None:
            return SpoolHealth(False, f"spool {self._path} failed: {committer.failed}")
        if self._closed or self._closing:
            return SpoolHealth(False, f"spool {self._path} is closed")
        if committer.disk_error is not None:
            since = time.monotonic() - committer.disk_error_since
            return SpoolHealth(True, f"disk refuses writes for {since:.0f} s ({committer.disk_error}); puts paused")
        return SpoolHealth(True, "ok")

    def lift_bound(self) -> None:
        """Stop holding the stream back at ``max_bytes``, for a stop: what the stream still holds is taken in.

        While the spool is full the stream is not read, and the server's frames wait in the socket
        buffers (tens of MB on loopback). Closing the link then would drop them; taken in beyond the
        bound (on disk), they are published at the next start. A disk that refuses writes stays full.
        """
        self._threshold.limit = sys.maxsize
        self._update_full()
        if self._ledger.room and not self._threshold.full:
            self._space.set()

    async def put(self, msg: Outbound) -> None:
        """Buffer a message for the next group commit.

        Waits, without dropping anything, while the spool is full (until acks free
        space), the uncommitted bytes are at their bound, or the disk refuses commits.

        Args:
            msg: the message to keep until RabbitMQ confirms it.

        Raises:
            SpoolError: the spool is closed or failed.
        """
        ledger = self._ledger
        while True:
            self._check_usable()
            if self._threshold.full or not ledger.room:
                self._space.clear()
                await self._space.wait()
            else:
                break
        ledger.add(msg)
        self._update_full()
        self._committer.wake()
        if ledger.ready:
            self._ready.set()

    async def get_batch(self, max_n: int, *, early: bool = True) -> list[Spooled]:
        """Wait for messages and hand out up to ``max_n`` of them, in id order.

        Released messages come before anything newer. Each message is handed out once
        until it is acked or released. Fewer than ``max_n`` come while handed-out bytes
        are at their bound.

        Args:
            max_n: most messages to return (at least 1).
            early: hand out messages before their commit once nothing older waits (see the
                module docstring); False: committed messages only.

        Returns:
            One or more messages, oldest first.

        Raises:
            SpoolError: the spool is closed (or closes while waiting) or failed.
            ValueError: ``max_n`` is below 1.
        """
        if max_n < 1:
            raise ValueError("max_n must be at least 1")
        ledger = self._ledger
        while True:
            self._check_usable(closing_ok=True)
            if ledger.ready_for(early=early):
                break
            self._ready.clear()
            self._early_waiting += early
            try:
                await self._ready.wait()
            finally:
                self._early_waiting -= early
        batch = ledger.hand_out(max_n, early=early)
        if ledger.page_request() is not None:
            self._committer.wake()
        return batch

    def ack(self, ids: Iterable[int]) -> None:
        """Forget messages RabbitMQ confirmed; their delete joins the next group commit.

        Ids that are not in flight (unknown, already acked, or released) are ignored.

        Args:
            ids: spool ids from ``get_batch``.
        """
        ledger = self._ledger
        if ledger.ack(ids):
            self._committer.pending_confirmed()
            self._acked_while_full = self._acked_while_full or self._threshold.full
            self._update_full()
            if ledger.has_deletes or self._threshold.full:  # full: the WAL may need a checkpoint
                self._committer.wake_deletes(urgent=self._threshold.full)
            if ledger.ready:
                self._ready.set()

    def release(self, items: Iterable[Spooled]) -> None:
        """Hand messages out again (not confirmed), before anything newer, in id order.

        Items that are not in flight are ignored.

        Args:
            items: messages from ``get_batch`` that RabbitMQ did not confirm.
        """
        if self._ledger.release(items):
            self._ready.set()

    async def discard(self, message_ids: Iterable[str], *, found: set[str] | None = None) -> int:
        """Drop spooled messages with these ``message_id`` values that are not handed out.

        For a standby that trims its window by the ids the leader confirmed.

        Args:
            message_ids: AMQP message ids.
            found: when given, the ids of the messages dropped are added to it.

        Returns:
            How many messages were dropped.

        Raises:
            SpoolError: the spool is closed or failed, or the disk refused.
        """
        wanted = set(message_ids)
        if not wanted:
            return 0
        if found is None:
            return await self._drop(lambda item: item.msg.message_id not in wanted, wanted)

        def keep(item: Spooled) -> bool:
            if item.msg.message_id in wanted:
                found.add(item.msg.message_id)
                return False
            return True

        return await self._drop(keep, wanted, found)

    async def flush(self) -> None:
        """Commit every buffered put and ack now, and wait until that is on disk.

        While the disk refuses commits this keeps waiting (the committer retries); wrap
        it in a timeout if you cannot wait.

        Raises:
            SpoolError: the spool is closed or failed.
        """
        committer = self._committer
        if not self._ledger.pending and not self._ledger.has_deletes:
            return
        self._check_usable(closing_ok=True)
        if self._owner is None or self._owner.done():
            raise SpoolError(f"spool {self._path} is closed")
        target = committer.tx_started + 1
        committer.flushers += 1
        try:
            committer.wake(now=True)
            while committer.tx_done < target:
                self._check_usable(closing_ok=True)
                self._committed.clear()
                await self._committed.wait()
        finally:
            committer.flushers -= 1

    async def close(self, give_up_after: float = 10.0) -> CloseReport:
        """Commit what is buffered and close the file; unacked messages stay for the next open.

        Waiting ``put`` and ``get_batch`` calls raise ``SpoolError``. Bounded: after
        ``give_up_after`` seconds (a disk that refuses writes) it gives up, and what is not on
        disk is reported as lost.

        Returns:
            How many messages were kept on disk and how many were lost, and why.
        """
        if self._closed:
            return CloseReport(kept=0, lost=0, error=f"spool {self._path} was already closed")
        self._closing = True
        committer = self._committer
        committer.closing = True
        committer.wake(now=True)
        self._wake_all()
        error = await self._stop_owner(give_up_after)
        self._closed = True
        self._wake_all()
        ledger = self._ledger
        lost = ledger.pending
        if committer.store is not None and committer.executor is not None:
            try:
                async with asyncio.timeout(max(1.0, give_up_after / 4)):
                    await committer.call(committer.store.close)
            except (TimeoutError, sqlite3.Error, OSError) as exc:
                error = error or f"closing the file failed: {exc or 'timeout'}"
            committer.executor.shutdown(wait=False)
        else:
            lost = ledger.depth
        if self._threshold.full:
            self._threshold.full = False
        self._report()
        return CloseReport(kept=ledger.depth - lost, lost=lost, error=error)

    # -- internals -----------------------------------------------------------------

    async def _stop_owner(self, give_up_after: float) -> str | None:
        """Let the owner write what is left; cancel it after ``give_up_after`` s. Why it did not end well, or None."""
        owner = self._owner
        if owner is None:
            return None
        done, _ = await asyncio.wait({owner}, timeout=give_up_after)
        if not done:
            owner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await owner
            cause = self._committer.disk_error
            return f"gave up after {give_up_after:.1f} s: {cause or 'the disk did not answer'}"
        if owner.cancelled():
            return "the commit loop was cancelled"
        exc = owner.exception()
        return None if exc is None else f"failed: {exc}"

    async def _drop(
        self, keep: Callable[[Spooled], bool], message_ids: set[str], found: set[str] | None = None
    ) -> int:
        self._check_usable()
        committer = self._committer
        ledger = self._ledger
        async with committer.lock:
            dropped = ledger.drop_in_memory(keep)
            store = committer.store
            if store is not None and ledger.disk_only:
                try:
                    gone = await committer.call(store.delete_ids, ledger.tail_id, message_ids)
                except (sqlite3.Error, OSError) as exc:
                    raise SpoolError(f"spool {self._path}: dropping messages failed: {exc}") from exc
                dropped += ledger.dropped_on_disk(gone)
                if found is not None:
                    found.update(message_id for _, _, message_id in gone)
        self._after_drop()
        return dropped

    def _after_drop(self) -> None:
        self._update_full()
        self._committer.wake()
        self._report()

    def _check_usable(self, *, closing_ok: bool = False) -> None:
        failed = self._committer.failed
        if failed is not None:
            raise SpoolError(f"spool {self._path} failed: {failed}") from failed
        if self._closed or (self._closing and not closing_ok):
            raise SpoolError(f"spool {self._path} is closed")

    def _wake_all(self) -> None:
        self._ready.set()
        self._space.set()
        self._committed.set()

    def _want_checkpoint(self, usage: DiskUsage) -> bool:
        # A full spool checkpoints early once acks came: deletes free pages (and early-confirmed
        # events write nothing), but the WAL holds its size until then. Without acks (the broker
        # down) a checkpoint would only let the stream be read in bursts while the spool is full.
        limit = self._wal_limit
        if usage.wal >= limit:
            return True
        if self._threshold.full and self._acked_while_full and usage.wal >= min(limit, self._max_bytes) // 4:
            self._acked_while_full = False  # the committer checkpoints now
            return True
        return False

    def _changed(self) -> None:
        """After a commit, a page-in or a failure: wake whoever waits, and report."""
        ledger = self._ledger
        if self._committer.failed is not None:
            self._wake_all()
        if ledger.ready:
            self._ready.set()
        self._committed.set()
        self._update_full()
        if ledger.room and not self._threshold.full:
            self._space.set()
        self._report()

    def _report(self) -> None:
        if self._on_stats is not None:
            self._on_stats(self.stats())

    def _size(self) -> int:
        """What the bound applies to: body bytes, and on disk the pages in use, WAL and what waits to be written."""
        ledger = self._ledger
        if self._committer.store is None:
            return ledger.bytes
        # Uncommitted rows are charged at what a row costs on disk, not their body bytes
        # alone: counting bodies only let a 4 MiB spool reach 5-7 MB before it said full.
        usage = self._committer.usage
        # The rows of a transaction being written count too: they are in neither.
        unwritten = ledger.pending_bytes + ledger.writing_bytes
        committed = ledger.bytes - unwritten
        if committed >= 64 * 1024:
            ratio = usage.used / committed
            self._disk_per_body = min(max(ratio, 1.0), _DISK_PER_BODY_MAX)
        pending = int(unwritten * self._disk_per_body)
        return max(ledger.bytes, usage.total + pending)

    def _update_full(self) -> None:
        committer = self._committer
        size = self._size() if self._ledger.depth else 0
        if not self._threshold.update(size, forced=committer.disk_error is not None):
            return
        full = self._threshold.full
        self._report()
        # While the broker drains a full spool it fills and frees in turns; say so once
        # a minute, the full gauge shows every turn.
        now = time.monotonic()
        loud = full and now - self._full_logged_at >= _FULL_LOG_EVERY
        if loud:
            self._full_logged_at = now
            self._full_announced = True
        if full:
            log.log(
                logging.WARNING if loud else logging.DEBUG,
                "spool %s full (%d bytes, max %d, disk error: %s): pausing the stream until space frees",
                self._path, size, self._max_bytes, committer.disk_error or "none",
            )  # fmt: skip
        else:
            level = logging.INFO if self._full_announced else logging.DEBUG
            self._full_announced = False
            log.log(level, "spool %s has room again (%d bytes): resuming the stream", self._path, size)
            if self._ledger.room:
                self._space.set()


async def _open_file(path: str, sync: str, wal_limit: int,
                     limits: Limits) -> tuple[SqliteStore, ThreadPoolExecutor, Ledger]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
    loop = asyncio.get_running_loop()
    store: SqliteStore | None = None
    try:
        store = await loop.run_in_executor(executor, lambda: SqliteStore.open(path, sync, wal_limit=wal_limit))
        snapshot = await loop.run_in_executor(executor, store.snapshot)
        return store, executor, Ledger(snapshot, limits)
    except BaseException as exc:
        if store is not None:
            await loop.run_in_executor(executor, store.close)
        executor.shutdown(wait=False)
        if isinstance(exc, SpoolError):
            raise
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise SpoolError(f"spool {path} is in use by another process") from exc
        if isinstance(exc, (sqlite3.Error, OSError, ValueError)):
            bad_path = _bad_path(path, exc)
            if bad_path is not None:
                raise SpoolPathError(f"--spool {path}: {bad_path}") from exc
            raise SpoolError(f"cannot open spool {path}: {exc}{_free_space_note(path)}") from exc
        raise


def _free_space_note(path: str) -> str:
    """``" (the disk holding it is full: N bytes free)"`` when that is the likely cause, else ``""``.

    SQLite reports a full disk met while opening (recovering the WAL) as a plain "disk I/O error".
    """
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return ""
    return f" (the disk holding it is full: {free} bytes free)" if free < _FULL_DISK_BYTES else ""


_FULL_DISK_BYTES: Final = 1024**2


def _bad_path(path: str, exc: BaseException) -> str | None:
    """Why ``path`` can never be a spool, when that is why it did not open; None for other failures."""
    if os.path.isdir(path):
        return "is a directory; give a file path such as /var/lib/orangepill-bridge/spool.db"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        return f"the directory {folder} is not writable by this process (the spool needs its file, WAL and lock there)"
    if isinstance(exc, PermissionError) and not os.path.isdir(folder):
        # A missing directory this process may not create: the same cause as a directory it may not write.
        return f"its directory {folder} does not exist and cannot be created by this process ({exc.strerror})"
    if os.path.isfile(path) and not os.access(path, os.R_OK | os.W_OK):
        return "is not readable and writable by this process (a read-only file?); the file is left as it is"
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
        return "is not an SQLite database, so not a spool; choose another --spool path (the file is left as it is)"
    return None

