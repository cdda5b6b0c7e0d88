"""The durable log: every comment passes it, and nothing it acknowledged is ever lost.

`DurableLog` is what the API talks to, in front of the database:

* `accept()` -> the comment is fsync'd in the local `WriteAheadQueue` (queue.py) and only then
  acknowledged. The database is not on this path, so comments are taken while it is down.
* `flush_worker()` moves queued comments into the `CommentStore` (base.py) in batches, at least
  once; the store's `insert_many` ignores ids it already has, so a replay after a crash is
  harmless. Errors back off (capped, jittered) and retry forever: nothing acknowledged is ever
  dropped here. An id the store already has with other content (two instances minted one id) is
  counted and logged whole, never passed over in silence.
* `page()` merges what the database has with what is still queued, so a comment is listed as soon
  as its POST returned (read-your-writes), even before it is flushed. If the database cannot
  answer it raises `StoreUnavailable` rather than return a list that looks complete but is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from livecomments import metrics
from livecomments.backoff import Backoff
from livecomments.config import Settings
from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion, is_deletion
from livecomments.storage import open_store
from livecomments.storage.base import (
    LeaseStore,
    LeasingStore,
    PageQuery,
    StoreUnavailable,
    Streams,
    window,
)
from livecomments.storage.queue import WriteAheadQueue
from livecomments.urls import redact_url

log = logging.getLogger(__name__)


class DurableLog:
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
        # The live side's streams, once the broker runs (app.py): GET merges their history.
        self.streams: Streams | None = None
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
            metrics.FLUSH_ERRORS.inc()
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
        backoff = Backoff(cap=self._retry_max)
        while not self.store_open:
            if await self.try_open_store():
                return
            await asyncio.sleep(backoff.next())

    async def accept(self, comment: Comment | Deletion) -> bytes:
        """Durable on return: fsync'd in the queue. Returns the comment's JSON (encoded once,
        reused for the live event). Raises QueueFull / QueueWriteFailed."""
        return await self.queue.enqueue(comment)

    async def page(self, query: PageQuery) -> tuple[list[Comment], bool]:
        """The page, complete across instances: what the post's stream history holds (comments
        other instances accepted and any viewer was sent, flushed or not), what this instance
        still queues, and the database."""
        # The stream and the queue first, then the database: a comment flushed while the
        # database read is in flight is gone from the queue, and only a read that starts after
        # the flush is sure to see it in the database. (The other order lost it.)
        recent, streamed_gone = await asyncio.gather(
            self._recent(query), self._taken_down(query.post_id)
        )
        queued = self.queue.rows.page(query.post_id, query.limit + 1, query.before, query.after)
        # Deletions the database may not have yet take rows from its window: ask for as many
        # more as they could take.
        gone = streamed_gone | self.queue.rows.deleting(query.post_id)
        try:
            stored = await self.store.page(replace(query, limit=query.limit + len(gone)))
        except Exception as e:
            # Not recorded as the store's health: the flusher owns that, and one slow read is
            # not the database being down.
            raise StoreUnavailable(str(e)) from e
        # Each source holds its own window of limit+1; the page's window lies in their union.
        merged = {c.id: c for c in recent}
        merged.update((c.id, c) for c in queued)
        # What the database lists has no tombstone; what it does not list (another instance's
        # history, our queue) may have one: a deletion flushed before its comment.
        listed = {c.id for c in stored}
        unlisted = [i for i in merged if i not in listed]
        if unlisted:
            try:
                gone |= await self.store.deleted_among(query.post_id, unlisted)
            except Exception as e:
                raise StoreUnavailable(str(e)) from e
        merged.update((c.id, c) for c in stored)
        kept = [c for i, c in merged.items() if i not in gone]
        return window(sorted(kept, key=lambda c: c.id), query)

    async def find(self, post_id: str, comment_id: int) -> tuple[Comment, bool] | None:
        """A comment of the post wherever it is now (this queue, the database, the stream's
        history), and whether it is deleted; None if it is nowhere. StoreUnavailable if the
        database cannot say."""
        deleted_here = comment_id in self.queue.rows.deleting(post_id) or (
            comment_id in await self._taken_down(post_id)
        )
        payload = self.queue.rows.payload(comment_id)
        if payload is not None and not is_deletion(payload):
            comment = Comment.decode(payload)
            if comment.post_id == post_id:
                stored = await self._get(post_id, comment_id)
                return comment, deleted_here or (stored is not None and stored[1])
        found = await self._get(post_id, comment_id)
        if found is not None:
            return found[0], found[1] or deleted_here
        recent = await self._recent(PageQuery(post_id, 1, before=comment_id + 1))
        match = next((c for c in recent if c.id == comment_id), None)  # recent is unordered
        return None if match is None else (match, deleted_here)

    async def _get(self, post_id: str, comment_id: int) -> tuple[Comment, bool] | None:
        try:
            return await self.store.get(post_id, comment_id)
        except Exception as e:
            raise StoreUnavailable(str(e)) from e

    async def _taken_down(self, post_id: str) -> set[int]:
        """The stream history's deletions (published, maybe not stored yet); none if the
        post's shard does not answer (the tombstone reaches the database meanwhile)."""
        if self.streams is None:
            return set()
        try:
            return await self.streams.taken_down(post_id)
        except ConnectionError as e:
            log.debug("deletions of %s without the stream's history: %s", post_id, e)
            return set()

    async def _recent(self, query: PageQuery) -> list[Comment]:
        """The stream history's part of a page. If the post's shard does not answer, the page
        is what this instance knows: its viewers were given no position meanwhile, and get a
        `reset`, so a reload, once the shard is back."""
        if self.streams is None:
            return []
        try:
            bodies = await self.streams.recent(
                query.post_id, query.after, query.before, query.limit + 1
            )
        except ConnectionError as e:
            log.debug("page of %s without the stream's history: %s", query.post_id, e)
            return []
        comments = [Comment.decode(body) for body in bodies]
        return [c for c in comments if _in_window(c.id, query)]

    async def open_and_flush_worker(self) -> None:
        """Opens the store if start-up could not, then flushes; both retry until cancelled."""
        await self.open_store_until_ready()
        await self.flush_worker()

    def export_metrics(self) -> None:
        metrics.bind(metrics.QUEUE_DEPTH, lambda: self.queue.depth)
        metrics.bind(metrics.QUEUE_BYTES, lambda: self.queue.pending_bytes)
        metrics.bind(metrics.QUEUE_OLDEST_AGE, self.queue.oldest_age_seconds)
        metrics.bind(metrics.STORE_UP, lambda: self.store_ok)

    async def flush_worker(self) -> None:
        """Move queued comments to the store until cancelled; never gives up, never drops."""
        backoff = Backoff(cap=self._retry_max)
        while True:
            await self.queue.rows.has_unstored.wait()
            batch = self.queue.rows.unstored(self._flush_batch)
            comments = [r for r in batch if isinstance(r, Comment)]
            deletions = [r for r in batch if isinstance(r, Deletion)]
            try:
                # Comments first: a deletion in this batch may take down one of them.
                collisions = await self.store.insert_many(comments) if comments else []
                if deletions:
                    await self.store.delete_many(deletions)
            except Exception as e:  # CancelledError is not an Exception: it still stops us
                self.flush_errors += 1
                metrics.FLUSH_ERRORS.inc()
                self._mark_store(False, e)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self._mark_store(True)
            if collisions:
                self._report_collisions(collisions)
            self.flushed += len(batch)
            metrics.FLUSHED.inc(len(batch))
            # A mark the queue cannot write is its own to retry (queue.py, _repair_worker); at
            # worst the rows are flushed again after a restart, which insert_many makes harmless.
            await self.queue.mark_stored([c.id for c in batch])

    def _report_collisions(self, collisions: list[Comment]) -> None:
        """Acknowledged comments the store could not keep: their id was already another
        comment's (two instances minted one id). Never silent: counted, shown in /readyz, and
        each logged whole, so a human can restore it."""
        self.id_collisions += len(collisions)
        metrics.ID_COLLISIONS.inc(len(collisions))
        for c in collisions:
            log.error(
                "store: comment id %d is already another comment's; not stored: %s",
                c.id,
                c.encode().decode(),
            )

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


def _in_window(comment_id: int, query: PageQuery) -> bool:
    if query.after is not None:
        return comment_id > query.after
    return query.before is None or comment_id < query.before


@asynccontextmanager
async def run_durable_log(
    settings: Settings, stop_deadline: Callable[[], float | None]
) -> AsyncIterator[DurableLog]:
    """The queue open (its unflushed comments replayed), the store opened if it answers, the
    flusher running; on the way out, flush until `stop_deadline()` (a loop time: what is left
    of server.shutdown_timeout) and close. What is not flushed by then stays queued on disk."""
    queue = WriteAheadQueue(settings.queue.dir, settings.queue.max_bytes)
    await queue.open()
    store = open_store(settings.store.url)
    durable = DurableLog(queue, store, settings.queue.flush_batch, settings.queue.retry_max)
    # If the database is down, start anyway: the queue takes comments and the flusher keeps
    # trying to open the store.
    await durable.try_open_store()
    durable.export_metrics()
    flusher = asyncio.create_task(durable.open_and_flush_worker(), name="flush-worker")
    log.info(
        "store: %s, queue: %s (%d unflushed)",
        redact_url(settings.store.url),
        settings.queue.dir,
        queue.depth,
    )
    try:
        yield durable
    finally:
        deadline = stop_deadline()
        loop = asyncio.get_running_loop()
        left = settings.server.shutdown_timeout if deadline is None else deadline - loop.time()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await queue.wait_empty()
        except TimeoutError:
            log.warning("shutdown: %d comments stay queued for the next start", queue.depth)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await queue.close()
        await store.close()
