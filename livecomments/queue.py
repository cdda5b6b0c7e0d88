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
import itertools
import logging
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from livecomments.comment import Comment

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.db"
# Largest number of comments one commit carries; more callers wait for the next one.
MAX_GROUP = 4096


class QueueFull(Exception):
    """The unflushed backlog is at its size limit; the comment was not accepted."""


class QueueWriteFailed(Exception):
    """The commit failed (disk full, I/O error); the comment was not accepted."""


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
        self.last_id = 0
        self.commits = 0
        self.recovered_rows = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file and replay what a previous run left unflushed."""
        loop = asyncio.get_running_loop()
        rows, last_id = await loop.run_in_executor(self._executor, self._open_sync)
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
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    # -- the write path ------------------------------------------------------------------------

    async def enqueue(self, comment: Comment) -> bytes:
        """Return once `comment` is fsync'd, with its encoded form (what was written: callers
        reuse it instead of encoding again). Raise `QueueFull` or `QueueWriteFailed` if not."""
        if self._closing:
            raise QueueWriteFailed("the queue is closing")
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
                    log.error("queue: commit of %d comments failed: %s", len(group), e)
                    for w in group:
                        if not w.future.done():
                            w.future.set_exception(QueueWriteFailed(str(e)))
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
        await loop.run_in_executor(self._executor, self._delete_sync, ids)

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
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / QUEUE_FILE
        salvaged: list[tuple[int, str, bytes]] = []
        db: sqlite3.Connection | None = None
        try:
            db = self._connect(path)
            problem = self._quick_check(db) or self._ensure_schema(db)
        except sqlite3.DatabaseError as e:  # not even a database any more
            problem = str(e)
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
        return rows, int(last_id)

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
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
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
        try:
            result = db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as e:
            return str(e)
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
            db.execute("ROLLBACK")
            raise

    def _delete_sync(self, ids: list[int]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
