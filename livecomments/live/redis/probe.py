"""Is a Pub/Sub connection still hearing? Our own PUBLISH must come back in time.

A connection can be open and deaf: a stalled proxy, a paused or stopped server, a server that
restarted and forgot us. TCP says nothing of it. So every `probe_interval / 2` seconds the probe
PUBLISHes a sequence number on this node's own probe channel (which only this connection listens
to) and requires it back within `probe_interval / 2`; PUBLISH answering 0 receivers means the
server has forgotten us. Either failure raises `DeafConnection` and the session starts over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

PROBE_PREFIX = "livecomments:probe:"


class DeafConnection(ConnectionError):
    """The Pub/Sub connection did not echo a liveness probe in time."""


class Probe:
    def __init__(self, node_id: str, client: Redis, interval: Callable[[], float]) -> None:
        self.channel = PROBE_PREFIX + node_id
        self.channel_b = self.channel.encode()
        self._client = client  # an ordinary connection, not the one being probed
        self._interval = interval  # read each time: a reload changes it at once
        self._sent = 0
        self._seen = 0
        self._echo = asyncio.Event()
        self.last_ok: float | None = None  # monotonic time of the last echo

    async def worker(self) -> None:
        """Probe until a probe fails (raises DeafConnection) or the session cancels it."""
        while True:
            budget = self._interval() / 2
            await asyncio.sleep(budget)
            self._sent += 1
            seq = self._sent
            try:
                async with asyncio.timeout(budget):
                    receivers = await self._client.publish(self.channel, str(seq))
                    if receivers == 0:
                        raise DeafConnection("Redis lists no subscriber on our probe channel")
                    while self._seen < seq:
                        echo = self._echo
                        await echo.wait()
            except TimeoutError:
                raise DeafConnection(f"probe not echoed within {budget:g}s") from None
            except RedisError as e:
                raise DeafConnection(f"probe PUBLISH failed: {e}") from e
            self.last_ok = time.monotonic()

    def on_echo(self, data: bytes) -> None:
        """The reader heard a message on the probe channel."""
        try:
            seq = int(data)
        except ValueError:
            return
        if seq > self._seen:
            self._seen = seq
            echo, self._echo = self._echo, asyncio.Event()
            echo.set()
