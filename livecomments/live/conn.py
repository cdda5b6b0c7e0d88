"""One WebSocket as the hub sees it: a bounded outbox, written in batches, cut when it overflows.

The hot path is built so that fan-out to ten thousand sockets costs ten thousand list appends:

* The hub turns an event into a complete WebSocket frame once (`text_frame`) and offers the same
  bytes object to every socket. Server frames are unmasked and we never negotiate
  permessage-deflate, so one frame is valid on every connection.
* `Conn.offer()` never awaits and never writes: it appends to the socket's pending list and marks
  the socket dirty in the shared `WriteBatcher`, which, once per event-loop turn, writes each dirty
  socket's pending frames with a single `transport.write`. A burst of comments becomes one write
  per socket, not one per comment, and no task wakes up per message.
* What the kernel does not take at once waits in the transport's buffer. A socket's outbox is that
  buffer plus its pending list; when it would pass `max_bytes` the peer is not keeping up, and the
  socket is closed with `CLOSE_SLOW_CONSUMER` (4008) rather than buffered without end. The client
  reconnects and catches up with `GET ...&after=`.

Heartbeats are ours too (heartbeat.py), so aiohttp writes only the handshake and the close
frame. Both leave aiohttp's writer whole, in one `transport.write` with no await in between
(aiohttp 3.14, pinned in constraints.txt; compression off), and the batcher writes only whole
frames at the end of a loop turn, so neither can split the other's frame. tests/functional/
test_conn_interleave_functional.py holds both to that.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from aiohttp import web

from livecomments import metrics

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_UNSUPPORTED_DATA = 1003  # binary frame
CLOSE_ABNORMAL = 1006  # never sent: what the peer sees when we cut the TCP connection
CLOSE_POLICY_VIOLATION = 1008  # the client broke a limit (frames per second)
CLOSE_INTERNAL_ERROR = 1011  # the server could not write to this socket
CLOSE_SERVICE_RESTART = 1012  # this node is draining: reconnect (elsewhere) with your positions
CLOSE_SLOW_CONSUMER = 4008  # outbox overflowed: reconnect and catch up
# How long a close handshake with a peer that does not read may take before we drop the TCP.
CLOSE_TIMEOUT = 2.0

_FIN_TEXT = 0x81
_FIN_PING = 0x89
_FIN_PONG = 0x8A
PING_FRAME = bytes((_FIN_PING, 0))
# RFC 6455 5.5: control frames carry at most 125 bytes.
MAX_CONTROL_PAYLOAD = 125


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, uncompressed server-to-client text frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((_FIN_TEXT, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, n)
    return header + payload


def pong_frame(payload: bytes) -> bytes:
    """The answer to a client's ping: a pong echoing its (at most 125-byte) payload."""
    payload = payload[:MAX_CONTROL_PAYLOAD]
    return bytes((_FIN_PONG, len(payload))) + payload


class WriteBatcher:
    """Writes every socket that got frames during this loop turn, once, at the end of the turn."""

    def __init__(self) -> None:
        self._dirty: list[Conn] = []
        self._scheduled = False

    def mark(self, conn: Conn) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for conn in dirty:
            try:
                conn.flush()
            except Exception:
                # One broken transport must not leave the sockets after it marked dirty and
                # never written again: drop that socket, keep going.
                log.exception("write to a socket failed; closing it")
                conn.close_soon(CLOSE_INTERNAL_ERROR, b"write failed", drop_pending=True)


class Conn:
    """A subscriber socket. Hashable by identity, so the hub can keep sets of them."""

    __slots__ = (
        "_batcher",
        "_close_code",
        "_closer",
        "_dirty",
        "_max_bytes",
        "_pending",
        "_pending_bytes",
        "_transport",
        "last_seen",
        "pinged_at",
        "posts",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        batcher: WriteBatcher,
        max_bytes: int,
    ) -> None:
        self.ws = ws
        self.posts: set[str] = set()
        self._transport = transport
        self._batcher = batcher
        self._max_bytes = max_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._dirty = False
        self._close_code: int | None = None
        self._closer: asyncio.Task[None] | None = None
        # Event-loop time of the last frame from the peer, and of our last unanswered ping.
        self.last_seen = asyncio.get_running_loop().time()
        self.pinged_at: float | None = None

    def heard(self, now: float) -> None:
        """The peer sent a frame (data, ping or pong): it is alive."""
        self.last_seen = now
        self.pinged_at = None

    def offer(self, frame: bytes) -> bool:
        """Queue a complete frame (see `text_frame`) without waiting. False if dropped."""
        if self._close_code is not None:
            return False
        backlog = self._pending_bytes + self._transport.get_write_buffer_size()
        if backlog + len(frame) > self._max_bytes:
            metrics.SLOW_CONSUMER_CLOSES.inc()
            self.close_soon(CLOSE_SLOW_CONSUMER, b"slow consumer", drop_pending=True)
            return False
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if not self._dirty:
            self._dirty = True
            self._batcher.mark(self)
        return True

    def flush(self) -> None:
        """Hand everything pending to the transport in one write (called by the batcher)."""
        self._dirty = False
        if not self._pending or self._close_code is not None or self._transport.is_closing():
            return
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_bytes = 0
        self._transport.write(data)

    def close_soon(self, code: int, reason: bytes, *, drop_pending: bool = False) -> None:
        """Close the socket with `code`, in the background. Frames already offered go out
        first (a last event before a close must arrive), unless `drop_pending`: a peer that
        does not read gets its close frame without the backlog it could not take."""
        if self._close_code is not None:
            return
        if not drop_pending:
            self.flush()
        metrics.WS_CLOSES.labels(str(code)).inc()
        self._close_code = code
        self._pending = []
        self._pending_bytes = 0
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    @property
    def closing(self) -> bool:
        return self._close_code is not None

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await self._closer

    def abort(self) -> None:
        """Cut a peer that stopped answering: no close handshake, it could not take one."""
        if self._close_code is None:
            metrics.WS_CLOSES.labels(str(CLOSE_ABNORMAL)).inc()
            self._close_code = CLOSE_ABNORMAL
            self._pending = []
            self._pending_bytes = 0
        self._transport.abort()

    def forget_exception(self) -> None:
        """Drop the tracebacks of the exception aiohttp keeps on a socket that ended in error.

        A peer that vanished without a close frame (a phone losing signal) makes `ws.close()` or
        `ws.receive()` store the exception (`ws.exception()`). Its traceback holds their frames,
        whose `self` is the response: a cycle through the request, the handler and the transport
        that only a full collection frees, and with cli.tune_gc's thresholds one rarely runs.
        Without the traceback, reference counting frees the socket as soon as the handler ends."""
        seen: set[int] = set()
        error: BaseException | None = self.ws.exception()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            error.__traceback__ = None
            error = error.__context__ or error.__cause__

    async def _close(self, code: int, reason: bytes) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError) as e:
            # A peer that does not read cannot take a close frame either: cut the connection.
            log.debug("close %d did not complete (%s); aborting the connection", code, e)
            self._transport.abort()
