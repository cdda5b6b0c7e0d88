"""The store: comments made durable by the write-ahead queue, then moved into SQLite or PostgreSQL.

`Comments` is what the API talks to:

* `accept()` -> the comment is fsync'd in the local `WriteAheadQueue` (see queue.py) and only then
  acknowledged. The database is not on this path, so comments are taken while it is down.
* `flush_worker()` moves queued comments into the `CommentStore` in batches, at least once; the
  store's `insert_many` ignores ids it already has, so a replay after a crash is harmless. Errors
  back off (capped, jittered) and retry forever: nothing acknowledged is ever dropped here.
* `page()` merges what the database has with what is still queued, so a comment is listed as soon
  as its POST returned (read-your-writes), even before it is flushed. If the database cannot answer
  it raises `StoreUnavailable` rather than return a list that looks complete but is not.

Backends implement `CommentStore`; `open_store(url)` picks one by the URL's scheme.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from livecomments.model.comment import Comment
from livecomments.storage.lease import LeaseStore
from livecomments.storage.queue import WriteAheadQueue

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The database did not answer; the caller should say so (503), not guess."""


@dataclass(frozen=True, slots=True)
class PageQuery:
    """One page of a post's comments. At most one of `before` / `after` is set.

    No cursor: the newest `limit`. `before`: the newest `limit` older than it.
    `after`: the oldest `limit` newer than it (catch-up). Pages are always ascending by id.
    """

    post_id: str
    limit: int
    before: int | None = None
    after: int | None = None


class CommentStore(Protocol):
    """A database of comments. Implementations: sqlite_store.SQLiteStore, postgres_store."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations (idempotent)."""

    async def close(self) -> None: ...

    async def insert_many(self, comments: list[Comment]) -> list[Comment]:
        """Store all of `comments` in one transaction; ids already stored are left as they are.

        Returns the comments whose id was already stored with other content (an id collision:
        two instances minted one id); a replay of the same comment is not one."""

    async def page(self, query: PageQuery) -> list[Comment]:
        """Up to `query.limit + 1` comments of the page's window, ascending by id.

        The extra one tells the caller there is more; `window()` below picks the side.
        """


class LeasingStore(CommentStore, LeaseStore, Protocol):
    """A store that also holds the instance-id leases (both backends are)."""


def open_store(url: str) -> LeasingStore:
    if url.startswith("sqlite://"):
        # Imported here: the backends import PageQuery from this module.
        from livecomments.storage.sqlite import SQLiteStore  # noqa: PLC0415

        return SQLiteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from livecomments.storage.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url)
    raise ValueError(f"unsupported store url {url!r}")


def window(comments: list[Comment], query: PageQuery) -> tuple[list[Comment], bool]:
    """Cut ascending `comments` (already filtered by the cursor) to the page, and say if more."""
    has_more = len(comments) > query.limit
    if not has_more:
        return comments, False
    if query.after is not None:
        return comments[: query.limit], True
    return comments[-query.limit :], True


def different_from_stored(batch: list[Comment], stored: list[Comment]) -> list[Comment]:
    """The comments of `batch` whose id is stored with other content (collisions)."""
    by_id = {c.id: c for c in stored}
    return [c for c in batch if c.id in by_id and by_id[c.id] != c]


# The comments table's columns, in the order of Comment's fields (both backends).
COLUMNS = "id, post_id, uid, message, parent_id, reply_to, created_at"


def page_sql(
    query: PageQuery, columns: str, param: Callable[[int], str]
) -> tuple[str, tuple[object, ...]]:
    """The page's window as SQL, walked along the (post_id, id) index: no sort step.

    `param(n)` spells the n-th placeholder in the backend's dialect (`?` or `$n`).
    Ascending for `after`, descending otherwise: the caller reverses those."""
    select = f"SELECT {columns} FROM comments WHERE post_id = {param(1)}"
    n = query.limit + 1
    if query.after is not None:
        sql = f"{select} AND id > {param(2)} ORDER BY id ASC LIMIT {param(3)}"
        return sql, (query.post_id, query.after, n)
    if query.before is not None:
        sql = f"{select} AND id < {param(2)} ORDER BY id DESC LIMIT {param(3)}"
        return sql, (query.post_id, query.before, n)
    return f"{select} ORDER BY id DESC LIMIT {param(2)}", (query.post_id, n)


class Comments:
    """Queue in front, store behind: the durable path of every comment."""

    def __init__(
        self,
        queue: WriteAheadQueue,
        store: LeasingStore,
        flush_batch: int,
        retry_max: float,
    ) -> None:
        self.queue = queue
        self.store = store
        self._flush_batch = flush_batch
        self._retry_max = retry_max
        self.store_ok = True
        self.store_open = False
        self._opened = asyncio.Event()
        self.flushed = 0
        self.flush_errors = 0
        self.id_collisions = 0
        self.last_flush_error: str | None = None

    @property
    def lease_store(self) -> LeaseStore:
        return self.store

    async def try_open_store(self) -> bool:
        """One attempt to connect and migrate; False (logged) if the database is not there."""
        try:
            await self.store.open()
        except Exception as e:
            self.flush_errors += 1  # nothing can be flushed until it opens: same signal
            self._mark_store(False, e)
            return False
        self.store_open = True
        self._opened.set()
        self._mark_store(True)
        return True

    async def wait_store_open(self) -> None:
        """Return once the store has opened (at start-up, or later by the flusher's retries)."""
        await self._opened.wait()

    async def open_store_until_ready(self) -> None:
        """Retry `try_open_store` with capped, jittered backoff until it succeeds."""
        delay = 0.0
        while not self.store_open and not await self.try_open_store():
            delay = await self._backoff(delay)

    async def accept(self, comment: Comment) -> bytes:
        """Durable on return: fsync'd in the queue. Returns the comment's JSON (encoded once,
        reused for the live event). Raises QueueFull / QueueWriteFailed."""
        return await self.queue.enqueue(comment)

    async def page(self, query: PageQuery) -> tuple[list[Comment], bool]:
        # The queue first, then the database: a comment acked by the flusher while the database
        # read is in flight is gone from the queue, and only a read that starts after the ack
        # is sure to see it in the database. (The other order lost it: read-your-writes broke.)
        queued = self.queue.pending_page(query.post_id, query.limit + 1, query.before, query.after)
        try:
            stored = await self.store.page(query)
        except Exception as e:
            # Not recorded as the store's health: the flusher owns that, and one slow read is
            # not the database being down.
            raise StoreUnavailable(str(e)) from e
        # Both sides hold their own window of limit+1; the page's window lies in their union.
        merged = {c.id: c for c in stored}
        merged.update((c.id, c) for c in queued)
        return window(sorted(merged.values(), key=lambda c: c.id), query)

    async def flush_worker(self) -> None:
        """Move queued comments to the store until cancelled; never gives up, never drops."""
        delay = 0.0
        while True:
            await self.queue.wait_pending()
            batch = self.queue.oldest(self._flush_batch)
            try:
                collisions = await self.store.insert_many(batch)
            except Exception as e:  # CancelledError is not an Exception: it still stops us
                self.flush_errors += 1
                self._mark_store(False, e)
                delay = await self._backoff(delay)
                continue
            delay = 0.0
            self._mark_store(True)
            if collisions:
                self._report_collisions(collisions)
            self.flushed += len(batch)
            try:
                await self.queue.ack(batch)
            except Exception:
                # Memory has let them go; the rows stay in the queue file and are flushed
                # again after a restart, which the store's idempotent insert makes harmless.
                log.exception("queue: could not delete %d flushed comments", len(batch))

    def _report_collisions(self, collisions: list[Comment]) -> None:
        """Acknowledged comments the store could not keep: their id was already another
        comment's (two instances minted one id). Never silent: counted, shown in /readyz, and
        each logged whole, so a human can restore it."""
        self.id_collisions += len(collisions)
        for c in collisions:
            log.error(
                "store: comment id %d is already another comment's; not stored: %s",
                c.id,
                c.encode().decode(),
            )

    async def _backoff(self, delay: float) -> float:
        """Sleep a jittered, doubling delay capped at retry_max; return the new delay."""
        delay = min(self._retry_max, max(0.05, delay * 2))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        return delay

    def _mark_store(self, ok: bool, error: Exception | None = None) -> None:
        if ok and not self.store_ok:
            log.info("store: reachable again; draining %d queued comments", self.queue.depth)
        elif not ok:
            self.last_flush_error = f"{type(error).__name__}: {error}"
            if self.store_ok:
                log.error("store: unavailable (%s); comments stay queued", self.last_flush_error)
        self.store_ok = ok

    def status(self) -> dict[str, object]:
        return {
            "status": "ok" if self.store_ok and not self.id_collisions else "degraded",
            "id_collisions": self.id_collisions,
            "queue_depth": self.queue.depth,
            "queue_bytes": self.queue.pending_bytes,
            "oldest_unflushed_age_s": round(self.queue.oldest_age_seconds(), 3),
            "flushed": self.flushed,
            "flush_errors": self.flush_errors,
            "last_error": None if self.store_ok else self.last_flush_error,
            "queue_error": self.queue.write_error,
        }
