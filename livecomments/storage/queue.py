"""The write-ahead queue: where a comment is made durable before the service says yes.

Guarantees:

* `enqueue()` returns only after the comment is committed to a SQLite file in WAL mode with
  `synchronous=FULL`, i.e. fsync'd. Concurrent callers share one commit (group commit): while one
  commit is on disk, the next callers gather, and all of them ride the following commit.
* Everything committed and not yet `ack()`ed stays in memory too (`pending`, bounded by
  `max_bytes`), so a flusher can move it to the store and readers can see it before the store has
  it. After a crash the file is replayed into memory at `open()`.
* Past `max_bytes` of unflushed comments, `enqueue()` raises `QueueFull` instead of accepting what
  it might not be able to keep.

The file is SQLite rather than a hand-rolled log because SQLite's WAL already does what a log
must: checksummed frames, a torn or half-written tail discarded at the last good commit on the
next open, and fsync of the file (and of the directory when the WAL is created). `open()` also
runs `PRAGMA quick_check` and sets aside a file that fails it, salvaging the rows it can read.
All file I/O runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import itertools
import logging
import os
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from livecomments.model.comment import Comment

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.db"
LOCK_FILE = "lock"
# Seconds start-up waits for another process's lock on a healthy queue file before refusing.
LOCK_WAIT = 5.0
# Seconds between attempts to write again after a commit failed (disk full, I/O error).
REPAIR_INTERVAL = 1.0
# SQLite's words for a file that is damaged, as opposed to busy, read-only or unreachable.
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
# Largest number of comments one commit carries; more callers wait for the next one.
MAX_GROUP = 4096


class QueueFull(Exception):
    """The unflushed backlog is at its size limit; the comment was not accepted."""


class QueueWriteFailed(Exception):
    """The commit failed (disk full, I/O error); the comment was not accepted."""


class QueueUnusable(Exception):
    """The queue cannot be opened: its directory is in use by another process, its file is
    locked, or it cannot be written. Start-up stops with this message: none of these is
    damage, so nothing is set aside."""


@dataclass(slots=True)
class _Waiter:
    comment: Comment
    payload: bytes
    future: asyncio.Future[None]


class WriteAheadQueue:
    """Durable, bounded FIFO of comments between the API and the store."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal")
        self._db: sqlite3.Connection | None = None
        self._waiting: deque[_Waiter] = deque()
        self._waiting_bytes = 0
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # Unflushed comments as their encoded bytes (a third of the memory of Comment objects),
        # in id order (= commit order: ids are issued and queued without an await between),
        # and their ids per post for read-your-writes.
        self._pending: dict[int, bytes] = {}
        self._by_post: dict[str, list[int]] = {}
        self._pending_bytes = 0
        self._has_pending = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._closing = False
        # The last enqueue() was refused for want of room, and nothing was flushed since:
        # /readyz says "full" although the bytes held may be short of max_bytes.
        self.refusing = False
        # Why the last commit failed, while commits fail (disk full, I/O error): enqueue()
        # refuses at once, /readyz says so, and _repair_worker tries again until one succeeds.
        self.write_error: str | None = None
        self._repairer: asyncio.Task[None] | None = None
        # Ids flushed to the store whose rows could not be deleted yet (the same failures).
        self._undeleted: list[int] = []
        self._lock_fd: int | None = None
        self.remembered_instance_id: int | None = None
        self.last_id = 0
        self.commits = 0
        self.recovered_rows = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file and replay what a previous run left unflushed."""
        loop = asyncio.get_running_loop()
        try:
            rows, last_id = await loop.run_in_executor(self._executor, self._open_sync)
        except BaseException:
            await loop.run_in_executor(self._executor, self._close_sync)  # and drop the lock
            self._executor.shutdown(wait=True)
            raise
        for comment_id, post_id, payload in rows:
            self._remember(comment_id, post_id, payload)
        self.last_id = max(last_id, max(self._pending, default=0))
        self.recovered_rows = len(rows)
        if rows:
            log.info("queue: replaying %d unflushed comments from %s", len(rows), self._dir)
        self._writer = asyncio.create_task(self._commit_worker(), name="wal-commit-worker")

    async def close(self) -> None:
        """Commit what callers are already waiting on, then close the file."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._repairer is not None:
            self._repairer.cancel()
            await asyncio.gather(self._repairer, return_exceptions=True)
            self._repairer = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    # -- the write path ------------------------------------------------------------------------

    async def enqueue(self, comment: Comment) -> bytes:
        """Return once `comment` is fsync'd, with its encoded form (what was written: callers
        reuse it instead of encoding again). Raise `QueueFull` or `QueueWriteFailed` if not."""
        if self._closing:
            raise QueueWriteFailed("the queue is closing")
        if self.write_error is not None:
            raise QueueWriteFailed(self.write_error)
        payload = comment.encode()
        if self._pending_bytes + self._waiting_bytes + len(payload) > self._max_bytes:
            self.refusing = True
            raise QueueFull(f"write-ahead queue holds {self._pending_bytes} bytes unflushed")
        waiter = _Waiter(comment, payload, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._waiting_bytes += len(payload)
        self._wake.set()
        # Shielded: a client that hangs up mid-request must not cancel a commit other callers
        # share; the comment is then stored all the same, as it would be had the reply been lost.
        await asyncio.shield(waiter.future)
        return payload

    async def _commit_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing or self._waiting:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                group = [self._waiting.popleft() for _ in range(min(MAX_GROUP, len(self._waiting)))]
                self._waiting_bytes -= sum(len(w.payload) for w in group)
                rows = [(w.comment.id, w.comment.post_id, w.payload) for w in group]
                try:
                    await loop.run_in_executor(self._executor, self._commit_sync, rows)
                except Exception as e:  # disk full, I/O error: refuse these, keep serving
                    self._cannot_write(f"commit of {len(group)} comments failed", e)
                    for w in group:
                        if not w.future.done():
                            w.future.set_exception(QueueWriteFailed(self.write_error or str(e)))
                    continue
                self.commits += 1
                for w in group:
                    self._remember(w.comment.id, w.comment.post_id, w.payload)
                    self.last_id = max(self.last_id, w.comment.id)
                    if not w.future.done():
                        w.future.set_result(None)

    # -- the read side, for the flusher and for read-your-writes -------------------------------

    def _remember(self, comment_id: int, post_id: str, payload: bytes) -> None:
        self._pending[comment_id] = payload
        bisect.insort(self._by_post.setdefault(post_id, []), comment_id)
        self._pending_bytes += len(payload)
        self._has_pending.set()
        self._empty.clear()

    def pending_page(
        self, post_id: str, n: int, before: int | None, after: int | None
    ) -> list[Comment]:
        """The unflushed comments a page could need: at most `n`, ascending, found by bisection
        (a hot post's backlog can be long; only what is returned is decoded). `after`: the
        oldest n newer than it; otherwise the newest n (older than `before`, if given)."""
        ids = self._by_post.get(post_id, [])
        if after is not None:
            start = bisect.bisect_right(ids, after)
            window = ids[start : start + n]
        else:
            end = len(ids) if before is None else bisect.bisect_left(ids, before)
            window = ids[max(0, end - n) : end]
        return [Comment.decode(self._pending[i]) for i in window]

    def oldest(self, limit: int) -> list[Comment]:
        """Up to `limit` unflushed comments, oldest first (dicts keep insertion order)."""
        return [Comment.decode(p) for p in itertools.islice(self._pending.values(), limit)]

    async def wait_pending(self) -> None:
        """Return when there is at least one unflushed comment."""
        while not self._pending:
            self._has_pending.clear()
            await self._has_pending.wait()

    async def wait_empty(self) -> None:
        """Return when everything committed has been acked (flushed to the store)."""
        await self._empty.wait()

    async def ack(self, comments: list[Comment]) -> None:
        """The store has these; forget them (memory first, then the file)."""
        ids = [c.id for c in comments]
        acked: dict[str, set[int]] = {}
        for c in comments:
            payload = self._pending.pop(c.id, None)
            if payload is not None:
                self._pending_bytes -= len(payload)
                acked.setdefault(c.post_id, set()).add(c.id)
        for post_id, gone in acked.items():
            self._forget_ids(post_id, gone)
        self.refusing = False
        if not self._pending:
            self._empty.set()
        loop = asyncio.get_running_loop()
        # If this delete is lost in a crash the rows are flushed again: inserts are idempotent.
        try:
            await loop.run_in_executor(self._executor, self._delete_sync, ids)
        except Exception as e:
            # The rows stay in the file; _repair_worker deletes them once it can write.
            self._undeleted.extend(ids)
            self._cannot_write(f"delete of {len(ids)} flushed comments failed", e)

    # -- when the disk is full -----------------------------------------------------------------

    def _cannot_write(self, what: str, error: Exception) -> None:
        """A write failed: refuse new comments with the real cause until one succeeds again."""
        cause = f"{type(error).__name__}: {error}"
        if self.write_error is None:
            log.error(
                "queue: %s: %s; refusing comments until %s can be written", what, cause, self._dir
            )
        self.write_error = f"{what}: {error}"
        if self._repairer is None and not self._closing:
            self._repairer = asyncio.create_task(self._repair_worker(), name="wal-repair-worker")

    async def _repair_worker(self) -> None:
        """Every REPAIR_INTERVAL, try to make room and write: checkpoint and truncate the WAL,
        delete the rows already flushed, then one small commit. The first success ends it."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REPAIR_INTERVAL)
            undeleted = self._undeleted
            try:
                if self._pending or self._waiting:
                    await loop.run_in_executor(self._executor, self._repair_sync, undeleted)
                else:
                    # Everything in the file is in the store: the file itself may be what filled
                    # the disk, and a new one is all we need.
                    await loop.run_in_executor(self._executor, self._reset_sync, self.last_id)
            except Exception as e:
                self.write_error = f"still cannot write: {e}"
                continue
            del self._undeleted[: len(undeleted)]
            log.info("queue: %s can be written again; taking comments", self._dir)
            self.write_error = None
            self._repairer = None
            return

    def _forget_ids(self, post_id: str, gone: set[int]) -> None:
        ids_of_post = self._by_post[post_id]
        # Flushes go oldest first, so what goes is a prefix of the post's list: one slice
        # deletion per post and batch, not one list shift per comment (a hot post's list is long).
        k = len(gone)
        if set(ids_of_post[:k]) == gone:
            del ids_of_post[:k]
        else:
            ids_of_post[:] = [i for i in ids_of_post if i not in gone]
        if not ids_of_post:
            del self._by_post[post_id]

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def oldest_age_seconds(self) -> float:
        first = next(iter(self._pending.values()), None)
        if first is None:
            return 0.0
        return max(0.0, time.time() - Comment.decode(first).created_at / 1000)

    # -- on the queue's own thread -------------------------------------------------------------

    def _open_sync(self) -> tuple[list[tuple[int, str, bytes]], int]:
        self._check_directory()
        self._lock_directory()
        path = self._dir / QUEUE_FILE
        salvaged: list[tuple[int, str, bytes]] = []
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
            self._commit_sync(salvaged)
        rows = db.execute("SELECT id, post_id, payload FROM queue ORDER BY id").fetchall()
        (last_id,) = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
        row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
        self.remembered_instance_id = None if row is None else int(row[0])
        return rows, int(last_id)

    async def remember_instance_id(self, instance_id: int) -> None:
        """Keep the instance id this queue's comments were issued under, for the next start:
        lease.py claims it again first, and may start with it while the store is down."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._remember_instance_id_sync, instance_id)

    def _remember_instance_id_sync(self, instance_id: int) -> None:
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
            " id INTEGER PRIMARY KEY, post_id TEXT NOT NULL, payload BLOB NOT NULL)"
        )
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
    def _salvage(db: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
        """Read what still decodes from a damaged file: forwards, then backwards, up to the
        damage from either side (a damaged leaf page costs only the rows on it)."""
        rows: dict[int, tuple[int, str, bytes]] = {}
        for order in ("ASC", "DESC"):
            try:
                for row in db.execute(
                    f"SELECT id, post_id, payload FROM queue ORDER BY id {order}"
                ):
                    try:
                        Comment.decode(row[2])
                    except Exception:  # a row that no longer decodes: skip it, keep the rest
                        continue
                    rows[row[0]] = row
            except sqlite3.DatabaseError:
                continue  # reached the damage from this side
        return [rows[i] for i in sorted(rows)]

    def _commit_sync(self, rows: list[tuple[int, str, bytes]]) -> None:
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

    def _delete_sync(self, ids: list[int]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _repair_sync(self, undeleted: list[int]) -> None:
        """Give SQLite room, then prove a commit works (raises while it does not)."""
        db = self._db
        if db is None:  # a reset that could not finish; only reached with nothing pending
            raise QueueWriteFailed("the queue file could not be recreated")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if undeleted:
            self._delete_sync(undeleted)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE meta SET value = value WHERE key = 'last_id'")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _reset_sync(self, last_id: int) -> None:
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

    def _close_sync(self) -> None:
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
