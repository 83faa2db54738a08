"""The durable outbox between the stream reader and the RabbitMQ publisher.

Every event is written to disk (SQLite, WAL mode) before the publisher sees it and
is deleted only after RabbitMQ confirmed it, so neither a broker outage nor a crash
loses an event (at-least-once). Flow of one message::

    put() ──▶ buffer ──group commit──▶ SQLite ──▶ window / disk only ──get_batch()──▶ in flight
                                                       ▲                               │
                                                       └──────────── release() ◀───────┤
                                                                                      ack() ──▶ DELETE

All SQLite work runs on one dedicated thread, and one owner coroutine performs the
commit, delete and page-in steps in sequence, so the in-memory view and the file
never disagree and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson

from bridge.errors import SpoolError
from bridge.metrics import Metrics
from bridge.protocol import Outbound

__all__ = ["MEMORY", "Spool", "Spooled"]

log = logging.getLogger(__name__)

MEMORY: Final = "memory"
"""The ``--spool`` value that keeps the spool in memory only (lost on exit)."""

SCHEMA_VERSION: Final = 1
# "OPBS" in ASCII: marks the file as an orangepill-bridge spool in its SQLite header.
APPLICATION_ID: Final = 0x4F504253
DEFAULT_WINDOW: Final = 5000

_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
_MAX_BACKOFF: Final = 1.0
# A commit of this many rows or more means the stream is busy: commit less often
# (5 x commit_interval) so that more rows share each transaction.
_BUSY_ROWS: Final = 32
_RESUME_RATIO: Final = 0.9
_FULL_LOG_EVERY: Final = 60.0
_FIRST_BACKOFF: Final = 0.01
# Small commits run on the loop's thread: about 0.1 ms of SQLite, where a hand-off
# to the spool thread costs a GIL round trip that waits up to the 5 ms switch
# interval while the loop is busy. A commit that takes longer than _INLINE_SLOW
# (a slow disk) sends commits to the thread again for _INLINE_PAUSE seconds.
_INLINE_MAX_ROWS: Final = 256  # also the page size of backlog reads on the loop's thread
_INLINE_SLOW: Final = 0.005
_INLINE_PAUSE: Final = 5.0
# A checkpoint (on the spool thread) after this many commits bounds the WAL (about 3 pages
# per commit). Commits wait while it runs (tens to hundreds of ms of fsync on a slow disk),
# so it is rare: at 1,000 events/s about one every 15 s, holding back under 1 % of events.
_CHECKPOINT_EVERY: Final = 10000

_SCHEMA: Final = """
CREATE TABLE spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    routing_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    received_at REAL NOT NULL,
    label TEXT NOT NULL
)
"""
# OR REPLACE makes a retried commit idempotent if SQLite reported an error after
# the previous attempt had in fact reached the file.
_INSERT: Final = (
    "INSERT OR REPLACE INTO spool (id, kind, routing_key, message_id, body, headers, received_at, label)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_AFTER: Final = (
    "SELECT id, kind, routing_key, message_id, body, headers, received_at, label"
    " FROM spool WHERE id > ? ORDER BY id LIMIT ?"
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Spooled:
    """A message held by the spool, with its spool sequence number.

    Attributes:
        id: spool sequence, increasing in the order of ``put()``; never reused.
        msg: the message to publish.
    """

    id: int
    msg: Outbound


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What an existing spool file holds when it is opened."""

    count: int
    nbytes: int
    next_id: int


class _SqliteStore:
    """The SQLite side of the spool; every method runs on the spool's own thread."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Used from the spool thread and, for small commits, from the event loop's
        # thread; the owner coroutine makes sure never from both at once.
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=0.2, check_same_thread=False)
        try:
            self._setup(synchronous)
        except BaseException:
            self.conn.close()
            raise

    def _setup(self, synchronous: str) -> None:
        conn = self.conn
        # Exclusive locking: a second bridge on the same file fails at open instead of
        # handing out the same events twice; the OS drops the lock if we are killed.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {self.path}: cannot switch to WAL mode (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # Checkpoints fsync and can take tens of milliseconds: the owner runs them on
        # the spool thread (never inside a commit made on the loop's thread).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_schema()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_schema(self) -> None:
        conn = self.conn
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not tables and app_id == 0 and version == 0:
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return
        if app_id != APPLICATION_ID:
            raise SpoolError(
                f"{self.path} is an SQLite database but not an orangepill-bridge spool "
                f"(tables: {', '.join(sorted(tables)) or 'none'}); choose another --spool path"
            )
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path} has schema version {version}, newer than this bridge "
                f"understands ({SCHEMA_VERSION}); run the newer bridge to drain it"
            )
        if version < 1 or "spool" not in tables:
            raise SpoolError(f"spool {self.path} is damaged: schema version {version}, tables {sorted(tables)}")

    def snapshot(self) -> _Snapshot:
        """Count the rows and payload bytes left by an earlier run, and the next free id."""
        count, nbytes, max_id = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM spool"
        ).fetchone()
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        seq = int(row[0]) if row is not None else 0
        return _Snapshot(count=int(count), nbytes=int(nbytes), next_id=max(seq, int(max_id)) + 1)

    def write(self, rows: list[Spooled], deletes: list[int]) -> None:
        """Insert ``rows`` and delete ``deletes`` in one transaction."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            if rows:
                conn.executemany(_INSERT, map(_to_row, rows))
            if deletes:
                # Confirms come back mostly in order: one statement per run of ids.
                conn.executemany("DELETE FROM spool WHERE id BETWEEN ? AND ?", _runs(deletes))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def read_after(self, after_id: int, limit: int) -> list[Spooled]:
        """Read up to ``limit`` rows with an id above ``after_id``, in id order."""
        return [_from_row(row) for row in self.conn.execute(_SELECT_AFTER, (after_id, limit))]

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (fsync), so the WAL can start over."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        """Close the connection (checkpoints the WAL into the file)."""
        self.conn.close()


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Collapse ids into (first, last) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and i <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(i, runs[-1][1]))
        else:
            runs.append((i, i))
    return runs


def _to_row(item: Spooled) -> tuple[int, int, str, str, bytes, str, float, str]:
    m = item.msg
    headers = orjson.dumps(m.headers).decode()
    return (item.id, m.kind, m.routing_key, m.message_id, m.body, headers, m.received_at, m.label)


def _from_row(row: tuple[Any, ...]) -> Spooled:
    rid, kind, routing_key, message_id, body, headers, received_at, label = row
    msg = Outbound(
        kind=int(kind),
        routing_key=str(routing_key),
        message_id=str(message_id),
        body=bytes(body),
        headers=orjson.loads(headers),
        received_at=float(received_at),
        label=str(label),
    )
    return Spooled(int(rid), msg)


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
        store: _SqliteStore | None,
        executor: ThreadPoolExecutor | None,
        snapshot: _Snapshot,
        *,
        max_bytes: int,
        metrics: Metrics | None,
        commit_interval: float,
        commit_batch: int,
        window: int,
    ) -> None:
        self._path = path
        self._store = store
        self._executor = executor
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._commit_interval = commit_interval
        self._commit_batch = commit_batch
        # Memory mode has no disk to page from, so its window is the whole backlog
        # (bounded by max_bytes instead).
        self._window_max = window if store is not None else sys.maxsize
        # A put never waits for a commit unless this many rows are still uncommitted:
        # keeps memory flat when the disk is slower than the stream.
        self._buffer_max = max(4 * commit_batch, 1)

        self._next_id = snapshot.next_id
        self._depth = snapshot.count
        self._bytes = snapshot.nbytes
        # Puts not yet committed, in id order.
        self._buffer: list[Spooled] = []
        # Acked ids whose DELETE is not yet committed.
        self._deletes: list[int] = []
        # Committed, not handed out, contiguous in id order; every row on disk only
        # has a higher id than the window's tail.
        self._window: collections.deque[Spooled] = collections.deque()
        self._tail_id = 0
        self._disk_only = snapshot.count
        # Released messages: always older than the window's head, so they go first.
        self._released: list[tuple[int, Spooled]] = []
        # Handed out and not yet acked or released: id -> payload bytes.
        self._in_flight: dict[int, int] = {}

        self._committed_id = snapshot.next_id - 1
        self._last_commit = 0.0
        self._last_rows = 0
        self._inline_from = 0.0  # commits may run on the loop's thread from this time
        self._since_checkpoint = 0
        self._acks_queued = 0
        self._acks_committed = 0
        self._flushers = 0
        self._full = False
        self._full_logged_at = -_FULL_LOG_EVERY
        self._full_announced = False
        self._disk_error: BaseException | None = None
        self._disk_error_since = 0.0
        self._read_failing = False
        self._failed: BaseException | None = None
        self._closing = False
        self._closed = False

        self._wake = asyncio.Event()  # the owner has work
        self._batch = asyncio.Event()  # commit now, do not wait for commit_interval
        self._ready = asyncio.Event()  # something to hand out
        self._space = asyncio.Event()  # a waiting put may go on
        self._committed = asyncio.Event()  # a commit finished (for flush)
        self._owner: asyncio.Task[None] | None = None
        self._update_gauges()

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        max_bytes: int = 2 * 1024**3,
        metrics: Metrics | None = None,
        commit_interval: float = 0.002,
        commit_batch: int = 1000,
        synchronous: str = "NORMAL",
        window: int = DEFAULT_WINDOW,
    ) -> Spool:
        """Open (or create) a spool and start its commit loop.

        Rows left by an earlier run are handed out first, in id order.

        Args:
            path: an SQLite file (created with its directory if missing), or ``"memory"``.
            max_bytes: payload bytes at which ``put`` starts to wait for acks.
            metrics: where to report ``spool_depth``, ``spool_bytes`` and ``spool_full``.
            commit_interval: least time between two commits (s); an idle spool commits at
                once, a busy one (>= 32 rows in its last commit) waits 5 x this long.
            commit_batch: commit at once when this many puts are buffered.
            synchronous: SQLite ``synchronous`` level: ``NORMAL`` survives a process
                crash, ``FULL`` also a power loss.
            window: most committed messages kept in memory for ``get_batch``; the rest
                stay on disk and are paged in as the window drains.

        Returns:
            The open spool.

        Raises:
            SpoolError: the file cannot be opened or created, is not a spool, has a
                newer schema, is corrupt, or is in use by another process; or a
                parameter is invalid. The message names the path.
        """
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise SpoolError(f"spool {path}: synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}")
        if max_bytes <= 0 or commit_batch <= 0 or window <= 0 or commit_interval < 0:
            raise SpoolError(f"spool {path}: max_bytes, commit_batch and window must be > 0 and commit_interval >= 0")
        options: dict[str, Any] = {
            "max_bytes": max_bytes,
            "metrics": metrics,
            "commit_interval": commit_interval,
            "commit_batch": commit_batch,
            "window": window,
        }
        if path == MEMORY:
            spool = cls(path, None, None, _Snapshot(0, 0, 1), **options)
        else:
            spool = await cls._open_file(path, sync, options)
        spool._owner = asyncio.get_running_loop().create_task(spool._run(), name=f"spool-owner:{path}")
        if spool._depth:
            log.info("spool %s: %d messages (%d bytes) from an earlier run", path, spool._depth, spool._bytes)
        return spool

    @classmethod
    async def _open_file(cls, path: str, sync: str, options: dict[str, Any]) -> Spool:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        loop = asyncio.get_running_loop()
        store: _SqliteStore | None = None
        try:
            store = await loop.run_in_executor(executor, _SqliteStore, path, sync)
            snapshot = await loop.run_in_executor(executor, store.snapshot)
            spool = cls(path, store, executor, snapshot, **options)
            await spool._page_in()
            return spool
        except BaseException as exc:
            if store is not None:
                await loop.run_in_executor(executor, store.close)
            executor.shutdown(wait=False)
            if isinstance(exc, SpoolError):
                raise
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise SpoolError(f"spool {path} is in use by another process") from exc
            if isinstance(exc, (sqlite3.Error, OSError, ValueError)):
                raise SpoolError(f"cannot open spool {path}: {exc}") from exc
            raise

    # -- public API ----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file of this spool, or ``"memory"``."""
        return self._path

    @property
    def depth(self) -> int:
        """Messages put and not yet acked (buffered and committed)."""
        return self._depth

    @property
    def bytes(self) -> int:
        """Payload bytes of the messages counted in ``depth``."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True while ``put`` waits: at ``max_bytes``, or the disk refuses commits."""
        return self._full

    async def put(self, msg: Outbound) -> None:
        """Buffer a message for the next group commit.

        Waits, without dropping anything, while the spool is full (until acks free
        space) or the disk refuses commits (until a retry succeeds).

        Args:
            msg: the message to keep until RabbitMQ confirms it.

        Raises:
            SpoolError: the spool is closed or its commit loop failed.
        """
        while True:
            self._check_usable()
            if self._full or len(self._buffer) >= self._buffer_max:
                self._space.clear()
                await self._space.wait()
            else:
                break
        size = len(msg.body)
        self._buffer.append(Spooled(self._next_id, msg))
        self._next_id += 1
        self._depth += 1
        self._bytes += size
        # The gauges are set by the owner at each commit, not per put (hot path).
        self._update_full()
        self._wake.set()
        if len(self._buffer) >= self._commit_batch:
            self._batch.set()

    async def get_batch(self, max_n: int) -> list[Spooled]:
        """Wait for committed messages and hand out up to ``max_n`` of them, in id order.

        Released messages come before anything newer. Each message is handed out once
        until it is acked or released.

        Args:
            max_n: most messages to return (at least 1).

        Returns:
            One or more messages, oldest first.

        Raises:
            SpoolError: the spool is closed (or closes while waiting) or failed.
            ValueError: ``max_n`` is below 1.
        """
        if max_n < 1:
            raise ValueError("max_n must be at least 1")
        while True:
            self._check_usable(closing_ok=True)
            if self._released or self._window:
                break
            self._ready.clear()
            await self._ready.wait()
        batch: list[Spooled] = []
        while self._released and len(batch) < max_n:
            batch.append(heapq.heappop(self._released)[1])
        window = self._window
        while window and len(batch) < max_n:
            batch.append(window.popleft())
        for item in batch:
            self._in_flight[item.id] = len(item.msg.body)
        if self._disk_only and len(window) <= self._window_max // 2:
            self._wake.set()
        return batch

    def ack(self, ids: Iterable[int]) -> None:
        """Forget messages RabbitMQ confirmed; their delete joins the next group commit.

        Ids that are not in flight (unknown, already acked, or released) are ignored.

        Args:
            ids: spool ids from ``get_batch``.
        """
        freed = 0
        for i in ids:
            size = self._in_flight.pop(i, None)
            if size is None:
                continue
            self._deletes.append(i)
            self._acks_queued += 1
            self._depth -= 1
            freed += size
        if self._deletes:
            self._bytes -= freed
            self._update_full()
            self._wake.set()

    def release(self, items: Iterable[Spooled]) -> None:
        """Hand messages out again (not confirmed), before anything newer, in id order.

        Items that are not in flight are ignored.

        Args:
            items: messages from ``get_batch`` that RabbitMQ did not confirm.
        """
        for item in items:
            if self._in_flight.pop(item.id, None) is not None:
                heapq.heappush(self._released, (item.id, item))
        if self._released:
            self._ready.set()

    async def flush(self) -> None:
        """Commit every buffered put and ack now, and wait until that is on disk.

        While the disk refuses commits this keeps waiting (the owner retries); wrap it
        in a timeout if you cannot wait.

        Raises:
            SpoolError: the commit loop failed.
        """
        target_id = self._next_id - 1
        target_acks = self._acks_queued
        if self._committed_id >= target_id and self._acks_committed >= target_acks:
            return
        if self._owner is None or self._owner.done():
            self._check_usable(closing_ok=True)
            raise SpoolError(f"spool {self._path} is closed")
        self._flushers += 1
        try:
            self._batch.set()
            self._wake.set()
            while self._committed_id < target_id or self._acks_committed < target_acks:
                if self._failed is not None:
                    raise SpoolError(f"spool {self._path} failed: {self._failed}") from self._failed
                self._committed.clear()
                await self._committed.wait()
        finally:
            self._flushers -= 1

    async def close(self) -> None:
        """Commit what is buffered and close the file; unacked messages stay for the next open.

        Waiting ``put`` and ``get_batch`` calls raise ``SpoolError``. Like ``flush``, this
        waits while the disk refuses commits.
        """
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._batch.set()
        self._space.set()
        self._ready.set()
        owner = self._owner
        try:
            if owner is not None:
                await owner
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise SpoolError(f"spool {self._path} failed: {exc}") from exc
        finally:
            self._closed = True
            self._ready.set()
            self._space.set()
            self._committed.set()
            if self._store is not None and self._executor is not None:
                await self._call(self._store.close)
                self._executor.shutdown(wait=False)
            if self._full:
                self._full = False
                if self._metrics is not None:
                    self._metrics.spool_full.set(0)

    # -- internals -----------------------------------------------------------------

    def _check_usable(self, *, closing_ok: bool = False) -> None:
        if self._failed is not None:
            raise SpoolError(f"spool {self._path} failed: {self._failed}") from self._failed
        if self._closed or (self._closing and not closing_ok):
            raise SpoolError(f"spool {self._path} is closed")

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.spool_depth.set(self._depth)
            self._metrics.spool_bytes.set(self._bytes)

    def _update_full(self) -> None:
        # Hysteresis: full at max_bytes, room again only below 90 % of it, so that a
        # spool hovering at its bound does not flap (and log) once per event.
        limit = self._max_bytes * (_RESUME_RATIO if self._full else 1.0)
        full = self._bytes >= limit or self._disk_error is not None
        if full == self._full:
            return
        self._full = full
        if self._metrics is not None:
            self._metrics.spool_full.set(1 if full else 0)
        # While the broker drains a full spool it fills and frees in turns; say so once
        # a minute, the spool_full gauge shows every turn.
        now = time.monotonic()
        loud = full and now - self._full_logged_at >= _FULL_LOG_EVERY
        if loud:
            self._full_logged_at = now
            self._full_announced = True
        if full:
            log.log(
                logging.WARNING if loud else logging.DEBUG,
                "spool %s full (%d bytes, max %d, disk error: %s): pausing the stream until space frees",
                self._path,
                self._bytes,
                self._max_bytes,
                "yes" if self._disk_error is not None else "no",
            )
        else:
            level = logging.INFO if self._full_announced else logging.DEBUG
            self._full_announced = False
            log.log(level, "spool %s has room again (%d bytes): resuming the stream", self._path, self._bytes)
            self._space.set()

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        """Own every disk step: commit buffered puts and acks, then page in, in sequence."""
        backoff = _FIRST_BACKOFF
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if (
                    self._store is not None
                    and self._buffer
                    and len(self._buffer) < self._commit_batch
                    and not self._flushers
                    and not self._closing
                    and self._disk_error is None
                ):
                    # Group commit, adaptive: an idle spool commits at once (no latency
                    # floor at low rates); a busy one commits at most once per interval
                    # so that many puts share one transaction.
                    interval = self._commit_interval * (1 if self._last_rows < _BUSY_ROWS else 5)
                    wait = self._last_commit + interval - loop.time()
                    if wait > 0:
                        self._batch.clear()
                        try:
                            async with asyncio.timeout(wait):
                                await self._batch.wait()
                        except TimeoutError:
                            pass
                self._last_commit = loop.time()
                ok = await self._commit()
                if ok:
                    ok = await self._page_in()
                if not ok:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    self._wake.set()
                    continue
                backoff = _FIRST_BACKOFF
                if self._closing and not self._buffer and not self._deletes:
                    return
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("spool %s: commit loop failed", self._path)
            self._failed = exc
            self._ready.set()
            self._space.set()
            self._committed.set()
            raise

    async def _commit(self) -> bool:
        """Write the buffered puts and acks in one transaction; False if the disk refused."""
        self._update_gauges()
        rows, self._buffer = self._buffer, []
        deletes, self._deletes = self._deletes, []
        self._last_rows = len(rows)
        acks = self._acks_queued
        if not rows and not deletes:
            return True
        # Puts may refill the buffer while this transaction runs.
        if not self._full:
            self._space.set()
        if self._store is not None:
            try:
                await self._write(self._store, rows, deletes)
            except (sqlite3.Error, OSError) as exc:
                # Nothing is dropped: the rows go back in front of newer puts.
                self._buffer[:0] = rows
                self._deletes[:0] = deletes
                if self._disk_error is None:
                    log.error(
                        "spool %s: commit failed; keeping %d messages in memory, pausing puts, retrying",
                        self._path,
                        len(self._buffer),
                        exc_info=True,
                    )
                    self._disk_error = exc
                    self._disk_error_since = time.monotonic()
                    self._update_full()
                return False
            if self._disk_error is not None:
                log.info(
                    "spool %s: commits work again after %.1f s",
                    self._path,
                    time.monotonic() - self._disk_error_since,
                )
                self._disk_error = None
                self._update_full()
        if rows:
            self._committed_id = rows[-1].id
            window = self._window
            for item in rows:
                if self._disk_only == 0 and len(window) < self._window_max:
                    window.append(item)
                    self._tail_id = item.id
                else:
                    # Past the window: it stays on disk only and is paged in later.
                    self._disk_only += 1
            self._ready.set()
        self._acks_committed = acks
        self._committed.set()
        return True

    async def _write(self, store: _SqliteStore, rows: list[Spooled], deletes: list[int]) -> None:
        """One transaction: inline when small and the disk is quick, else on the spool thread."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if len(rows) + len(deletes) <= _INLINE_MAX_ROWS and now >= self._inline_from:
            store.write(rows, deletes)
            took = loop.time() - now
            if took > _INLINE_SLOW:
                self._inline_from = loop.time() + _INLINE_PAUSE
                log.debug("spool %s: a commit took %.1f ms; committing on the spool thread", self._path, took * 1e3)
        else:
            await self._call(store.write, rows, deletes)
        self._since_checkpoint += 1
        if self._since_checkpoint >= _CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            try:
                await self._call(store.checkpoint)
            except (sqlite3.Error, OSError):
                log.warning("spool %s: WAL checkpoint failed; will retry", self._path, exc_info=True)

    async def _read(self, store: _SqliteStore, want: int) -> list[Spooled]:
        """Read the next rows of the backlog: a page on the loop's thread while the disk is quick."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._inline_from:
            rows = store.read_after(self._tail_id, min(want, _INLINE_MAX_ROWS))
            if loop.time() - now > _INLINE_SLOW:
                self._inline_from = loop.time() + _INLINE_PAUSE
            return rows
        return await self._call(store.read_after, self._tail_id, want)

    async def _page_in(self) -> bool:
        """Refill the window from disk when it is half empty; False if the read failed."""
        store = self._store
        if store is None:
            return True
        while self._disk_only and len(self._window) <= self._window_max // 2:
            want = min(self._window_max - len(self._window), self._disk_only)
            try:
                rows = await self._read(store, want)
            except (sqlite3.Error, OSError):
                if not self._read_failing:
                    log.error("spool %s: reading the backlog failed; retrying", self._path, exc_info=True)
                    self._read_failing = True
                return False
            self._read_failing = False
            if not rows:
                log.error("spool %s: expected %d more rows on disk, found none", self._path, self._disk_only)
                self._disk_only = 0
                break
            self._window.extend(rows)
            self._tail_id = rows[-1].id
            self._disk_only -= len(rows)
            self._ready.set()
        return True
