"""The write-ahead queue's file: one SQLite database in WAL mode, `synchronous=FULL`.

SQLite rather than a hand-rolled log because its WAL already does what a log must: checksummed
frames, a torn or half-written tail discarded at the last good commit on the next open, and fsync
of the file (and of the directory when the WAL is created). What this module adds:

* The directory is locked (`flock` on `lock`, holding our pid) for the life of the process: two
  processes interleaving one queue would replay, flush and delete each other's rows.
* Only damage is set aside: a file that fails `PRAGMA quick_check` (or SQLite calls corrupt) is
  moved to `queue.db.corrupt-*` and the rows that still decode are salvaged from both ends. A file
  locked by another process, a read-only directory or an I/O error stops start-up with a message
  (`QueueUnusable`) instead.
* On a full disk SQLite ends the transaction itself; we roll back only if it has not, so the
  real cause ("database or disk is full") is what the caller sees.

`QueueFile` is used from one thread only, the queue's executor (queue.py), never the event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion, is_deletion

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.db"
LOCK_FILE = "lock"
# Seconds start-up waits for another process's lock on a healthy queue file before refusing.
LOCK_WAIT = 5.0
# SQLite's words for a file that is damaged, as opposed to busy, read-only or unreachable.
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})

Row = tuple[int, str, bytes]  # (comment id, post id, the comment's encoded bytes)
# A row as the file keeps it: stored in the database (0/1), appended to its stream in an epoch.
FileRow = tuple[int, str, bytes, int, str | None]


@dataclass
class Marks:
    """What the flusher and the publisher achieved, to write down in one transaction. Losing it
    in a crash costs a repeated flush or append, both harmless: so it is committed without an
    fsync of its own (synchronous=NORMAL), riding the next group commit's."""

    finished: list[int] = field(default_factory=list)  # owed nothing: deleted
    stored: list[int] = field(default_factory=list)
    appended: list[tuple[str, int]] = field(default_factory=list)  # (epoch, id)
    unappended: list[int] = field(default_factory=list)  # their epoch ended: append again

    def __bool__(self) -> bool:
        return bool(self.finished or self.stored or self.appended or self.unappended)


class QueueUnusable(Exception):
    """The queue cannot be opened: its directory is in use by another process, its file is
    locked, or it cannot be written. Start-up stops with this message: none of these is
    damage, so nothing is set aside."""


class QueueFile:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def open(self) -> tuple[list[FileRow], int, int | None]:
        self._check_directory()
        self._lock_directory()
        path = self._dir / QUEUE_FILE
        salvaged: list[Row] = []
        db: sqlite3.Connection | None = None
        try:
            db = self._connect(path)
            problem = self._quick_check(db) or self._ensure_schema(db)
        except sqlite3.DatabaseError as e:
            try:
                problem = self._damage_or_raise(path, e)
            except QueueUnusable:
                if db is not None:
                    db.close()
                raise
        if problem is not None:
            if db is not None:
                salvaged = self._salvage(db)
                db.close()
            aside = self._set_aside(path)
            log.error(
                "queue: %s failed its integrity check (%s); moved to %s, salvaged %d rows",
                path,
                problem,
                aside,
                len(salvaged),
            )
            db = self._connect(path)
            self._ensure_schema(db)
        assert db is not None  # set on both paths above
        self._db = db
        if salvaged:
            self.commit(salvaged)
        rows = db.execute(
            "SELECT id, post_id, payload, stored, epoch FROM queue ORDER BY id"
        ).fetchall()
        (last_id,) = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
        row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
        return rows, int(last_id), None if row is None else int(row[0])

    def remember_instance_id(self, instance_id: int) -> None:
        db = self._db
        assert db is not None
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('instance_id', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (instance_id,),
        )

    def _check_directory(self) -> None:
        """A directory we cannot create or write is a set-up mistake, said as such."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QueueUnusable(f"queue.dir {self._dir}: cannot create it: {e.strerror}") from None
        if not os.access(self._dir, os.W_OK | os.X_OK):
            raise QueueUnusable(
                f"queue.dir {self._dir}: not writable by this process (uid {os.getuid()}), "
                "or on a read-only file system"
            )

    def _lock_directory(self) -> None:
        """Hold an exclusive lock on queue.dir for the life of the process: two processes
        interleaving one write-ahead queue would each replay, flush and delete the other's
        rows. The lock file names the holder's pid for whoever is refused."""
        path = self._dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QueueUnusable(
                f"queue.dir {self._dir} is in use by another livecomments process (pid "
                f"{holder}); give each instance its own queue.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _damage_or_raise(path: Path, error: sqlite3.DatabaseError) -> str:
        """Only damage is set aside. A lock held elsewhere past LOCK_WAIT, a read-only file
        or an I/O error stops start-up with a message instead."""
        name = getattr(error, "sqlite_errorname", "")
        if name in _CORRUPT:
            return str(error)
        if name in _BUSY:
            raise QueueUnusable(
                f"{path} is locked by another process ({error}) and stayed locked for "
                f"{LOCK_WAIT:g}s; stop whatever holds it (a backup, an sqlite3 shell) and start "
                "again"
            ) from None
        raise QueueUnusable(f"{path}: {error} ({name or 'no SQLite code'})") from None

    @staticmethod
    def _set_aside(path: Path) -> Path:
        """Keep a damaged file (and its WAL) for a human, out of the way of a fresh one."""
        aside = path.with_name(f"{QUEUE_FILE}.corrupt-{time.time_ns()}")
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(QUEUE_FILE + suffix)
            if side.exists():
                side.rename(aside.with_name(aside.name + suffix))
        return aside

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT)
        try:
            _use_wal(db)
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _ensure_schema(db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS queue ("
            " id INTEGER PRIMARY KEY, post_id TEXT NOT NULL, payload BLOB NOT NULL,"
            " stored INTEGER NOT NULL DEFAULT 0, epoch TEXT)"
        )
        # A file from before the outbox kept both duties: its rows are owed both.
        columns = {row[1] for row in db.execute("PRAGMA table_info(queue)")}
        if "stored" not in columns:
            db.execute("ALTER TABLE queue ADD COLUMN stored INTEGER NOT NULL DEFAULT 0")
        if "epoch" not in columns:
            db.execute("ALTER TABLE queue ADD COLUMN epoch TEXT")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('last_id', 0)")

    @staticmethod
    def _quick_check(db: sqlite3.Connection) -> str | None:
        """None if the file is sound, what is wrong if it is damaged; raises if it is busy."""
        result = db.execute("PRAGMA quick_check").fetchall()
        if result == [("ok",)]:
            return None
        return "; ".join(str(r[0]) for r in result[:5])

    @staticmethod
    def _salvage(db: sqlite3.Connection) -> list[Row]:
        """Read what still decodes from a damaged file: forwards, then backwards, up to the
        damage from either side (a damaged leaf page costs only the rows on it)."""
        rows: dict[int, Row] = {}
        for order in ("ASC", "DESC"):
            try:
                for row in db.execute(
                    f"SELECT id, post_id, payload FROM queue ORDER BY id {order}"
                ):
                    try:  # a deletion is a row too: it must survive a salvage like a comment
                        (Deletion if is_deletion(row[2]) else Comment).decode(row[2])
                    except Exception:  # a row that no longer decodes: skip it, keep the rest
                        continue
                    rows[row[0]] = row
            except sqlite3.DatabaseError:
                continue  # reached the damage from this side
        return [rows[i] for i in sorted(rows)]

    def commit(self, rows: list[Row]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO queue (id, post_id, payload) VALUES (?, ?, ?)", rows
            )
            db.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key = 'last_id'",
                (max(r[0] for r in rows),),
            )
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def mark(self, marks: Marks) -> None:
        db = self._db
        assert db is not None
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM queue WHERE id = ?", [(i,) for i in marks.finished])
                db.executemany(
                    "UPDATE queue SET stored = 1 WHERE id = ?", [(i,) for i in marks.stored]
                )
                db.executemany("UPDATE queue SET epoch = ? WHERE id = ?", marks.appended)
                db.executemany(
                    "UPDATE queue SET epoch = NULL WHERE id = ?", [(i,) for i in marks.unappended]
                )
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def repair(self, unwritten: list[Marks]) -> None:
        """Give SQLite room, then prove a commit works (raises while it does not)."""
        db = self._db
        if db is None:  # a reset that could not finish; only reached with nothing pending
            raise sqlite3.OperationalError("the queue file could not be recreated")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for marks in unwritten:
            self.mark(marks)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE meta SET value = value WHERE key = 'last_id'")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def reset(self, last_id: int) -> None:
        """Replace a file whose every row is flushed with an empty one that keeps `last_id`.

        Only called with nothing pending, so the rows it drops are all in the store. A crash
        between the unlink and the first commit leaves no file: the next start creates one and
        issues ids from the clock, as a first start does."""
        if self._db is not None:
            self._db.close()
            self._db = None
        path = self._dir / QUEUE_FILE
        for name in (QUEUE_FILE + "-wal", QUEUE_FILE + "-shm", QUEUE_FILE):
            (self._dir / name).unlink(missing_ok=True)
        db = self._connect(path)
        self._db = db
        self._ensure_schema(db)
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_id'", (last_id,))
        log.warning("queue: %s was unwritable with everything flushed; started a new file", path)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if SQLite has not already: on a full disk it ends the transaction itself, and
    a ROLLBACK then fails with "no transaction is active", hiding the real cause."""
    if db.in_transaction:
        db.execute("ROLLBACK")


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch to WAL. SQLite answers a switch that meets another connection's lock with "database
    is locked" at once, without its busy wait: retry until LOCK_WAIT."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", "") not in _BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.05)
