"""Publishing to one Redis server: a bounded buffer, pipelined PUBLISHes, and no silent drop.

`enqueue()` never awaits and never raises: it appends to the buffer (`publish_buffer` events;
when full the oldest is dropped and counted). The worker drains it on an ordinary connection,
pipelining up to `PUBLISH_BATCH` PUBLISHes per round trip. A failed batch is retried (backoff) for
at most `publish_retry` seconds, then dropped, counted and logged. A dropped event is not lost in
silence: once the server takes publishes again, a LOST notice goes out per affected post (at most
`publish_buffer` posts remembered), and the other instances resync that post's subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from livecomments import metrics
from livecomments.backoff import Backoff
from livecomments.config import RedisSettings
from livecomments.live.redis.envelope import pack_lost_notice
from livecomments.model.ids import wall_clock_ms

log = logging.getLogger(__name__)

# PUBLISHes per pipelined round trip.
PUBLISH_BATCH = 512


class Publisher:
    def __init__(
        self,
        name: str,
        settings: RedisSettings,
        client: Redis,
        node_id: bytes,
        next_seq: Callable[[], int],
    ) -> None:
        self.name = name
        self.settings = settings
        self._client = client
        self._node_id = node_id
        self._next_seq = next_seq
        # (channel, envelope, when it was published: Unix ms, for the LOST notice's `since`)
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        # channel -> oldest dropped event's publish time, for posts that still need a LOST notice
        self._lost: dict[str, int] = {}
        self._outbox_ready = asyncio.Event()
        self._in_flight: list[tuple[str, bytes, int]] = []  # the batch being published
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0
        self.lost_notices_dropped = 0
        self.published = 0
        self.last_error: str | None = None

    def configure(self, settings: RedisSettings) -> None:
        """A reload: publish_buffer shrinks at once; publish_retry and timeout from next use."""
        self.settings = settings
        while len(self._outbox) > settings.publish_buffer:
            self._drop_oldest()

    async def drain(self, within: float) -> None:
        """Give what is buffered up to `within` seconds to be published (stopping)."""
        if not self._outbox:
            return
        try:
            async with asyncio.timeout(within):
                while self._outbox or not self._idle.is_set():
                    await self._idle.wait()
        except TimeoutError:
            log.warning(
                "redis %s: stopping with %d events unpublished", self.name, len(self._outbox)
            )

    def enqueue(self, channel: str, envelope: bytes) -> None:
        """Queue one PUBLISH; never awaits. When the buffer is full the oldest is dropped."""
        if len(self._outbox) >= self.settings.publish_buffer:
            self._drop_oldest()
            if self.dropped % 1000 == 1:
                log.warning(
                    "redis %s: publish buffer full, dropping the oldest events (%d so far)",
                    self.name,
                    self.dropped,
                )
        self._outbox.append((channel, envelope, wall_clock_ms()))
        self._outbox_ready.set()

    def _drop_oldest(self) -> None:
        channel, _, published_ms = self._outbox.popleft()
        self._drop(channel, published_ms)

    def _drop(self, channel: str, published_ms: int) -> None:
        """Count an event that will never be published; its post's subscribers get told."""
        self.dropped += 1
        metrics.REDIS_PUBLISH_DROPPED.inc()
        if channel in self._lost or len(self._lost) < self.settings.publish_buffer:
            self._lost[channel] = min(self._lost.get(channel, published_ms), published_ms)
        else:
            self.lost_notices_dropped += 1

    def _send_lost_notices(self) -> None:
        """After a successful batch: one LOST notice per post whose events we dropped, so that
        other instances resync its subscribers rather than miss comments in silence."""
        lost, self._lost = self._lost, {}
        for channel, since_ms in lost.items():
            self.enqueue(channel, pack_lost_notice(self._node_id, self._next_seq(), since_ms))

    async def worker(self) -> None:
        """Drain the buffer in pipelined batches; never ends (errors are logged, backed off)."""
        backoff = Backoff()
        while True:
            try:
                await self._publish_next_batch(backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis %s: publish worker failed; restarting", self.name)
                # The batch it had taken is not retried: count it and send LOST notices.
                for channel, _, published_ms in self._in_flight:
                    self._drop(channel, published_ms)
                self._in_flight = []
                self._idle.set()
                await asyncio.sleep(backoff.next())

    async def _publish_next_batch(self, backoff: Backoff) -> None:
        while not self._outbox:
            self._idle.set()
            self._outbox_ready.clear()
            await self._outbox_ready.wait()
        self._idle.clear()
        batch = [self._outbox.popleft() for _ in range(min(PUBLISH_BATCH, len(self._outbox)))]
        self._in_flight = batch
        loop = asyncio.get_running_loop()
        first_failure = loop.time()
        while True:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.timeout):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for channel, envelope, _ in batch:
                            pipe.publish(channel, envelope)
                        await pipe.execute()
            except (RedisError, OSError, TimeoutError) as e:
                self.last_error = f"publish: {type(e).__name__}: {e}"
                waited = loop.time() - first_failure
                if waited >= self.settings.publish_retry:
                    self._in_flight = []
                    for channel, _, published_ms in batch:
                        self._drop(channel, published_ms)
                    log.warning(
                        "redis %s: dropped %d events after retrying for %.1fs: %s",
                        self.name,
                        len(batch),
                        waited,
                        self.last_error,
                    )
                    return
                delay = backoff.next()
                await asyncio.sleep(min(delay, self.settings.publish_retry - waited + 0.001))
                continue
            metrics.REDIS_PUBLISH_SECONDS.observe(time.perf_counter() - started)
            backoff.reset()
            self._in_flight = []
            self.published += len(batch)
            metrics.REDIS_PUBLISHED.inc(len(batch))
            if self._lost:
                self._send_lost_notices()
            return

    @property
    def buffered(self) -> int:
        return len(self._outbox)

    @property
    def lost_pending(self) -> int:
        return len(self._lost)
