"""The hub: which local sockets watch which post, and each post's stream delivered to them.

Guarantees:

* Every viewer of a post sees its publications in stream order, each once, with its offset
  (stream.py): the hub delivers offset N only after N - 1. A publication that arrives early
  (Pub/Sub lost some, a session came back) waits while the hub fills the gap from the broker's
  history; a gap the history no longer holds, or another epoch, ends in `reset` to the viewers.
* A viewer that subscribes with its last position is replayed what it missed, then joins the
  live stream with nothing between (`recovered: true`), or is told plainly to reload
  (`recovered: false`).
* Fan-out encodes an event once and offers the same bytes to every socket without awaiting
  (conn.py: each socket has a bounded outbox); a slow socket is cut, not waited for.
* Per post, the first local subscriber makes the broker follow the post and the last one stops
  it. Those transitions await the broker, so they are serialised by a per-post lock; a failed
  follow is rolled back, and the last unsubscribe re-checks, under the lock, that the post is
  still empty. Delivery never takes the lock.
* A broker that is down (`BrokerUnavailable`) does not cost a subscriber: it is kept, told it has
  no position yet, and given one (`reset`) when the broker is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

from livecomments import metrics
from livecomments.config import HistorySettings, LimitsSettings, RedisSettings
from livecomments.live import events
from livecomments.live.broker import (
    Broker,
    BrokerUnavailable,
    Position,
    Publication,
    Reconfigurable,
)
from livecomments.live.conn import text_frame
from livecomments.live.stream import Joiner, PostStream, Subscriber

log = logging.getLogger(__name__)

# History reads in flight at once (a session that comes back checks every post it follows).
MAX_FILLS = 64


class TooManyPosts(Exception):
    """This instance already follows its configured maximum of posts."""


class _KeyedLocks:
    """One asyncio.Lock per key, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Hub:
    def __init__(
        self,
        broker: Broker,
        max_posts: int = LimitsSettings.posts_per_instance,
        replay_limit: int = HistorySettings.size,
    ) -> None:
        self.broker = broker
        self._max_posts = max_posts
        self._replay_limit = replay_limit
        self._streams: dict[str, PostStream] = {}
        self._locks = _KeyedLocks()
        self._fills = asyncio.Semaphore(MAX_FILLS)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.broker.start(self)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.stop()

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP: a new list of Redis servers, if the broker can take one at runtime."""
        if isinstance(self.broker, Reconfigurable):
            await self.broker.reconfigure(settings)
        elif settings.urls:
            raise ValueError("redis.urls: switching from one instance to Redis needs a restart")

    # -- membership ----------------------------------------------------------------------------

    async def subscribe(self, sub: Subscriber, post_id: str, since: Position | None) -> None:
        """Add `sub` to the post's viewers and send it `subscribed`; if `since` is a position
        the stream can replay from, the publications after it follow first."""
        stream = await self._follow(post_id)
        stream.subs.discard(sub)  # a resubscribe: recover from `since`
        for joiner in [j for j in stream.joiners if j.sub is sub]:
            stream.joiners.discard(joiner)
        position = stream.position
        if position is None or since is None or since.epoch != position.epoch:
            if since is not None:
                metrics.RECOVERIES.labels("false").inc()
            self._answer(stream, sub, recovered=False)
        elif since.offset >= position.offset:
            self._answer(stream, sub, recovered=since.offset == position.offset)
        else:
            await self._replay(stream, Joiner(sub, since))

    def _answer(self, stream: PostStream, sub: Subscriber, *, recovered: bool) -> None:
        sub.offer(text_frame(events.subscribed(stream.post_id, stream.position, recovered)))
        stream.subs.add(sub)

    async def _replay(self, stream: PostStream, joiner: Joiner) -> None:
        stream.joiners.add(joiner)
        try:
            history = await self.broker.history(stream.post_id, joiner.since, self._replay_limit)
            publications = history.publications if history.complete else None
        except BrokerUnavailable:
            publications = None
        if joiner in stream.joiners and self._streams.get(stream.post_id) is stream:
            recovered = stream.finish_join(joiner, publications)
            metrics.RECOVERIES.labels(str(recovered).lower()).inc()

    async def _follow(self, post_id: str) -> PostStream:
        """The post's stream, followed by the broker (or to be, once it is back)."""
        stream = self._streams.get(post_id)
        if stream is not None and stream.followed and stream.position is not None:
            return stream
        # Not followed yet, or its first fill (its position) is still under way: wait for the
        # lock, so a joiner meanwhile recovers instead of being told to reload for nothing.
        async with self._locks.hold(post_id):
            stream = self._streams.setdefault(post_id, PostStream(post_id))
            if stream.followed:
                return stream
            try:
                if len(self._streams) > self._max_posts:
                    raise TooManyPosts(f"this instance follows {self._max_posts} posts")
                await self.broker.subscribe(post_id)
            except BrokerUnavailable as e:
                # Keep it: the broker follows it once back and calls on_stream_gap.
                log.debug("hub: following %s once the broker is back: %s", post_id, e)
            except BaseException:
                if stream.empty:  # roll back: nobody else joined while we waited
                    del self._streams[post_id]
                raise
            stream.followed = True
            await self._fill(stream)  # its position
            return stream

    async def unsubscribe(self, sub: Subscriber, post_id: str) -> None:
        stream = self._streams.get(post_id)
        if stream is None:
            return
        stream.subs.discard(sub)
        for joiner in [j for j in stream.joiners if j.sub is sub]:
            stream.joiners.discard(joiner)
        if not stream.empty:
            return
        async with self._locks.hold(post_id):
            if not stream.empty or self._streams.get(post_id) is not stream:
                return  # someone joined while we waited for the lock: keep following
            del self._streams[post_id]
            if stream.followed:
                stream.followed = False
                try:
                    await self.broker.unsubscribe(post_id)
                except Exception as e:
                    # The broker forgets the post either way: after a reconnect it follows
                    # only local_posts(), which no longer has it.
                    log.warning("hub: broker unsubscribe %s failed: %s", post_id, e)

    async def leave(self, sub: Subscriber, post_ids: Iterable[str]) -> None:
        """A socket closed: drop it from every post it watched."""
        for post_id in list(post_ids):
            await self.unsubscribe(sub, post_id)

    # -- the broker's side (StreamListener) ----------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        """The next publication is delivered at once; anything else waits for a fill."""
        stream = self._streams.get(publication.post_id)
        if stream is None:
            return
        position = stream.position
        if not stream.filling and position is not None and publication.epoch == position.epoch:
            if publication.offset <= position.offset:
                return  # a repeat: delivered already
            if publication.offset == position.offset + 1:
                started = time.perf_counter()
                metrics.DELIVERIES.inc(stream.deliver(publication))
                metrics.FANOUT_SECONDS.observe(time.perf_counter() - started)
                return
        stream.wait(publication)
        if stream.filling:
            stream.refill = True  # what _fill would do: no task per publication meanwhile
            return
        self._spawn(self._fill(stream))

    def on_stream_gap(self, post_ids: Iterable[str]) -> None:
        for post_id in post_ids:
            stream = self._streams.get(post_id)
            if stream is not None:
                self._spawn(self._fill(stream))

    def local_posts(self) -> Collection[str]:
        return [p for p, s in self._streams.items() if s.followed]

    # -- filling gaps --------------------------------------------------------------------------

    async def _fill(self, stream: PostStream) -> None:
        """Bring the stream to the broker's position: deliver what the history holds after
        ours, or reset. One fill per stream at a time; a request meanwhile runs it again."""
        if stream.filling:
            stream.refill = True
            return
        stream.filling = True
        try:
            while True:
                stream.refill = False
                try:
                    async with self._fills:
                        history = await self.broker.history(
                            stream.post_id, stream.position, self._replay_limit
                        )
                except BrokerUnavailable as e:
                    log.debug("hub: cannot fill %s yet: %s", stream.post_id, e)
                    return  # the broker calls on_stream_gap once it is back
                if self._streams.get(stream.post_id) is not stream:
                    return
                self._apply(stream, history.position, history.publications, history.complete)
                if not stream.refill:
                    return
        finally:
            stream.filling = False

    def _apply(
        self,
        stream: PostStream,
        position: Position,
        publications: list[Publication],
        complete: bool,
    ) -> None:
        ours = stream.position
        if ours is None:
            stream.position = position
            if stream.subs:  # they were told "no position": now they have one
                stream.reset(position)
        elif position.epoch != ours.epoch or not complete:
            metrics.RESETS.inc(len(stream.subs))
            stream.reset(position)
        else:
            for publication in publications:
                if publication.offset == stream.position.offset + 1:  # type: ignore[union-attr]
                    metrics.DELIVERIES.inc(stream.deliver(publication))
            assert stream.position is not None
            if stream.position.offset < position.offset:
                stream.refill = True  # more than one history read's worth was missing
        if not stream.drain_waiting():
            stream.refill = True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- from the outbox -----------------------------------------------------------------------

    def deliver_unsequenced(self, post_id: str, comment_json: bytes) -> None:
        """A comment whose shard is down: shown to this node's viewers with a null offset now,
        delivered with its offset once it is appended (viewers dedupe it by id)."""
        stream = self._streams.get(post_id)
        if stream is None:
            return
        frame = text_frame(events.comment(post_id, None, comment_json))
        for sub in stream.subs:
            sub.offer(frame)

    # -- for status ----------------------------------------------------------------------------

    def subscribers(self, post_id: str) -> int:
        stream = self._streams.get(post_id)
        return 0 if stream is None else len(stream.subs) + len(stream.joiners)

    @property
    def post_count(self) -> int:
        return len(self._streams)

    def status(self) -> dict[str, object]:
        return {
            "posts": len(self._streams),
            "locks_held": len(self._locks),
            "filling": sum(1 for s in self._streams.values() if s.filling),
        }

    def broker_status(self) -> dict[str, object]:
        return self.broker.status()
