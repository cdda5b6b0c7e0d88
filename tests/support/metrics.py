"""The one reader of a server's /metrics in tests."""

from __future__ import annotations

import aiohttp

from tests.support.server import ServerProcess
from tests.support.wait import wait_for


async def scrape(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, float]:
    """Every `livecomments_*` series: name (with its labels, if any) -> value."""
    async with http.get(f"{server.url}/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("livecomments_"):
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("livecomments_")] = float(value)
    return values


async def metric(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> float:
    values = await scrape(http, server)
    assert name in values, f"{name} is not exported"
    return values[name]


async def wait_metric(
    http: aiohttp.ClientSession, server: ServerProcess, name: str, want: float, timeout: float = 10
) -> None:
    async def reached() -> bool:
        return await metric(http, server, name) == want

    await wait_for(reached, timeout, f"{name} to reach {want}")
