"""The Redis broker: each post's stream lives on one Redis server (a *shard*), picked by a ring.

`Ring(redis.urls).node_for(post_id)` (ring.py) names the post's shard; every node computes the
same answer. Per shard this node keeps one `RedisShard` (shard.py): its Pub/Sub session and the
stream scripts. Appends are grouped by shard and pipelined; a shard that does not answer gets
None for its entries (they stay in the outbox) without holding up the others.

Ring changes (`reconfigure`, on SIGHUP): a post whose shard changed starts a new stream there (a
new epoch: the old shard's history is not moved). Its subscription moves at once and the hub
checks its position, so its viewers are told to reload once (`reset`). Shards no longer listed
are stopped. In the background, the sweeper (sweep.py) deletes what each shard no longer owns,
and until it is done guards the moved posts: a post that comes back to a shard it left never
continues the position it had there. Nodes should reload together: a comment appended by a
node still on the old list reaches the moved post's viewers on the others by their reload, not
live.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence

from redis.asyncio import Redis

from livecomments import metrics
from livecomments.config import HistorySettings, RedisSettings
from livecomments.live.broker import (
    Entry,
    History,
    Position,
    ReconnectCallback,
    StreamListener,
)
from livecomments.live.redis.client import connection_kwargs
from livecomments.live.redis.ring import Ring
from livecomments.live.redis.shard import RedisShard
from livecomments.live.redis.sweep import RingSweeper
from livecomments.urls import redact_url

log = logging.getLogger(__name__)


class RedisBroker:
    """The `Broker` (and `Reconfigurable`) over one or more Redis shards."""

    def __init__(self, settings: RedisSettings, history: HistorySettings) -> None:
        if not settings.urls:
            raise ValueError("redis.urls: the Redis broker needs at least one server")
        self._settings = settings
        self._history = history
        # Random per start: names this node's connections and probe channel.
        self.node_id = secrets.token_hex(8)
        self._ring = Ring(settings.urls)
        self.sweeper = RingSweeper(self._connect_sweep, lambda: self._settings.timeout)
        self._shards: dict[str, RedisShard] = {url: self._new_shard(url) for url in self._ring.urls}
        self._listener: StreamListener | None = None
        self._on_reconnect: list[ReconnectCallback] = []
        self._reconfiguring = asyncio.Lock()

    def _new_shard(self, url: str) -> RedisShard:
        name = redact_url(url)
        return RedisShard(
            url,
            self._settings,
            self._history,
            self.node_id,
            owns=lambda post: self._ring.node_for(post) == url,
            stale_after=lambda post: self.sweeper.max_age_ms(post, name),
        )

    def _connect_sweep(self, url: str) -> Redis:
        return Redis.from_url(url, **connection_kwargs(f"livecomments:{self.node_id}:sweep"))

    def _shard(self, post_id: str) -> RedisShard:
        return self._shards[self._ring.node_for(post_id)]

    # -- Broker --------------------------------------------------------------------------------

    async def start(self, listener: StreamListener) -> None:
        """Start every shard's session; does not wait for Redis (a node starts without it)."""
        self._listener = listener
        for shard in self._shards.values():
            shard.start(listener, self._on_reconnect)

    async def stop(self) -> None:
        await self.sweeper.stop()
        await asyncio.gather(*(shard.stop() for shard in self._shards.values()))

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        self._on_reconnect.append(callback)

    async def subscribe(self, post_id: str) -> None:
        """Returns once the post's shard confirmed; raises `ShardUnavailable` otherwise."""
        while True:
            shard = self._shard(post_id)
            await shard.pubsub.subscribe(post_id)
            if shard is self._shard(post_id):
                return
            # The ring changed while we waited: follow the post where it lives now.
            shard.pubsub.unsubscribe(post_id)

    async def unsubscribe(self, post_id: str) -> None:
        for shard in self._shards.values():
            shard.pubsub.unsubscribe(post_id)

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        by_shard: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            by_shard.setdefault(self._ring.node_for(entry.post_id), []).append(i)
        results: list[Position | None] = [None] * len(entries)
        urls = list(by_shard)
        answers = await asyncio.gather(
            *(self._shards[url].append([entries[i] for i in by_shard[url]]) for url in urls)
        )
        for url, positions in zip(urls, answers, strict=True):
            for i, position in zip(by_shard[url], positions, strict=True):
                results[i] = position
        return results

    async def history(self, post_id: str, since: Position | None = None, limit: int = 0) -> History:
        return await self._shard(post_id).history(post_id, since, limit)

    async def position(self, post_id: str) -> Position:
        return (await self._shard(post_id).history(post_id, None, 1)).position

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        return await self._shard(post_id).recent(post_id, after, before, limit)

    async def taken_down(self, post_id: str) -> set[int]:
        return await self._shard(post_id).taken_down(post_id)

    def status(self) -> dict[str, object]:
        shards = [shard.status() for shard in self._shards.values()]
        healthy = all(shard.connected for shard in self._shards.values())
        return {
            "status": "ok" if healthy else "degraded",
            "kind": "redis",
            "node_id": self.node_id,
            "nodes": shards,
            "ring_sweep": self.sweeper.status(),
        }

    # -- Reconfigurable ------------------------------------------------------------------------

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP: apply the new settings; if the server list changed, move the posts."""
        if not settings.urls:
            raise ValueError("redis.urls: switching from Redis to one instance needs a restart")
        new_ring = Ring(settings.urls)
        async with self._reconfiguring:
            self._settings = settings
            for shard in self._shards.values():
                shard.configure(settings)
            if set(new_ring.urls) != set(self._ring.urls):
                await self._move_to(new_ring)

    async def _move_to(self, new_ring: Ring) -> None:
        assert self._listener is not None
        old_ring, self._ring = self._ring, new_ring
        # In the same step as the switch: the guard holds from the first request on the new
        # ring. The sweep runs in the background.
        self.sweeper.ring_changed(old_ring, new_ring)
        for url in new_ring.urls:
            if url not in self._shards:
                self._shards[url] = self._new_shard(url)
                self._shards[url].start(self._listener, self._on_reconnect)
        moved = [
            p for p in self._listener.local_posts() if old_ring.node_for(p) != new_ring.node_for(p)
        ]
        for shard in self._shards.values():
            shard.pubsub.prune()
        results = await asyncio.gather(
            *(self._shard(p).pubsub.subscribe(p) for p in moved), return_exceptions=True
        )
        failed = sum(1 for r in results if isinstance(r, BaseException))
        metrics.REDIS_RING_MOVES.inc(len(moved))
        log.info(
            "redis: ring is now %s; %d local posts moved (%d wait for their shard)",
            [redact_url(u) for u in new_ring.urls],
            len(moved),
            failed,
        )
        # A new shard is a new stream: the hub finds the new epoch and its viewers reload once.
        self._listener.on_stream_gap(moved)
        retired = [url for url in self._shards if url not in new_ring.urls]
        for url in retired:
            # Popped once stopped: a stop cancelled halfway is still found by `stop()`.
            await self._shards[url].stop()
            del self._shards[url]
        if retired:
            log.info("redis: retired %s", [redact_url(u) for u in retired])

    # -- for tests and status ------------------------------------------------------------------

    @property
    def ring(self) -> Ring:
        return self._ring

    def node(self, url: str) -> RedisShard:
        return self._shards[url]
