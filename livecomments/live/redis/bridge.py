"""The Redis bridge: live traffic between nodes over Redis Pub/Sub, sharded by a ring.

Each post's channel lives on one Redis server (a *shard*), `Ring(redis.urls).node_for(post_id)`
(ring.py); every node computes the same answer. Per shard this node keeps one `RedisShard`
(shard.py): its Pub/Sub session (pubsub.py), its publisher (publisher.py), and the wire format
between them (envelope.py). Channels: `livecomments:post:<post_id>` and
`livecomments:probe:<node_id>`.

Ring changes (`reconfigure`, on SIGHUP): the posts whose shard changed are subscribed on their
new shard, then their subscribers get `resync`. Nodes do not reload at the same instant, so for
`RING_CHANGE_GRACE` seconds a moved post stays subscribed on its old shard too (publishes go to
the new shard only; each publish reaches one shard, so nothing is received twice): a node still
on the old list keeps reaching us, and one that reloads after us resyncs its own subscribers when
it does. Shards removed from the list keep running until the grace ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable

from livecomments import metrics
from livecomments.config import RedisSettings
from livecomments.live.bridge import BridgeUnavailable, HubListener
from livecomments.live.redis.envelope import ID_LEN, pack_event
from livecomments.live.redis.pubsub import post_of
from livecomments.live.redis.ring import Ring
from livecomments.live.redis.shard import RedisShard
from livecomments.model.ids import wall_clock_ms
from livecomments.urls import redact_url

log = logging.getLogger(__name__)

# Seconds a moved post stays subscribed on its old shard after a ring change.
RING_CHANGE_GRACE = 60.0


class RedisBridge:
    """The `Bridge` (and `Reconfigurable`) over one or more Redis shards (module docstring)."""

    def __init__(
        self, settings: RedisSettings, *, ring_change_grace: float = RING_CHANGE_GRACE
    ) -> None:
        if not settings.urls:
            raise ValueError("redis.urls: the Redis bridge needs at least one server")
        self._settings = settings
        self._grace = ring_change_grace
        # Random per start: a restarted instance is a new origin (its sequence restarts).
        self.node_id = secrets.token_hex(ID_LEN // 2).encode()
        self._ring = Ring(settings.urls)
        self._previous: Ring | None = None  # the ring before a change, during its grace
        self._generation = 0  # bumped by every ring change
        self._seq = 0  # of this bridge's envelopes, over all servers
        self._nodes: dict[str, RedisShard] = {url: self._new_node(url) for url in self._ring.urls}
        self._listener: HubListener | None = None
        self._reconfiguring = asyncio.Lock()
        self._grace_task: asyncio.Task[None] | None = None

    def _new_node(self, url: str) -> RedisShard:
        return RedisShard(
            url,
            self._settings,
            self.node_id,
            owns=lambda post: url in self._targets(post),
            next_seq=self._next_seq,
        )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _targets(self, post_id: str) -> list[str]:
        """Servers that must carry `post_id` for us: its own, and during a grace its old one."""
        primary = self._ring.node_for(post_id)
        if self._previous is not None:
            old = self._previous.node_for(post_id)
            if old != primary:
                return [primary, old]
        return [primary]

    # -- Bridge --------------------------------------------------------------------------------

    async def start(self, listener: HubListener) -> None:
        """Start every node's workers; does not wait for Redis (an instance starts without it)."""
        self._listener = listener
        for node in self._nodes.values():
            node.start(listener)

    async def stop(self) -> None:
        if self._grace_task is not None:
            self._grace_task.cancel()
            await asyncio.gather(self._grace_task, return_exceptions=True)
        await asyncio.gather(*(n.stop(self._settings.timeout) for n in self._nodes.values()))

    async def subscribe(self, post_id: str) -> None:
        """Returns once the post's server confirmed; raises `ShardUnavailable` otherwise."""
        done: set[str] = set()
        try:
            while True:
                generation = self._generation
                primary = self._ring.node_for(post_id)
                targets = [url for url in self._targets(post_id) if url not in done]
                if not targets:
                    return
                results = await asyncio.gather(
                    *(self._nodes[url].pubsub.subscribe(post_id) for url in targets),
                    return_exceptions=True,
                )
                done.update(targets)
                for url, result in zip(targets, results, strict=True):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    if isinstance(result, BaseException):
                        if url == primary:
                            raise result
                        # The old server during a ring change: a courtesy, not a requirement.
                        log.info("redis: %s: transitional subscribe failed: %s", post_id, result)
                if generation == self._generation:
                    return
                # The ring changed while we waited: follow the post where it lives now too.
        except BridgeUnavailable:
            # The hub keeps the post: the nodes keep it wanted and follow it when they can.
            raise
        except BaseException:
            # The hub rolls the post back; nothing should stay subscribed on its behalf.
            for url in done:
                if url in self._nodes:
                    self._nodes[url].pubsub.unsubscribe(post_id)
            raise

    async def unsubscribe(self, post_id: str) -> None:
        for node in self._nodes.values():
            node.pubsub.unsubscribe(post_id)

    def publish(self, post_id: str, payload: bytes) -> None:
        try:
            shard = self._nodes[self._ring.node_for(post_id)]
            shard.publish(post_id, pack_event(self.node_id, self._next_seq(), payload))
        except Exception:
            # The comment is durable and delivered here; a bug must not fail the POST.
            log.exception("redis: publish for post %s failed", post_id)

    def status(self) -> dict[str, object]:
        nodes = []
        healthy = True
        for url, node in self._nodes.items():
            active = url in self._ring.urls
            nodes.append({**node.status(), "role": "active" if active else "retiring"})
            healthy = healthy and (node.connected or not active)
        return {
            "status": "ok" if healthy else "degraded",
            "kind": "redis",
            "node_id": self.node_id.decode(),
            "ring_change_in_progress": self._previous is not None,
            "nodes": nodes,
        }

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP: apply the new settings; if the server list changed, move the posts."""
        if not settings.urls:
            raise ValueError("redis.urls: switching from Redis to one instance needs a restart")
        new_ring = Ring(settings.urls)
        async with self._reconfiguring:
            self._settings = settings
            for node in self._nodes.values():
                node.configure(settings)
            if set(new_ring.urls) == set(self._ring.urls):
                return
            if self._grace_task is not None:
                # A second change inside the grace of the first ends the first grace now.
                self._grace_task.cancel()
                await asyncio.gather(self._grace_task, return_exceptions=True)
                await self._end_grace()
            await self._move_to(new_ring)

    async def _move_to(self, new_ring: Ring) -> None:
        assert self._listener is not None
        old_ring = self._ring
        added = [url for url in new_ring.urls if url not in self._nodes]
        # Instances reload within RING_CHANGE_GRACE of each other, and until one has, what it
        # publishes for a moved post may go where we no longer listen: resyncs reach back that far.
        gap_start_ms = wall_clock_ms() - int(self._grace * 1000)
        for url in added:
            self._nodes[url] = self._new_node(url)
            self._nodes[url].pubsub.created_ms = gap_start_ms
            self._nodes[url].start(self._listener)
        self._previous, self._ring = old_ring, new_ring
        self._generation += 1
        moved = [
            p for p in self._listener.local_posts() if old_ring.node_for(p) != new_ring.node_for(p)
        ]
        results = await asyncio.gather(
            *(self._nodes[new_ring.node_for(p)].pubsub.subscribe(p) for p in moved),
            return_exceptions=True,
        )
        # The move has a gap (other instances reload at other times), so clients must catch up.
        # A new server's first session, and any server's reconnect, resyncs what it restores
        # from local_posts(); here only the posts that joined a server already connected.
        resync = [
            post
            for post, result in zip(moved, results, strict=True)
            if not isinstance(result, BaseException) and new_ring.node_for(post) not in added
        ]
        failed = sum(1 for r in results if isinstance(r, BaseException))
        metrics.REDIS_RING_MOVES.inc(len(moved))
        log.info(
            "redis: ring is now %s; %d local posts moved (%d wait for their server to connect)",
            [redact_url(u) for u in new_ring.urls],
            len(moved),
            failed,
        )
        self._listener.resync(resync, gap_start_ms)
        self._grace_task = asyncio.create_task(self._grace_worker(), name="redis-ring-grace")

    async def _grace_worker(self) -> None:
        await asyncio.sleep(self._grace)
        async with self._reconfiguring:
            await self._end_grace()

    async def _end_grace(self) -> None:
        """Stop following moved posts on their old servers; stop servers no longer listed."""
        self._previous = None
        self._generation += 1
        self._grace_task = None
        retired = [url for url in self._nodes if url not in self._ring.urls]
        for node in self._nodes.values():
            node.pubsub.prune()
        for url in retired:
            # Popped only once stopped: if we are cancelled meanwhile, stop() finishes it.
            await self._nodes[url].stop(self._settings.timeout)
            del self._nodes[url]
        if retired:
            log.info("redis: ring change complete; retired %s", [redact_url(u) for u in retired])

    # -- for tests and status ------------------------------------------------------------------

    @property
    def ring(self) -> Ring:
        return self._ring

    def node(self, url: str) -> RedisShard:
        return self._nodes[url]

    def posts_on(self, url: str) -> Iterable[str]:
        return (post_of(c) for c in self._nodes[url].pubsub.post_channels())
