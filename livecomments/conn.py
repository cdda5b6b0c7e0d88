"""One WebSocket as the hub sees it: a bounded outbox and the one task that writes to the socket.

The hub only ever calls `offer()`, which never awaits: fan-out to ten thousand sockets is ten
thousand deque appends. The socket's own `writer_worker` does the awaiting, so a peer that stops
reading stalls nobody but itself. When its outbox passes either cap the socket is closed with
`CLOSE_SLOW_CONSUMER`; the client is expected to reconnect and catch up with `GET ...&after=`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_UNSUPPORTED_DATA = 1003  # binary frame
CLOSE_SLOW_CONSUMER = 4008  # outbox overflowed: reconnect and catch up
# How long a close handshake with a peer that does not read may take before we drop the TCP.
CLOSE_TIMEOUT = 2.0


class Conn:
    """A subscriber socket. Hashable by identity, so the hub can keep sets of them."""

    __slots__ = (
        "_bytes",
        "_close_code",
        "_close_reason",
        "_max_bytes",
        "_max_messages",
        "_on_slow",
        "_outbox",
        "_ready",
        "_transport",
        "posts",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.BaseTransport | None,
        max_messages: int,
        max_bytes: int,
        on_slow: Callable[[], None] = lambda: None,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.posts: set[str] = set()
        self._outbox: deque[bytes] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._close_code: int | None = None
        self._close_reason = b""
        self._on_slow = on_slow

    def offer(self, payload: bytes) -> bool:
        """Queue an encoded event for this socket without waiting. False if it was dropped."""
        if self._close_code is not None:
            return False
        if len(self._outbox) >= self._max_messages or self._bytes + len(payload) > self._max_bytes:
            self._on_slow()
            self.close_soon(CLOSE_SLOW_CONSUMER, b"slow consumer")
            return False
        self._outbox.append(payload)
        self._bytes += len(payload)
        self._ready.set()
        return True

    def close_soon(self, code: int, reason: bytes) -> None:
        """Ask the writer to drop what is queued and close the socket with `code`."""
        if self._close_code is None:
            self._close_code = code
            self._close_reason = reason
            self._outbox.clear()
            self._bytes = 0
            self._ready.set()

    @property
    def closing(self) -> bool:
        return self._close_code is not None

    async def writer_worker(self) -> None:
        """The only coroutine that writes to this socket, until it closes."""
        try:
            while self._close_code is None:
                if not self._outbox:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                payload = self._outbox.popleft()
                self._bytes -= len(payload)
                await self.ws.send_frame(payload, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError) as e:
            # The peer went away mid-write; the reader side sees it too and cleans up.
            log.debug("socket write failed: %s", e)
            return
        await self._close_now()

    async def _close_now(self) -> None:
        assert self._close_code is not None
        try:
            await asyncio.wait_for(
                self.ws.close(code=self._close_code, message=self._close_reason), CLOSE_TIMEOUT
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            # A peer that does not read cannot take a close frame either: cut the connection.
            if isinstance(self._transport, asyncio.WriteTransport):
                self._transport.abort()
