"""Where this process is in its life: serving, draining, or stopping (and by when it must be done).

**Draining** (SIGTERM before the stop, or SIGUSR1 alone) hands this node's viewers to the others
without a gap and without a stampede: /readyz answers 503 at once (the load balancer stops
routing here), new WebSocket upgrades get 503 (nginx's `proxy_next_upstream ... http_503` sends
them to another node), POSTs are still taken, and every open socket gets `{"type":"reconnect"}`
then a close with 1012 (service restart), spread evenly, with jitter, over
`server.drain_seconds`, so a host's viewers do not all reconnect in the same second. They come
back elsewhere with their positions and miss nothing.

**Stopping** follows: `server.shutdown_timeout` bounds it: aiohttp first waits for open
requests, then the cleanup contexts run in reverse order (the outbox appends what it still owes
to the streams, the hub stops, the durable log flushes into the database); each gets what is left
of the one deadline, fixed when the stop began (`begin_stop`). What is not done by then stays in
the queue on disk for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection
from dataclasses import dataclass

from livecomments.live import events
from livecomments.live.conn import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART, Conn, text_frame

log = logging.getLogger(__name__)

_RECONNECT = text_frame(events.RECONNECT)


@dataclass
class Lifecycle:
    shutdown_timeout: float
    drain_seconds: float
    draining: bool = False
    stopping: bool = False
    # Event-loop time by which the stop must be done; None while serving.
    stop_deadline: float | None = None

    async def drain(self, conns: Collection[Conn]) -> None:
        """Hand every open socket over (see the module docstring); returns once each was asked
        to go, or at once if a drain already ran."""
        if self.draining:
            return
        self.draining = True
        sockets = list(conns)
        random.shuffle(sockets)
        log.info(
            "draining: %d sockets asked to reconnect elsewhere over %gs",
            len(sockets),
            self.drain_seconds,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        step = self.drain_seconds / max(1, len(sockets))
        for i, conn in enumerate(sockets):
            due = started + (i + random.random()) * step
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not conn.closing:
                conn.offer(_RECONNECT)
                conn.close_soon(CLOSE_SERVICE_RESTART, b"service restart: reconnect elsewhere")
        log.info("drained: every socket was asked to reconnect elsewhere")

    def begin_stop(self, conns: Collection[Conn]) -> None:
        """Refuse new sockets, close the open ones (none are left after a drain), start the
        clock."""
        self.stopping = True
        self.stop_deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        for conn in list(conns):
            conn.close_soon(CLOSE_GOING_AWAY, b"server shutting down")

    @property
    def refusing_sockets(self) -> bool:
        return self.draining or self.stopping
