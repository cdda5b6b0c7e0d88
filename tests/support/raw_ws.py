"""A deliberately bad WebSocket peer on a plain socket: it upgrades, then reads only when told.

aiohttp's own client keeps reading and answers pings by itself, so it cannot play a peer that
stops reading or has died; this one can.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time


class RawWebSocket:
    def __init__(self, port: int, path: str, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket()
        # A small receive buffer so the server's writes back up quickly once we stop reading.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """One client frame (masked, as RFC 6455 requires of clients); opcode 0 continues."""
        first = (0x80 if fin else 0) | opcode
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", first, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def read_until_closed(self, timeout: float) -> tuple[int | None, int]:
        """Read frames until the server closes; return (close code or None, bytes read)."""
        deadline = time.monotonic() + timeout
        data = b""
        total = 0
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return None, total
            if not chunk:
                return _close_code(data), total
            total += len(chunk)
            data = (data + chunk)[-65536:]
        raise TimeoutError("the server did not close the socket")

    def close(self) -> None:
        self.sock.close()


def _close_code(tail: bytes) -> int | None:
    """The code of a close frame (opcode 0x8) at the end of what was read, if there is one."""
    index = tail.rfind(b"\x88")
    if index < 0 or index + 4 > len(tail):
        return None
    length = tail[index + 1] & 0x7F
    if length < 2:
        return None
    (code,) = struct.unpack("!H", tail[index + 2 : index + 4])
    return int(code)
