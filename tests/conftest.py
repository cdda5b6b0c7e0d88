"""Shared fixtures: real servers in subprocesses, an HTTP/WebSocket client session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.server import ServerProcess

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start servers on free ports; every one still running is stopped (SIGTERM, then SIGKILL)."""
    started: list[ServerProcess] = []

    def start(
        name: str = "server",
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
    ) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / name, env=env, port=port, name=name)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        try:
            server.stop(timeout=15)
        except Exception:
            server.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session
