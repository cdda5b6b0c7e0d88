"""A WebSocket client that does just enough, so that the load generator is never the bottleneck.

One `asyncio.Protocol` per socket: it writes the upgrade request, checks for `101`, then only
walks frame headers. Pings are answered, a close frame is echoed. A read that holds exactly one
comment frame, the common case, costs a handful of byte comparisons (`data_received`); on this
kind of machine every Python call costs ~0.2 us and the kernel's share of a read ~5 us, so the
Python side is kept to the least that counts correctly.

Counting: every socket counts the comments it reads. A frame may carry several comments
(livecomments' `{"type":"comments",...}` batch): each marker pair counts.

Latency: the poster writes `~<time.time_ns() when the POST was sent>~` into each comment's
message. One socket in `PROBE_EVERY` of each process is a probe: a plain socket with
SO_TIMESTAMPNS, read with `recvmsg`, so the kernel says when the frame reached the socket. The
latency of each probe read is that instant minus the POST's, so it does not include the time the
load generator takes to get round to a socket: reading ten thousand sockets of one fan-out in
turn takes it ~100 ms on one core, which is its cost, not the server's. (Without a kernel stamp,
the time of the read is used.) Probes are spread over the connection order, so they sample early
and late sockets of each fan-out.

Client frames must be masked (RFC 6455 5.3); we mask with the key 0, which XORs to the payload
itself, so sending costs no copy. Servers do not check the key's randomness; it only exists to
defeat cache poisoning by browsers.

Two dialects:

* `LcSocket`: livecomments, `GET /v1/ws?post_id=P`, more posts by `{"type":"subscribe"}`; ready
  when every post is confirmed by `{"type":"subscribed"}`.
* `SioSocket`: python-socketio, Engine.IO v4 over WebSocket (`GET /socket.io/?EIO=4&
  transport=websocket`): the server's open packet `0{...}`, our namespace connect `40`, the
  server's `40{...}`, then `42<ack id>["join","<post>"]` per post, each confirmed by the ack
  `43<ack id>[...]`. Server pings `2` are answered with pongs `3`; comments are `42["comment",{}]`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from typing import ClassVar, Literal, cast

import orjson

from bench.hist import Histogram, bucket_of

Dialect = Literal["lc", "sio"]

MARK = b"~"  # never in ids, numbers or JSON punctuation; one byte, so found by memchr
# One socket in this many measures latency (the first one always does). A probe's read costs
# about 3.5 ordinary ones (recvmsg and its ancillary data), hence not every socket.
PROBE_EVERY = 16
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS is the same
_ANC_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
RECV_BYTES = 262144
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FINAL_TEXT = 0x80 | OP_TEXT
# A fixed 16-byte nonce ("livecomments-ben"), base64: servers check its length, hash it back.
WS_KEY = b"bGl2ZWNvbW1lbnRzLWJlbg=="
MAX_HANDSHAKE_BYTES = 16384
MAX_FRAME_BYTES = 1 << 22  # a frame larger than this is a bug in the server under test


class Tally:
    """What the sockets of one load generator process received since `reset(since_ns)`."""

    __slots__ = (
        "counts",
        "deliveries",
        "first_ns",
        "last_ns",
        "max_us",
        "read_counts",
        "read_max_us",
        "reads",
        "samples",
        "since_ns",
        "stale",
    )

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, since_ns: int) -> None:
        self.since_ns = since_ns
        self.counts: dict[int, int] = {}  # latency histogram of the samples (hist.py buckets)
        self.max_us = 0
        # The same comments timed when the load generator read them rather than when they
        # arrived: the difference is the load generator's own delay.
        self.read_counts: dict[int, int] = {}
        self.read_max_us = 0
        self.deliveries = 0  # comments that arrived
        self.reads = 0  # reads that held comments
        self.samples = 0
        self.stale = 0  # probe reads whose comment was sent before since_ns (a late arrival)
        self.first_ns = 0  # arrival time (time.time_ns) of the first and last probe read
        self.last_ns = 0

    def sample(self, data: bytes, start: int, now: int) -> None:
        """The latency of the first comment at or after `start` in `data`, arrived at `now`."""
        i = data.find(MARK, start)
        j = data.find(MARK, i + 1)
        try:
            sent = int(data[i + 1 : j])
        except ValueError:
            return
        self.last_ns = now
        if not self.first_ns:
            self.first_ns = now
        if sent < self.since_ns:
            self.stale += 1
            return
        self.samples += 1
        # Probes only (one socket in PROBE_EVERY): plain hist.py buckets are cheap enough.
        us = (now - sent) // 1000
        self.max_us = max(self.max_us, us)
        key = bucket_of(us)
        self.counts[key] = self.counts.get(key, 0) + 1
        us = (time.time_ns() - sent) // 1000
        self.read_max_us = max(self.read_max_us, us)
        key = bucket_of(us)
        self.read_counts[key] = self.read_counts.get(key, 0) + 1

    def histogram(self) -> Histogram:
        h = Histogram()
        h.merge_pairs(self.counts.items(), self.max_us)
        return h

    def read_histogram(self) -> Histogram:
        h = Histogram()
        h.merge_pairs(self.read_counts.items(), self.read_max_us)
        return h


class BenchSocket(asyncio.Protocol):
    """The WebSocket framing shared by both dialects; subclasses say what a comment looks like."""

    path = "/"
    # A text payload that starts with this is a comment event (checked as bytes, not parsed).
    COMMENT_PREFIX: ClassVar[bytes] = b""
    # Offset in the payload of the byte that is "s" when the event is a batch of comments.
    BATCH_AT: ClassVar[int] = -1

    def __init__(self, port: int, posts: list[str], tally: Tally, probe: bool = False) -> None:
        self.port = port
        self.posts = posts
        self.tally = tally
        self.probe = probe
        self.arrived_ns = 0  # probes: when the data of this read reached the socket
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.open = False
        self.close_code: int | None = None
        self.error: str | None = None
        self._buf = b""
        self._fragments: list[bytes] = []
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._confirmed = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.open = True
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.request_path().encode(), self.port, WS_KEY)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.ready.done():
            self._fail(f"connection lost during setup: {exc or 'closed'}")
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        # The fast path: nothing buffered, and the read is exactly one final text frame that
        # is a comment event.
        if not self._buf and self.upgraded:
            n = len(data)
            length = data[1] if n > 3 else 0xFF
            if length < 126:
                head, total = 2, 2 + length
            elif length == 126:
                head, total = 4, 4 + ((data[2] << 8) | data[3])
            else:
                head, total = 0, -1
            if total == n and data[0] == FINAL_TEXT and data.startswith(self.COMMENT_PREFIX, head):
                self._comment(data, head, n)
                return
        self._walk(data)

    def _comment(self, data: bytes, start: int, end: int) -> None:
        """A comment event (or batch of them) at data[start:end]."""
        t = self.tally
        batch = self.BATCH_AT
        if batch >= 0 and data[start + batch] == 0x73:  # "comments": count the markers
            t.deliveries += data.count(MARK, start, end) >> 1
        else:
            t.deliveries += 1
        t.reads += 1
        if self.probe:
            t.sample(data, start, self.arrived_ns)

    def _walk(self, data: bytes) -> None:
        """The general path: handshake, partial frames, several frames, control frames."""
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.upgraded:
            data = self._handshake(data)
            if not data:
                return
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            try:
                head, length = _header(data, pos, n)
            except ValueError as e:
                self._abort(str(e))
                return
            if not head:
                break
            end = pos + head + length
            if end > n:
                break
            self._frame(b0, data, pos + head, end)
            if self.transport is None or not self.open:
                return
            pos = end
        if pos < n:
            self._buf = data[pos:]

    def _frame(self, b0: int, data: bytes, start: int, end: int) -> None:
        if b0 != FINAL_TEXT:
            self._on_other(b0, data[start:end])
        elif data.startswith(self.COMMENT_PREFIX, start):
            self._comment(data, start, end)
        else:
            self.on_text(data[start:end])

    def _handshake(self, data: bytes) -> bytes:
        """Until the 101 has arrived: what follows it, or b"" (wait for more, or failed)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HANDSHAKE_BYTES:
                self._abort("handshake response too large")
            else:
                self._buf = data
            return b""
        if not data.startswith(b"HTTP/1.1 101"):
            self._abort("upgrade refused: " + data[:end].split(b"\r\n", 1)[0].decode("latin1"))
            return b""
        self.upgraded = True
        self.on_upgraded()
        return data[end + 4 :]

    def _on_other(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == OP_PING:
            self.send(payload, OP_PONG)
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.send(payload[:2], OP_CLOSE)
            if self.transport is not None:
                self.transport.close()
        elif opcode in (OP_TEXT, OP_CONT):  # a fragmented message: join the pieces
            self._fragments.append(payload)
            if b0 & 0x80 and opcode == OP_CONT:
                whole = b"".join(self._fragments)
                self._fragments.clear()
                if whole.startswith(self.COMMENT_PREFIX):
                    self._comment(whole, 0, len(whole))
                else:
                    self.on_text(whole)

    # -- sending and closing -------------------------------------------------------------------

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        """One final, masked (key 0) frame."""
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.transport.write(head + b"\0\0\0\0" + payload)

    def close(self, code: int = 1000) -> None:
        """Start a clean close: our close frame; the server answers and drops the TCP."""
        if self.transport is not None and not self.transport.is_closing():
            self.send(struct.pack("!H", code), OP_CLOSE)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _abort(self, why: str) -> None:
        self._fail(why)
        self.abort()

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
            self.ready.exception()  # retrieved: the caller may have stopped waiting

    def _confirm(self) -> None:
        self._confirmed += 1
        if self._confirmed == len(self.posts) and not self.ready.done():
            self.ready.set_result(None)

    # -- dialects ------------------------------------------------------------------------------

    def request_path(self) -> str:
        return self.path

    def on_upgraded(self) -> None:
        pass

    def on_text(self, payload: bytes) -> None:
        """A text message that is not a comment event."""
        raise NotImplementedError


class LcSocket(BenchSocket):
    COMMENT_PREFIX = b'{"type":"comment'
    BATCH_AT = len(COMMENT_PREFIX)

    def request_path(self) -> str:
        return f"/v1/ws?post_id={self.posts[0]}"

    def on_upgraded(self) -> None:
        for post in self.posts[1:]:
            self.send(orjson.dumps({"type": "subscribe", "post_id": post}))

    def on_text(self, payload: bytes) -> None:
        if b'"subscribed"' in payload:
            self._confirm()
        elif b'"error"' in payload:
            self._fail(payload[:200].decode(errors="replace"))


class SioSocket(BenchSocket):
    path = "/socket.io/?EIO=4&transport=websocket"
    COMMENT_PREFIX = b'42["comment"'

    def on_text(self, payload: bytes) -> None:
        kind = payload[:2]
        if payload == b"2":  # Engine.IO ping
            self.send(b"3")
        elif kind == b"43":  # the ack of one of our joins
            self._confirm()
        elif payload[:1] == b"0":  # Engine.IO open: connect to the default namespace
            self.send(b"40")
        elif kind == b"40":  # namespace connected: join the rooms, each with an ack id
            for i, post in enumerate(self.posts):
                self.send(b"42%d%s" % (i, orjson.dumps(["join", post])))
        elif kind in (b"44", b"41") or payload[:1] == b"1":
            self._abort(f"socket.io refused or closed: {payload[:200]!r}")


class ProbeTransport:
    """Just enough of a transport for a probe socket: reads with kernel arrival timestamps."""

    def __init__(
        self, sock: socket.socket, protocol: BenchSocket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.loop = loop
        self._closed = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(RECV_BYTES, _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost(None)
            return
        arrived = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack_from("qq", value)
                arrived = sec * 1_000_000_000 + nsec
        self.protocol.arrived_ns = arrived or time.time_ns()
        self.protocol.data_received(data)

    def write(self, data: bytes) -> None:
        """Small control frames only (pongs, joins, close): sent at once, or the probe fails."""
        if self._closed:
            return
        try:
            sent = self.sock.send(data)
        except OSError as e:
            self._lost(e)
            return
        if sent < len(data):
            self._lost(ConnectionError("probe socket send buffer full"))

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._lost(None)

    def abort(self) -> None:
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.protocol.connection_lost(exc)


async def open_probe(
    cls: type[BenchSocket], port: int, posts: list[str], tally: Tally
) -> BenchSocket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    protocol = cls(port, posts, tally, probe=True)
    protocol.connection_made(cast(asyncio.Transport, ProbeTransport(sock, protocol, loop)))
    return protocol


def _header(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """(header size, payload length) of the frame at `pos`; (0, 0) while the header is cut."""
    length = data[pos + 1]
    if length < 126:
        return 2, length
    if length == 126:
        return (4, (data[pos + 2] << 8) | data[pos + 3]) if n - pos >= 4 else (0, 0)
    if length == 127:
        if n - pos < 10:
            return 0, 0
        (length,) = struct.unpack_from("!Q", data, pos + 2)
        if length > MAX_FRAME_BYTES:
            raise ValueError("oversized frame from the server")
        return 10, length
    raise ValueError("masked frame from the server")


def _confirmed(sock: BenchSocket) -> bool:
    ready = sock.ready
    return sock.open and ready.done() and not ready.cancelled() and ready.exception() is None


def socket_class(dialect: Dialect) -> type[BenchSocket]:
    return LcSocket if dialect == "lc" else SioSocket


class SocketPool:
    """The sockets of one load generator process, opened with bounded concurrency."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.sockets: list[BenchSocket] = []
        self.errors: Counter[str] = Counter()

    async def open(
        self,
        dialect: Dialect,
        port: int,
        subscriptions: list[list[str]],
        concurrency: int,
        within: float,
    ) -> dict[str, int]:
        """Open one socket per entry of `subscriptions` (the posts it watches); wait until each
        is confirmed, or `within` seconds have passed for them all."""
        loop = asyncio.get_running_loop()
        cls = socket_class(dialect)
        gate = asyncio.Semaphore(concurrency)
        opened: list[BenchSocket] = []

        async def one(posts: list[str], probe: bool) -> None:
            async with gate:
                try:
                    if probe:
                        sock = await open_probe(cls, port, posts, self.tally)
                    else:
                        _, sock = await loop.create_connection(
                            lambda: cls(port, posts, self.tally), "127.0.0.1", port
                        )
                    opened.append(sock)
                    await sock.ready
                except (OSError, ConnectionError) as e:
                    self.errors[type(e).__name__ + ": " + str(e)[:120]] += 1

        first = len(self.sockets)
        tasks = [
            asyncio.ensure_future(one(posts, (first + i) % PROBE_EVERY == 0))
            for i, posts in enumerate(subscriptions)
        ]
        _, pending = await asyncio.wait(tasks, timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            self.errors["setup timed out"] += len(pending)
        good = [s for s in opened if _confirmed(s)]
        for sock in opened:
            if sock not in good:
                sock.abort()
        self.sockets.extend(good)
        return {"opened": len(good), "failed": len(subscriptions) - len(good)}

    async def reopen_closed(self, dialect: Dialect, port: int, within: float) -> int:
        """Replace sockets the server closed (slow consumers); returns how many were replaced."""
        closed = [s for s in self.sockets if not s.open]
        if not closed:
            return 0
        self.sockets = [s for s in self.sockets if s.open]
        await self.open(dialect, port, [s.posts for s in closed], 256, within)
        return len(closed)

    def status(self) -> dict[str, object]:
        codes = Counter(str(s.close_code) for s in self.sockets if not s.open)
        return {
            "open": sum(1 for s in self.sockets if s.open),
            "probes": sum(1 for s in self.sockets if s.open and s.probe),
            "closed": sum(1 for s in self.sockets if not s.open),
            "close_codes": dict(codes),
            "errors": dict(self.errors.most_common(5)),
        }

    async def close_all(self, within: float) -> None:
        """Close frames to all, then wait (bounded) for the server to drop them; abort the rest."""
        for sock in self.sockets:
            sock.close()
        pending = [s.lost for s in self.sockets if not s.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=within)
        for sock in self.sockets:
            if sock.open:
                sock.abort()
        self.sockets.clear()
