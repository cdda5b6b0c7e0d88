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
* When a write fails (a full disk, an I/O error), `enqueue()` refuses at once with the real cause
  (`QueueWriteFailed`, `write_error` for /readyz) until a repair worker proves a commit works
  again: it checkpoints and truncates the WAL, deletes the rows already flushed and, when the
  queue's own file is what filled the disk and everything in it is flushed, starts a new one.

The file itself (queue_file.py: locking, damage, salvage) is used from one dedicated thread,
never the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from livecomments.model.comment import Comment
from livecomments.storage.queue_file import QUEUE_FILE, QueueFile, QueueUnusable

__all__ = ["QUEUE_FILE", "QueueFull", "QueueUnusable", "QueueWriteFailed", "WriteAheadQueue"]

log = logging.getLogger(__name__)

# Seconds between attempts to write again after a commit failed (disk full, I/O error).
REPAIR_INTERVAL = 1.0

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
        self._file = QueueFile(self._dir)
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
        self.remembered_instance_id: int | None = None
        self.last_id = 0
        self.commits = 0
        self.recovered_rows = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file and replay what a previous run left unflushed."""
        loop = asyncio.get_running_loop()
        try:
            rows, last_id, remembered = await loop.run_in_executor(self._executor, self._file.open)
        except BaseException:
            await loop.run_in_executor(self._executor, self._file.close)  # and drop the lock
            self._executor.shutdown(wait=True)
            raise
        self.remembered_instance_id = remembered
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
        await loop.run_in_executor(self._executor, self._file.close)
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
                    await loop.run_in_executor(self._executor, self._file.commit, rows)
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
            await loop.run_in_executor(self._executor, self._file.delete, ids)
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
                    await loop.run_in_executor(self._executor, self._file.repair, undeleted)
                else:
                    # Everything in the file is in the store: the file itself may be what filled
                    # the disk, and a new one is all we need.
                    await loop.run_in_executor(self._executor, self._file.reset, self.last_id)
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

    async def remember_instance_id(self, instance_id: int) -> None:
        """Keep the instance id this queue's comments were issued under, for the next start:
        lease.py claims it again first, and may start with it while the store is down."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._file.remember_instance_id, instance_id)
