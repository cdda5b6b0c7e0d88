"""WebSocket frames byte by byte, for clients that break the protocol on purpose.

`client_frame` builds any client frame, valid or not (reserved opcodes and bits, no mask, a
length that lies); `WireClient` upgrades on a plain asyncio connection, writes whatever bytes it
is given and parses what the server sends back, frame by frame, so a test sees exactly which
frames came, in which order, and the close code. Unlike aiohttp's client it answers nothing by
itself and never reassembles or validates; unlike tests/support/raw_ws.py it is asynchronous
and parses every frame instead of looking for a close frame in the tail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from dataclasses import dataclass

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x00\x00\x00\x00",
    length: int | None = None,
) -> bytes:
    """One client frame (RFC 6455 5.2). `mask=None` sends it unmasked (which clients must not);
    `rsv` sets the three reserved bits (0-7); `length` overrides the declared payload length
    (a frame that lies about its size). The length is encoded in the shortest form."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    masked = 0x80 if mask is not None else 0
    if declared < 126:
        header = struct.pack("!BB", first, masked | declared)
    elif declared < 1 << 16:
        header = struct.pack("!BBH", first, masked | 126, declared)
    else:
        header = struct.pack("!BBQ", first, masked | 127, declared)
    if mask is None:
        return header + payload
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass(frozen=True)
class Frame:
    """A frame from the server, as it came: no reassembly, no checks."""

    opcode: int
    fin: bool
    payload: bytes
    masked: bool = False
    rsv: int = 0

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


@dataclass(frozen=True)
class Refusal:
    """The server's HTTP answer to an upgrade it did not accept."""

    status: int
    body: bytes


class WireClient:
    """One upgraded connection; `send` writes raw bytes, `read_frame` parses one frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, target: str, timeout: float) -> WireClient | Refusal:
        """Upgrade `GET target` (path and query, already encoded); a Refusal if the answer is
        not 101 (its body read by Content-Length)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        if status == 101:
            return cls(reader, writer)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        writer.close()
        return Refusal(status, body)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float) -> Frame | None:
        """The next whole frame, or None if the server closed the connection (EOF or reset)."""
        try:
            return await asyncio.wait_for(self._read_frame(), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _read_frame(self) -> Frame:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        mask = await self.reader.readexactly(4) if second & 0x80 else None
        payload = await self.reader.readexactly(length)
        if mask is not None:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return Frame(first & 0xF, bool(first & 0x80), payload, mask is not None, first >> 4 & 7)

    async def read_rest(self, timeout: float) -> list[Frame]:
        """Every frame until the server closes the connection (within `timeout` each)."""
        frames = []
        while (frame := await self.read_frame(timeout)) is not None:
            frames.append(frame)
        return frames

    def abort(self) -> None:
        """Cut the connection without a close frame (an RST): a peer that vanished."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):  # reset by the server first: closed anyway
            await self.writer.wait_closed()
