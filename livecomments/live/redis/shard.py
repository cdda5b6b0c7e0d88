"""One Redis server (a shard) as this node sees it: what it hears there and what it sends there.

A `RedisShard` owns two connections to its server: the Pub/Sub session (pubsub.py: the posts
followed there, the reader, the liveness probe) and an ordinary one for PUBLISH (publisher.py).
Between them it owns the wire format (envelope.py): what the session hears is unpacked here, its
own echo and retried repeats dropped, events handed to the hub, LOST notices turned into gaps.

Words: a *shard* is one Redis server; a *node* is one livecomments process (its random node id
tags everything it publishes, new at every start).

redis-py choices, deliberate: `protocol=2` (RESP2) on every connection. Pub/Sub replies are
then plain arrays; we need nothing from RESP3, and redis-py's RESP3 push path builds a debug log
string for every message. `socket_timeout` and `socket_connect_timeout` are None (redis-py 8
defaults to 5 s): the Pub/Sub read must block indefinitely on a quiet channel (the probe, not a
socket timeout, decides it is dead), and every other operation is bounded by our own
`asyncio.timeout(redis.timeout)`, which a reload changes at once. Retries are off
(`Retry(NoBackoff(), 0)`): a retry we do not see would hide a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from livecomments import metrics
from livecomments.config import RedisSettings
from livecomments.live.bridge import HubListener
from livecomments.live.redis import envelope
from livecomments.live.redis.publisher import Publisher
from livecomments.live.redis.pubsub import CHANNEL_PREFIX, PubSubSession, ShardUnavailable
from livecomments.urls import redact_url

log = logging.getLogger(__name__)


def connection_kwargs(name: str) -> dict[str, Any]:
    """See the module docstring: RESP2, no socket timeouts (ours apply), no hidden retries."""
    return {
        "protocol": 2,
        "socket_timeout": None,
        "socket_connect_timeout": None,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": name,
    }


class RedisShard:
    def __init__(
        self,
        url: str,
        settings: RedisSettings,
        node_id: bytes,
        *,
        owns: Callable[[str], bool],
        next_seq: Callable[[], int],
    ) -> None:
        self.url = url
        self.name = redact_url(url)
        self.settings = settings
        self._node_id = node_id
        self._listener: HubListener | None = None
        self._sequences = envelope.OriginSequences()
        self._pool = ConnectionPool.from_url(
            url, **connection_kwargs(f"livecomments:{node_id.decode()}:sub")
        )
        self._client = Redis.from_url(
            url, **connection_kwargs(f"livecomments:{node_id.decode()}:pub")
        )
        self.pubsub = PubSubSession(
            self.name,
            settings,
            node_id.decode(),
            self._pool,
            self._client,
            owns=owns,
            on_message=self._on_message,
            on_gap=self._report_gap,
        )
        self.publisher = Publisher(self.name, settings, self._client, node_id, next_seq)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, listener: HubListener) -> None:
        self._listener = listener
        self._tasks = [
            asyncio.create_task(
                self.pubsub.worker(listener), name=f"redis-pubsub-worker {self.name}"
            ),
            asyncio.create_task(self.publisher.worker(), name=f"redis-publish-worker {self.name}"),
        ]

    async def stop(self, drain: float) -> None:
        """Give buffered publishes up to `drain` seconds, then end every task and connection."""
        if self._tasks:
            await self.publisher.drain(drain)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.pubsub.fail_waiters(ShardUnavailable(f"redis {self.name}: bridge stopped"))
        await self._client.aclose()
        await self._pool.aclose()

    def configure(self, settings: RedisSettings) -> None:
        """A reload: probe_interval, publish_retry and timeout apply from their next use."""
        self.settings = settings
        self.pubsub.settings = settings
        self.publisher.configure(settings)

    # -- what the session hears ----------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        message = envelope.unpack(data)
        if message is None:
            metrics.REDIS_DISCARDED.inc()
            log.warning("redis %s: dropped a malformed message on %r", self.name, channel[:100])
            return
        if message.origin == self._node_id:
            return  # our own publish: the hub delivered it locally already
        if not self._sequences.is_new(message.origin, message.seq):
            metrics.REDIS_DISCARDED.inc()  # a retried batch: its first attempt reached Redis
            return
        post_id = channel[len(CHANNEL_PREFIX) :].decode()
        assert self._listener is not None
        try:
            if message.kind == envelope.LOST:
                self._report_gap([post_id], message.lost_since_ms)
            else:
                metrics.REDIS_RECEIVED.inc()
                self._listener.deliver(post_id, message.body)
        except Exception:
            # A bug downstream must not stop every other post's traffic: log it and go on.
            log.exception("redis %s: delivering to post %s failed", self.name, post_id)

    def _report_gap(self, post_ids: Iterable[str], since_ms: int) -> None:
        """The one way a gap reaches the hub: these posts may have missed what was published
        since `since_ms` (a lost session, a late subscribe, a dropped publish elsewhere)."""
        if self._listener is not None:
            self._listener.resync(post_ids, since_ms)

    # -- what it sends -------------------------------------------------------------------------

    def publish(self, post_id: str, packed: bytes) -> None:
        self.publisher.enqueue(CHANNEL_PREFIX + post_id, packed)

    # -- status --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.pubsub.connected

    def status(self) -> dict[str, object]:
        probe_age = None
        if self.pubsub.last_probe_ok is not None:
            probe_age = round(time.monotonic() - self.pubsub.last_probe_ok, 3)
        return {
            "url": self.name,
            "state": self.pubsub.state,
            "connected": self.pubsub.connected,
            "channels": len(self.pubsub.post_channels()),
            "last_error": self.pubsub.last_error or self.publisher.last_error,
            "reconnects": self.pubsub.reconnects,
            "probe_failures": self.pubsub.probe_failures,
            "dropped_publishes": self.publisher.dropped,
            "lost_notices_pending": self.publisher.lost_pending,
            "lost_notices_dropped": self.publisher.lost_notices_dropped,
            "published": self.publisher.published,
            "buffered": self.publisher.buffered,
            "last_probe_age": probe_age,
        }
