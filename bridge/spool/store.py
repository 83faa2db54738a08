"""The SQLite file of the spool: schema, checks at open, salvage, reads and writes.

Nothing here knows about asyncio: every method is a plain blocking call, run by the
committer on the spool's thread (or, for small steps, on the event loop's thread).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bridge.contract import Outbound
from bridge.errors import SpoolError, SpoolPathError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "DiskUsage",
    "Snapshot",
    "Spooled",
    "SqliteStore",
    "is_corruption",
    "runs",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
# "OPBS" in ASCII: marks the file as an orangepill-bridge spool in its SQLite header.
APPLICATION_ID: Final = 0x4F504253
SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

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
_SELECT: Final = "SELECT id, kind, routing_key, message_id, body, headers, received_at, label FROM spool"
_SELECT_AFTER: Final = _SELECT + " WHERE id > ? ORDER BY id LIMIT ?"
_SELECT_RANGE: Final = _SELECT + " WHERE id BETWEEN ? AND ? ORDER BY id"
# SQLite result codes (primary) that mean the file itself is damaged.
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_SALVAGE_CHUNK: Final = 1024


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
class Snapshot:
    """What an existing spool file holds when it is opened."""

    count: int
    nbytes: int
    next_id: int


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """Bytes the spool takes on disk: pages in use in the database file, and the WAL file."""

    used: int
    wal: int

    @property
    def total(self) -> int:
        """Pages in use plus the WAL file."""
        return self.used + self.wal


def is_corruption(exc: BaseException) -> bool:
    """True if ``exc`` says the database file is damaged (not full, not locked)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _CORRUPT_CODES:
        return True
    return "malformed" in str(exc)


def runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse ids into (first, last) runs of consecutive ids."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(i, out[-1][1]))
        else:
            out.append((i, i))
    return out


def _to_row(item: Spooled) -> tuple[int, int, str, str, bytes, str, float, str]:
    m = item.msg
    headers = orjson.dumps(m.headers).decode()
    return (item.id, m.kind, m.routing_key, m.message_id, m.body, headers, m.received_at, m.metric_kind)


def _from_row(row: tuple[Any, ...]) -> Spooled:
    rid, kind, routing_key, message_id, body, headers, received_at, label = row
    msg = Outbound(
        kind=int(kind),
        routing_key=str(routing_key),
        message_id=str(message_id),
        body=bytes(body),
        headers=orjson.loads(headers),
        received_at=float(received_at),
        metric_kind=str(label),
    )
    return Spooled(int(rid), msg)


def _inspect(path: str) -> None:
    """Refuse a file that is not a spool before anything writes to it (read-only look)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    uri = f"file:{os.path.abspath(path)}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0.2)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    _check_schema(path, tables, app_id, version)


def _spool_header(path: str) -> bool:
    """True if the file's SQLite header names this application (``PRAGMA application_id``, bytes 68-71)."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return False
    return head.startswith(b"SQLite format 3\x00") and int.from_bytes(head[68:72], "big") == APPLICATION_ID


def _check_schema(path: str, tables: set[str], app_id: int, version: int) -> bool:
    """Raise unless this is a spool we can use; True if the file is empty (to be created)."""
    if not tables and app_id == 0 and version == 0:
        return True
    if app_id != APPLICATION_ID:
        raise SpoolPathError(
            f"{path} is an SQLite database but not an orangepill-bridge spool "
            f"(tables: {', '.join(sorted(tables)) or 'none'}); choose another --spool path"
        )
    if version > SCHEMA_VERSION:
        raise SpoolPathError(
            f"spool {path} has schema version {version}, newer than this bridge "
            f"understands ({SCHEMA_VERSION}); run the newer bridge to drain it"
        )
    if version < 1 or "spool" not in tables:
        raise SpoolError(f"spool {path} is damaged: schema version {version}, tables {sorted(tables)}")
    return False


class SqliteStore:
    """One spool file, opened exclusively; every method is a blocking call."""

    def __init__(self, path: str, synchronous: str, *, wal_limit: int) -> None:
        """Open (or create) the file; see ``open`` for the checks that come first."""
        self.path = path
        self.wal_path = path + "-wal"
        self.wal_limit = wal_limit
        # Used from the spool thread and, for small commits, from the event loop's
        # thread; the committer makes sure never from both at once.
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=0.2, check_same_thread=False)
        try:
            self._setup(synchronous)
            self.page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        except BaseException:
            self.conn.close()
            raise

    @classmethod
    def open(cls, path: str, synchronous: str, *, wal_limit: int) -> SqliteStore:
        """Check, salvage if damaged, and open a spool file.

        Raises:
            SpoolError: not a spool, newer schema, in use, or cannot be opened.
            sqlite3.Error, OSError: SQLite or the OS refused (the caller names the path).
        """
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            _inspect(path)
            store = cls(path, synchronous, wal_limit=wal_limit)
        except sqlite3.DatabaseError as exc:
            # Too damaged to open (a file truncated at a page boundary: "malformed"), yet its own
            # header says it is a spool: salvage it like any other damage. Anything else is refused.
            if not (is_corruption(exc) and _spool_header(path)):
                raise
            damage: str | None = str(exc)
        else:
            damage = store.check()
            if damage is None:
                return store
            store.close()
        saved, aside = salvage(path)
        log.error(
            "spool %s is damaged (%s): saved %d readable events into a fresh spool; the damaged file is now %s",
            path, damage, saved, aside,
        )  # fmt: skip
        return cls(path, synchronous, wal_limit=wal_limit)

    def _setup(self, synchronous: str) -> None:
        conn = self.conn
        # Exclusive locking: a second bridge on the same file fails at open instead of
        # handing out the same events twice; the OS drops the lock if we are killed.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {self.path}: cannot switch to WAL mode (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # Read back: the level SQLite applies (0-3), which decides whether a commit waits for an fsync.
        self.synchronous = SYNCHRONOUS[int(conn.execute("PRAGMA synchronous").fetchone()[0])]
        # Checkpoints fsync and can take tens of milliseconds: the committer runs them on
        # the spool thread (never inside a commit made on the loop's thread).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if _check_schema(self.path, tables, app_id, version):
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def check(self) -> str | None:
        """Run SQLite's quick_check; None if the file is sound, else what is wrong."""
        try:
            rows = [str(r[0]) for r in self.conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                return str(exc)
            raise
        return None if rows == ["ok"] else " / ".join(r.replace("\n", " / ") for r in rows)

    def snapshot(self) -> Snapshot:
        """Count the rows and payload bytes left by an earlier run, and the next free id."""
        count, nbytes, max_id = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM spool"
        ).fetchone()
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        seq = int(row[0]) if row is not None else 0
        return Snapshot(count=int(count), nbytes=int(nbytes), next_id=max(seq, int(max_id)) + 1)

    def write(self, rows: list[Spooled], deletes: list[int]) -> None:
        """Insert ``rows`` and delete ``deletes`` in one transaction."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            if rows:
                conn.executemany(_INSERT, map(_to_row, rows))
            if deletes:
                # Confirms come back mostly in order: one statement per run of ids.
                conn.executemany("DELETE FROM spool WHERE id BETWEEN ? AND ?", runs(deletes))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def read_after(self, after_id: int, limit: int, max_bytes: int) -> list[Spooled]:
        """Read up to ``limit`` rows above ``after_id`` in id order, stopping once ``max_bytes`` of bodies are read."""
        out: list[Spooled] = []
        size = 0
        # The cursor steps row by row, so a page of big bodies stops at the byte bound.
        for row in self.conn.execute(_SELECT_AFTER, (after_id, limit)):
            item = _from_row(row)
            out.append(item)
            size += len(item.msg.body)
            if size >= max_bytes:
                break
        return out

    def delete_ids(self, after_id: int, message_ids: set[str]) -> list[tuple[int, int, str]]:
        """Delete rows above ``after_id`` whose message_id is one of these; their (id, size, message_id)."""
        gone = [
            (int(i), int(n), str(m))
            for i, n, m in self.conn.execute(
                "SELECT id, length(body), message_id FROM spool WHERE id > ? ORDER BY id", (after_id,)
            )
            if m in message_ids
        ]
        self.write([], [i for i, _, _ in gone])
        return gone

    def usage(self) -> DiskUsage:
        """Pages in use (not free) in the database file, plus the WAL file's size."""
        pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])
        try:
            wal = os.stat(self.wal_path).st_size
        except FileNotFoundError:
            wal = 0
        return DiskUsage(used=(pages - free) * self.page_size, wal=wal)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (fsync) and truncate the WAL to nothing."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def close(self) -> None:
        """Close the connection (checkpoints the WAL into the file)."""
        self.conn.close()


def _readable_rows(conn: sqlite3.Connection, path: str) -> Iterator[tuple[Any, ...]]:
    """Every row of a damaged spool that SQLite can still read, in id order."""
    high, known = 0, False
    for sql in ("SELECT seq FROM sqlite_sequence WHERE name = 'spool'", "SELECT max(id) FROM spool"):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.DatabaseError:
            continue
        known = True
        if row is not None and row[0] is not None:
            high = max(high, int(row[0]))
    if not known:
        # Not even the highest id can be read (a truncated file, a damaged first page): how many events
        # it held is unknown, and none is copied. Say so; the file stays where salvage() put it.
        log.error(
            "spool %s: nothing could be read from the damaged file, not even how many events it held (a "
            "truncated or overwritten file?): none of them is in the fresh spool. The damaged file is kept "
            "(.corrupt-*): `sqlite3 FILE .recover` may get some back; publish them by hand",
            path,
        )
        return
    # Ranges of ids, split in halves when a range hits a damaged page, down to one id.
    pending = [(lo, min(lo + _SALVAGE_CHUNK - 1, high)) for lo in range(1, high + 1, _SALVAGE_CHUNK)]
    pending.reverse()
    lost = 0
    while pending:
        lo, hi = pending.pop()
        try:
            rows = conn.execute(_SELECT_RANGE, (lo, hi)).fetchall()
        except sqlite3.DatabaseError:
            if lo == hi:
                lost += 1
                continue
            mid = (lo + hi) // 2
            pending.extend([(mid + 1, hi), (lo, mid)])
            continue
        for row in rows:
            try:
                _from_row(row)
            except (ValueError, TypeError, orjson.JSONDecodeError):
                lost += 1
                continue
            yield row
    if lost:
        log.error("spool %s: %d ids could not be read from the damaged file", path, lost)


def salvage(path: str) -> tuple[int, str]:
    """Copy every readable row of a damaged spool into a fresh file at ``path``.

    The damaged file (and its -wal/-shm) moves aside to ``<path>.corrupt-<UTC time>``.

    Returns:
        The number of rows saved, and the new name of the damaged file.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.corrupt-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    fresh_path = path + ".salvage"
    if os.path.exists(fresh_path):
        os.remove(fresh_path)
    src = sqlite3.connect(f"file:{os.path.abspath(aside)}?mode=ro", uri=True, isolation_level=None)
    fresh = SqliteStore(fresh_path, "FULL", wal_limit=0)
    saved = 0
    try:
        fresh.conn.execute("BEGIN")
        for row in _readable_rows(src, path):
            fresh.conn.execute(_INSERT, row)
            saved += 1
        fresh.conn.execute("COMMIT")
        fresh.checkpoint()
    finally:
        src.close()
        fresh.close()
    os.replace(fresh_path, path)
    return saved, aside
