"""Private `redis-server` processes for tests, and a TCP proxy that can make a connection deaf.

`RedisServers` starts each server on a free port (never 6379: the machine's shared Redis is not
ours to touch) with no persistence and its own directory, waits (with a deadline) until it
answers PING, and stops it by pid: `kill()` is SIGKILL, `pause()`/`resume()` are SIGSTOP/SIGCONT,
`restart()` starts it again on the same port. `command()` talks to it with a short-lived
synchronous client, for PUBSUB NUMSUB, CLIENT KILL and friends.

`DeafeningProxy` forwards TCP to a server; `deafen()` stops forwarding the server's bytes to the
Pub/Sub connections (those that sent SUBSCRIBE) while keeping them open: the failure that
health checks miss. `hold_replies()`/`release_replies()` gate everything the server sends to
those connections, for deterministic races, and `reply_delay` slows it down. `refuse()`/`admit()`
close every new connection at once (the open ones go on): a client that lost its connection
cannot come back until the test says so, so whatever is published meanwhile is surely missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.server import free_port
from tests.support.wait import wait_for_blocking as wait_until

SHARED_REDIS_PORT = 6379


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have redis-server")
        pytest.skip("redis-server is not installed")
    return path


def _read_bulk(s: socket.socket) -> bytes:
    """One RESP bulk string (`$<n>\\r\\n<n bytes>\\r\\n`), or b"" if the reply is not one (an error
    while the server is loading)."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n")
    if not head.startswith(b"$"):
        return b""
    size = int(head[1:])
    while len(body) < size + 2:
        chunk = s.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return body[:size]


class RedisServer:
    def __init__(self, base_dir: Path, name: str) -> None:
        self.port = free_port()
        assert self.port != SHARED_REDIS_PORT
        self.name = name
        self.dir = base_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._answers, timeout, f"redis {self.name} on port {self.port} to answer")
        return self

    def _answers(self) -> bool:
        """True once the server on the port is this process (its INFO names our pid): another
        redis-server that holds the port would answer PING for a server that failed to bind."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis {self.name} exited: {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                reply = _read_bulk(s)
        except OSError:
            return False
        assert self.proc is not None
        if not reply:
            return False
        if f"process_id:{self.proc.pid}\r\n".encode() not in reply:
            raise RuntimeError(f"redis {self.name}: port {self.port} is another process's")
        return True

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, protocol=2, socket_timeout=5)

    def command(self, *args: Any) -> Any:
        with self.client() as c:
            return c.execute_command(*args)

    def numsub(self, channels: list[str]) -> dict[str, int]:
        if not channels:
            return {}
        reply = self.command("PUBSUB", "NUMSUB", *channels)
        return {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}

    def subscribe_calls(self) -> int:
        """How many SUBSCRIBE commands this server has executed (INFO commandstats)."""
        stats = self.client().info("commandstats")
        return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))

    def kill(self) -> None:
        """SIGKILL: the server vanishes, its clients see their connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: every connection stays open and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class RedisServers:
    """Starts servers on demand; `close()` stops every one it started, by pid."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.servers: list[RedisServer] = []

    def start(self, count: int = 1) -> list[RedisServer]:
        new = [RedisServer(self.base_dir, f"redis{len(self.servers) + i}") for i in range(count)]
        self.servers.extend(new)
        for server in new:
            server.start()
        return new

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@contextlib.contextmanager
def redis_servers(base_dir: Path) -> Iterator[RedisServers]:
    servers = RedisServers(base_dir)
    try:
        yield servers
    finally:
        servers.close()


class DeafeningProxy:
    """A TCP proxy in this event loop in front of one Redis server (see the module docstring)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pubsub_states: list[dict[str, bool]] = []
        self.upstream = bytearray()  # everything clients sent, to see which commands went out
        self.replies_open = asyncio.Event()
        self.replies_open.set()
        # Commands (not Pub/Sub) wait here while held: a request in flight that has not reached
        # Redis yet, released in order.
        self.requests_open = asyncio.Event()
        self.requests_open.set()
        self.refusing = False
        self.refused = 0  # connections closed at once while refusing
        # Seconds each chunk the server sends a Pub/Sub connection is held before it is passed
        # on: slow confirmations, for the interleavings that need a reply late but not lost.
        self.reply_delay = 0.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> DeafeningProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def deafen(self) -> None:
        """The Pub/Sub connections open now hear nothing more; later ones work."""
        for state in self._pubsub_states:
            state["deaf"] = True

    def sent(self, command: bytes) -> int:
        """How many times clients sent `command` (matched as a RESP bulk string)."""
        return self.upstream.count(b"$%d\r\n%s\r\n" % (len(command), command))

    def hold_requests(self) -> None:
        self.requests_open.clear()

    def release_requests(self) -> None:
        self.requests_open.set()

    def hold_replies(self) -> None:
        self.replies_open.clear()

    def release_replies(self) -> None:
        self.replies_open.set()

    def refuse(self) -> None:
        """Close new connections as soon as they are accepted (the open ones are untouched)."""
        self.refusing = True

    def admit(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        state = {"pubsub": False, "deaf": False}
        to_server = asyncio.create_task(self._pump(reader, up_writer, state, upstream=True))
        to_client = asyncio.create_task(self._pump(up_reader, writer, state, upstream=False))
        self._tasks.update((to_server, to_client))
        await asyncio.wait([to_server, to_client], return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: dict[str, bool],
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if upstream:
                    self.upstream += data
                    if b"SUBSCRIBE" in data.upper() and not state["pubsub"]:
                        state["pubsub"] = True
                        self._pubsub_states.append(state)
                    if not state["pubsub"]:
                        await self.requests_open.wait()
                elif state["pubsub"]:
                    await self.replies_open.wait()
                    if self.reply_delay:
                        await asyncio.sleep(self.reply_delay)  # the injected latency
                    if state["deaf"]:
                        continue  # swallowed: the connection stays open and hears nothing
                writer.write(data)
                await writer.drain()
