"""Peers that vanish without a close frame (phones losing signal) must cost nothing once gone.

aiohttp keeps the exception that ended such a socket, and with its own heartbeat a callback,
both in reference cycles with the response; with the service's raised GC thresholds those
cycles were freed so rarely that every dropped socket kept ~12 KiB for good.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import re
import socket
import struct
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from livecomments.api.app import create_app
from livecomments.api.keys import CONNS
from livecomments.config import load_settings
from tests.support.server import LIMITS_OFF, ServerProcess

ROUND = 2000


async def open_and_drop(port: int, n: int) -> None:
    """Open `n` subscribed sockets at once, then cut them all without a close frame: half
    with a FIN (socket closed), half with an RST (SO_LINGER 0), as real clients do."""
    sem = asyncio.Semaphore(200)

    async def one() -> asyncio.StreamWriter:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    "GET /v1/ws?post_id=drops HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101"), head
            frame = await asyncio.wait_for(reader.readexactly(2), 10)  # `subscribed`'s header
            await asyncio.wait_for(reader.readexactly(frame[1] & 0x7F), 10)
            return writer

    writers = await asyncio.gather(*(one() for _ in range(n)))
    for i, writer in enumerate(writers):
        if i % 2:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


async def wait_no_connections(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with http.get(f"{server.url}/readyz") as r:
            if (await r.json())["connections"] == 0:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("dropped sockets were never noticed")


@pytest.mark.fault
async def test_memory_after_rounds_of_abrupt_drops_returns_to_baseline(start_server, http):
    server = start_server(env={"LIVECOMMENTS_LOG_LEVEL": "WARNING"})
    assert server.proc is not None
    after: list[float] = []
    for _ in range(3):
        await open_and_drop(server.port, ROUND)
        await wait_no_connections(http, server)
        after.append(rss_mib(server.proc.pid))
    # Round 1 grows the heaps to their working size; later rounds must reuse them.
    assert after[2] - after[0] < 4, after


async def test_a_dropped_socket_is_freed_without_the_garbage_collector(tmp_path):
    """The precise form: with the cyclic GC off, reference counting alone frees every socket
    that vanished (it found all 300 alive before the fix)."""
    settings = load_settings(
        None,
        {
            "LIVECOMMENTS_STORE_URL": f"sqlite:///{tmp_path}/c.db",
            "LIVECOMMENTS_QUEUE_DIR": str(tmp_path / "queue"),
            **LIMITS_OFF,  # 300 sockets from one address at once
        },
    )
    app = create_app(settings)
    server = TestServer(app, port=0)
    await server.start_server()
    try:
        gc.collect()
        gc.disable()
        try:
            await open_and_drop(server.port, 300)
            deadline = time.monotonic() + 10
            alive = -1
            while time.monotonic() < deadline:
                alive = sum(isinstance(o, web.WebSocketResponse) for o in gc.get_objects())
                if alive == 0 and not app[CONNS]:
                    break
                await asyncio.sleep(0.05)
            assert (alive, len(app[CONNS])) == (0, 0)
        finally:
            gc.enable()
    finally:
        await server.close()
