"""Where this process is in its life: serving, or stopping (and by when it must be done).

`server.shutdown_timeout` bounds the whole stop: aiohttp first waits for open requests, then
the cleanup contexts run in reverse order (the hub, then the durable log, which flushes); each
gets what is left of the one deadline, fixed when the stop began (`begin_stop`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from livecomments.live.conn import CLOSE_GOING_AWAY, Conn


@dataclass
class Lifecycle:
    shutdown_timeout: float
    stopping: bool = False
    # Event-loop time by which the stop must be done; None while serving.
    stop_deadline: float | None = None

    def begin_stop(self, conns: Iterable[Conn]) -> None:
        """Refuse new sockets, tell every open one we are going away, start the clock."""
        self.stopping = True
        self.stop_deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        for conn in list(conns):
            conn.close_soon(CLOSE_GOING_AWAY, b"server shutting down")
