"""Finding dead peers: one worker pings every quiet socket and cuts the ones that stay silent.

A peer that vanished without a FIN (a phone out of coverage, a crashed NAT) leaves a socket that
looks open for as long as TCP's own timeouts: hours. aiohttp's own heartbeat is off
(`heartbeat=None` on every response): it keeps a timer per socket, resets it through a
callback on every message received, and that callback was a reference cycle (response ->
protocol -> callback -> response) that kept every socket dropped without a close frame alive
until a full garbage collection. Here one worker serves every socket with one shared ping frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from livecomments.live.conn import PING_FRAME, Conn

log = logging.getLogger(__name__)


class Heartbeat:
    """Pings every socket quiet for `interval` seconds, cuts one that sends nothing for
    `interval / 2` after its ping. It ticks four times per interval, so a dead peer is cut
    between `interval * 1.5` and `interval * 1.75` after its last frame."""

    def __init__(self, conns: Collection[Conn], interval: float) -> None:
        self._conns = conns
        self.interval = interval

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval / 4)
            try:
                self.tick(loop.time())
            except Exception:  # a bug here must not end heartbeats for good
                log.exception("heartbeat: tick failed")

    def tick(self, now: float) -> int:
        """Ping the quiet, cut the silent; return how many were cut."""
        cut = 0
        for conn in list(self._conns):
            if conn.closing:
                continue
            if conn.pinged_at is not None:
                if now - conn.pinged_at >= self.interval / 2:
                    conn.abort()
                    cut += 1
            elif now - conn.last_seen >= self.interval:
                conn.pinged_at = now
                conn.offer(PING_FRAME)
        return cut
