"""The write-ahead queue: where a comment is made durable before the service says yes.

Guarantees:

* `enqueue()` returns only after the comment is committed to a SQLite file in WAL mode with
  `synchronous=FULL`, i.e. fsync'd. Concurrent callers share one commit (group commit): while one
  commit is on disk, the next callers gather, and all of them ride the following commit.
* The queue is the outbox: a comment stays until it is both stored in the database and appended
  to its post's stream (`mark_stored`, `mark_appended`), in memory too (`rows`, pending.py,
  bounded by `max_bytes`), so the flusher and the publisher take their work from memory and
  readers see a comment before the database has it. After a crash the file is replayed into
  memory at `open()`, with what each comment was still owed.
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
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.storage.pending import PendingRows
from livecomments.storage.queue_file import QUEUE_FILE, Marks, QueueFile, QueueUnusable

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


# What the queue holds: comments, and deletions of comments (model/deletion.py).
Record = Comment | Deletion


@dataclass(slots=True)
class _Waiter:
    comment: Record
    payload: bytes
    future: asyncio.Future[None]


class WriteAheadQueue:
    """Durable, bounded outbox of comments between the API, the database and the streams."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal")
        self._file = QueueFile(self._dir)
        self._waiting: deque[_Waiter] = deque()
        self._waiting_bytes = 0
        self._committing_bytes = 0  # the group being fsync'd now
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.rows = PendingRows()
        self._closing = False
        # The last enqueue() was refused for want of room, and nothing was flushed since:
        # /readyz says "full" although the bytes held may be short of max_bytes.
        self.refusing = False
        # Why the last commit failed, while commits fail (disk full, I/O error): enqueue()
        # refuses at once, /readyz says so, and _repair_worker tries again until one succeeds.
        self.write_error: str | None = None
        self._repairer: asyncio.Task[None] | None = None
        # Marks that could not be written yet (the same failures); memory has them already.
        self._unwritten: list[Marks] = []
        self.remembered_instance_id: int | None = None
        self.last_id = 0
        self.commits = 0
        self.recovered_rows = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file and replay what a previous run left owed."""
        loop = asyncio.get_running_loop()
        try:
            rows, last_id, remembered = await loop.run_in_executor(self._executor, self._file.open)
        except BaseException:
            await loop.run_in_executor(self._executor, self._file.close)  # and drop the lock
            self._executor.shutdown(wait=True)
            raise
        self.remembered_instance_id = remembered
        done = Marks()
        for comment_id, post_id, payload, stored, epoch in rows:
            if not self.rows.add((comment_id, post_id, payload), stored=bool(stored), epoch=epoch):
                done.finished.append(comment_id)
        self.last_id = max(last_id, max(self.rows.ids(), default=0))
        self.recovered_rows = len(self.rows)
        if rows:
            log.info(
                "queue: replaying %d comments from %s (%d not stored, %d not appended)",
                len(self.rows),
                self._dir,
                len(self.rows.unstored(len(self.rows))),
                self.rows.unappended_count(),
            )
        self._writer = asyncio.create_task(self._commit_worker(), name="wal-commit-worker")
        if done:
            await self._write(done)

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

    async def enqueue(self, comment: Record) -> bytes:
        """Return once `comment` (or a deletion) is fsync'd, with its encoded form (what was
        written: callers reuse it instead of encoding again). Raise `QueueFull` or
        `QueueWriteFailed` if not."""
        if self._closing:
            raise QueueWriteFailed("the queue is closing")
        if self.write_error is not None:
            raise QueueWriteFailed(self.write_error)
        payload = comment.encode()
        held = self.rows.bytes + self._waiting_bytes + self._committing_bytes
        if held + len(payload) > self._max_bytes:
            self.refusing = True
            raise QueueFull(f"write-ahead queue holds {self.rows.bytes} bytes unflushed")
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
                size = sum(len(w.payload) for w in group)
                self._waiting_bytes -= size
                rows = [(w.comment.id, w.comment.post_id, w.payload) for w in group]
                # In flight: in neither the waiting list nor the rows, yet in the file once the
                # commit returns; counted, so no limit and no repair overlooks it.
                self._committing_bytes += size
                try:
                    await loop.run_in_executor(self._executor, self._file.commit, rows)
                except Exception as e:  # disk full, I/O error: refuse these, keep serving
                    self._cannot_write(f"commit of {len(group)} comments failed", e)
                    for w in group:
                        if not w.future.done():
                            w.future.set_exception(QueueWriteFailed(self.write_error or str(e)))
                    continue
                finally:
                    self._committing_bytes -= size
                self.commits += 1
                for row, w in zip(rows, group, strict=True):
                    self.rows.add(row)
                    self.last_id = max(self.last_id, w.comment.id)
                    if not w.future.done():
                        w.future.set_result(None)

    # -- what the flusher and the publisher did ------------------------------------------------

    async def mark_stored(self, ids: list[int]) -> None:
        """The database has these (memory first, then the file)."""
        finished = self.rows.mark_stored(ids)
        self.refusing = self.refusing and not finished
        done = set(finished)
        await self._write(Marks(finished=finished, stored=[i for i in ids if i not in done]))

    async def mark_appended(self, epochs: dict[int, str]) -> None:
        """These are in their streams, in these epochs."""
        finished = self.rows.mark_appended(epochs)
        self.refusing = self.refusing and not finished
        done = set(finished)
        appended = [(epoch, i) for i, epoch in epochs.items() if i not in done]
        await self._write(Marks(finished=finished, appended=appended))

    async def mark_unappended(self, ids: list[int]) -> None:
        """Their epoch ended before the database had them: they are owed an append again."""
        again = self.rows.mark_unappended(ids)
        if again:
            await self._write(Marks(unappended=again))

    async def _write(self, marks: Marks) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._file.mark, marks)
        except Exception as e:
            # Memory has them; _repair_worker writes them once it can. Lost in a crash, they
            # cost a repeated flush or append, which are harmless.
            self._unwritten.append(marks)
            self._cannot_write("writing what was flushed or appended failed", e)

    async def wait_empty(self) -> None:
        """Return when every comment is stored and appended."""
        await self.rows.empty.wait()

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
        write the marks that could not be, then one small commit. The first success ends it."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REPAIR_INTERVAL)
            unwritten = list(self._unwritten)
            try:
                if len(self.rows) or self._waiting or self._committing_bytes:
                    await loop.run_in_executor(self._executor, self._file.repair, unwritten)
                else:
                    # Every comment in the file is stored and appended: the file itself may be
                    # what filled the disk, and a new one is all we need.
                    await loop.run_in_executor(self._executor, self._file.reset, self.last_id)
            except Exception as e:
                self.write_error = f"still cannot write: {e}"
                continue
            del self._unwritten[: len(unwritten)]
            log.info("queue: %s can be written again; taking comments", self._dir)
            self.write_error = None
            self._repairer = None
            return

    # -- for status ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self.rows)

    @property
    def pending_bytes(self) -> int:
        return self.rows.bytes

    def oldest_age_seconds(self) -> float:
        return self.rows.oldest_age_seconds()

    async def remember_instance_id(self, instance_id: int) -> None:
        """Keep the instance id this queue's comments were issued under, for the next start:
        lease.py claims it again first, and may start with it while the store is down."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._file.remember_instance_id, instance_id)
