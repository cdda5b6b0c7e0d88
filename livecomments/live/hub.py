"""The hub: which local sockets watch which post, and the fan-out of each comment to them.

Guarantees:

* `publish()` encodes the event once and offers the same bytes to every local subscriber of the
  post, without awaiting (see conn.py: each socket has its own bounded outbox and writer), then
  hands the bytes to the bridge for the other instances. A slow socket is cut, not waited for.
* Per post, the first local subscriber subscribes the bridge and the last one unsubscribes it.
  Those transitions await the bridge, so they are serialised by a per-post lock; a failed bridge
  subscribe is rolled back (the caller gets the error) and the last unsubscribe re-checks, under
  the lock, that the post is still empty. Publishing and delivering never take the lock.
* A bridge that is down (`BridgeUnavailable`) does not cost a new subscriber its local delivery:
  the subscriber is kept, and the bridge follows the post and sends a resync when it is back.
* Ordering: comments accepted by this instance reach each local socket in the order they were
  accepted; remote comments in the order the bridge delivers them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

from livecomments import metrics
from livecomments.config import LimitsSettings, RedisSettings
from livecomments.live import events
from livecomments.live.bridge import Bridge, BridgeUnavailable, Reconfigurable
from livecomments.live.conn import text_frame

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What the hub needs of a socket (conn.Conn; tests use a fake)."""

    def offer(self, frame: bytes) -> bool:
        """Queue a complete WebSocket frame without awaiting; False if the socket dropped it."""


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
    def __init__(self, bridge: Bridge, max_posts: int = LimitsSettings.posts_per_instance) -> None:
        self._bridge = bridge
        self._max_posts = max_posts
        self._posts: dict[str, set[Subscriber]] = {}
        # Posts the bridge has been asked to follow (and follows, or will once it is back: see
        # BridgeUnavailable). A post is here only while it has, or is getting, local
        # subscribers; the fast path of subscribe() trusts it without taking the lock.
        self._bridged: set[str] = set()
        self._locks = _KeyedLocks()

    async def start(self) -> None:
        await self._bridge.start(self)

    async def stop(self) -> None:
        await self._bridge.stop()

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP: a new list of Redis servers, if the bridge can take one at runtime."""
        if isinstance(self._bridge, Reconfigurable):
            await self._bridge.reconfigure(settings)
        elif settings.urls:
            raise ValueError("redis.urls: switching from one instance to Redis needs a restart")

    # -- membership ----------------------------------------------------------------------------

    async def subscribe(self, sub: Subscriber, post_id: str) -> None:
        """Add `sub` to the post's audience; the bridge follows the post before this returns
        (or, while it is down, as soon as it is back)."""
        local = self._posts.get(post_id)
        if local is not None and post_id in self._bridged:
            local.add(sub)
            return
        async with self._locks.hold(post_id):
            local = self._posts.setdefault(post_id, set())
            if post_id not in self._bridged:
                try:
                    if len(self._bridged) >= self._max_posts:
                        raise TooManyPosts(f"this instance follows {self._max_posts} posts")
                    await self._bridge.subscribe(post_id)
                except BridgeUnavailable as e:
                    # Keep the subscriber: comments accepted here still reach it, and the bridge
                    # follows the post from local_posts() when it is back, with a resync.
                    log.debug("hub: following %s locally until the bridge is back: %s", post_id, e)
                except BaseException:
                    if not local:  # roll back: nobody else joined while we waited
                        del self._posts[post_id]
                    raise
                self._bridged.add(post_id)
            local.add(sub)

    async def unsubscribe(self, sub: Subscriber, post_id: str) -> None:
        local = self._posts.get(post_id)
        if local is None or sub not in local:
            return
        local.discard(sub)
        if local:
            return
        async with self._locks.hold(post_id):
            local = self._posts.get(post_id)
            if local:  # someone subscribed while we waited for the lock: keep following
                return
            if post_id in self._bridged:
                # Out of _bridged before the await, so a subscriber arriving meanwhile takes
                # the locked path and re-subscribes the bridge after us instead of trusting it.
                self._bridged.discard(post_id)
                try:
                    await self._bridge.unsubscribe(post_id)
                except Exception as e:
                    # The bridge forgets the post either way: after a reconnect it follows
                    # only local_posts(), which no longer has it.
                    log.warning("hub: bridge unsubscribe %s failed: %s", post_id, e)
            if post_id in self._posts and not self._posts[post_id]:
                del self._posts[post_id]

    async def leave(self, sub: Subscriber, post_ids: Iterable[str]) -> None:
        """A socket closed: drop it from every post it watched."""
        for post_id in list(post_ids):
            await self.unsubscribe(sub, post_id)

    # -- the hot path --------------------------------------------------------------------------

    def publish(self, post_id: str, comment_json: bytes) -> None:
        """Deliver an accepted comment (as `Comment.encode()` made it) here and to every other
        instance. Never awaits."""
        payload = events.comment(comment_json)
        self.deliver(post_id, payload)
        self._bridge.publish(post_id, payload)

    def deliver(self, post_id: str, payload: bytes) -> None:
        """Offer one encoded event to every local subscriber of the post: framed once, shared."""
        subs = self._posts.get(post_id)
        if not subs:
            return
        started = time.perf_counter()
        frame = text_frame(payload)
        delivered = 0
        for sub in subs:
            delivered += sub.offer(frame)
        metrics.DELIVERIES.inc(delivered)
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - started)

    def resync(self, post_ids: Iterable[str], since_ms: int) -> None:
        for post_id in post_ids:
            subs = self._posts.get(post_id)
            if subs:
                metrics.RESYNCS.inc(len(subs))
                self.deliver(post_id, events.resync(post_id, since_ms))

    # -- for the bridge and for status ---------------------------------------------------------

    def local_posts(self) -> Collection[str]:
        return self._bridged

    def subscribers(self, post_id: str) -> int:
        return len(self._posts.get(post_id, ()))

    @property
    def post_count(self) -> int:
        return len(self._posts)

    def status(self) -> dict[str, object]:
        return {"posts": len(self._posts), "locks_held": len(self._locks)}

    def bridge_status(self) -> dict[str, object]:
        return self._bridge.status()
