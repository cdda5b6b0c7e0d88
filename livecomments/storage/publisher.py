"""The outbox's other duty: every queued comment reaches its post's stream, once it can.

The write-ahead queue is a durable outbox: a comment leaves it only when it is both in the
database (log.py's flusher) and appended to its post's stream (here). So a comment acknowledged
just before a kill -9 is appended at the next start; one whose shard is down is appended when
it is back, in order, and meanwhile shown to this node's viewers with a null offset; the stream's
dedupe by comment id makes a repeated append harmless.

One more case: a comment appended, but not in the database yet, whose stream then lost its
history (its Redis server restarted empty: a new epoch). Nobody could find it: GET would not
(the database lacks it), and recovery would not (the history is gone). `verify_appended` finds
such comments (their post's epoch is not the one they were appended in) and appends them again,
into the new epoch. It runs at start-up and whenever a shard is reachable again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from livecomments import metrics
from livecomments.backoff import Backoff
from livecomments.model.deletion import Deletion, is_deletion
from livecomments.model.stream import COMMENT, DELETE, Entry
from livecomments.storage.base import Streams
from livecomments.storage.queue import WriteAheadQueue

log = logging.getLogger(__name__)

# Comments per append call (the broker pipelines them per shard).
APPEND_BATCH = 512
# Seconds a comment whose shard did not answer waits before it is tried again (at most; a
# shard that comes back wakes them at once).
PARK_CAP = 2.0


class StreamPublisher:
    def __init__(
        self,
        queue: WriteAheadQueue,
        streams: Streams,
        on_unappended: Callable[[str, bytes], None],
    ) -> None:
        self._queue = queue
        self._streams = streams
        self._on_unappended = on_unappended
        # Post -> loop time its comments may be tried again. By post, not by comment: a later
        # comment of the post (its deletion, say) must never be appended before an earlier one.
        self._parked: dict[str, float] = {}
        self._announced: set[int] = set()  # shown with a null offset already
        self._wake = asyncio.Event()
        self.appended = 0
        self.append_failures = 0

    def unpark(self) -> None:
        """A shard is reachable again: try every waiting comment now."""
        self._parked.clear()
        self._wake.set()

    async def worker(self) -> None:
        """Append queued comments in id order until cancelled; never gives up, never drops."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(cap=PARK_CAP)
        rows = self._queue.rows
        while True:
            await rows.has_unappended.wait()
            now = loop.time()
            waiting = {post for post, until in self._parked.items() if until > now}
            batch = rows.unappended(APPEND_BATCH, skip_posts=waiting)
            if not batch:  # everything owed waits for its shard
                self._wake.clear()
                wake_at = min(self._parked.values(), default=now + PARK_CAP)
                try:
                    async with asyncio.timeout(max(0.0, wake_at - now)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            entries = [_entry(i, post_id, payload) for i, post_id, payload in batch]
            try:
                positions = await self._streams.append(entries)
            except Exception:  # a bug in a broker must not stop the outbox: park, go on
                log.exception("outbox: append of %d comments failed", len(entries))
                positions = [None] * len(entries)
            epochs = {e.comment_id: p.epoch for e, p in zip(entries, positions, strict=True) if p}
            if epochs:
                backoff.reset()
                self.appended += len(epochs)
                for entry in entries:
                    if entry.comment_id in epochs:
                        self._parked.pop(entry.post_id, None)
                        self._announced.discard(entry.comment_id)
                await self._queue.mark_appended(epochs)
            failed = [e for e, p in zip(entries, positions, strict=True) if p is None]
            if failed:
                self._park(failed, loop.time() + backoff.next())

    def _park(self, entries: list[Entry], until: float) -> None:
        self.append_failures += len(entries)
        metrics.OUTBOX_APPEND_FAILURES.inc(len(entries))
        for entry in entries:
            self._parked[entry.post_id] = until
            if entry.comment_id not in self._announced and entry.kind == COMMENT:
                self._announced.add(entry.comment_id)
                self._on_unappended(entry.post_id, entry.body)

    async def verify_appended(self) -> None:
        """Append again what was appended in an epoch that has since ended, and is not in the
        database yet (see the module docstring)."""
        owed = dict(self._queue.rows.appended_unstored)
        stale: list[int] = []
        for post_id in {post for post, _ in owed.values()}:
            try:
                position = await self._streams.position(post_id)
            except ConnectionError as e:
                log.debug("outbox: cannot verify %s yet: %s", post_id, e)
                continue
            stale += [
                i for i, (p, epoch) in owed.items() if p == post_id and epoch != position.epoch
            ]
        if stale:
            log.warning(
                "outbox: %d comments lost their stream's epoch; appending again", len(stale)
            )
            await self._queue.mark_unappended(stale)

    def status(self) -> dict[str, object]:
        return {
            "unappended": self._queue.rows.unappended_count(),
            "waiting_for_shard": len(self._parked),  # posts
            "appended": self.appended,
            "append_failures": self.append_failures,
        }


def _entry(record_id: int, post_id: str, payload: bytes) -> Entry:
    """A queued comment or deletion, as its stream takes it (a deletion's body: the deleted
    comment's id)."""
    if is_deletion(payload):
        return Entry(record_id, post_id, DELETE, b"%d" % Deletion.decode(payload).target)
    return Entry(record_id, post_id, COMMENT, payload)
