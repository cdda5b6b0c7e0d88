"""A raw WebSocket that keeps every event, and the two REST calls tests make beside it.

Lower level than tests/support/viewer.py on purpose: it applies nothing and reconnects never,
so a test sees exactly what the server sent, in order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.support.server import ServerProcess
from tests.support.wait import wait_for

DEADLINE = 20.0


class Socket:
    """One raw WebSocket, every event kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, http: aiohttp.ClientSession, server: ServerProcess, query: str = "", **options: Any
    ) -> Socket:
        """`options` go to ws_connect (headers=..., for an Origin or an Authorization)."""
        return cls(await http.ws_connect(f"{server.ws_url}?{query}", **options))

    async def send(self, **event: Any) -> None:
        await self.ws.send_str(json.dumps(event))

    async def closed(self) -> int | None:
        """Wait (with the deadline) for the server to close the socket; its close code."""
        await asyncio.wait_for(asyncio.shield(self._reader), DEADLINE)
        return self.ws.close_code

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def comments(self) -> list[tuple[int | None, str]]:
        """(offset, id) of every comment received, in order."""
        out: list[tuple[int | None, str]] = []
        for e in self.events:
            if e["type"] == "comment":
                out.append((e["offset"], e["comment"]["id"]))
            elif e["type"] == "comments":
                out += [(e["offset"] + i, c["id"]) for i, c in enumerate(e["comments"])]
        return out

    async def wait(self, check: Any, what: str) -> None:
        await wait_for(check, DEADLINE, what)

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def post(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    post_id: str,
    text: str,
    headers: dict[str, str] | None = None,
) -> str:
    body = {"post_id": post_id, "message": text}
    if headers is None:
        body["uid"] = "u"  # open mode; with a token, the token's sub
    async with http.post(f"{server.url}/v1/comments", json=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        comment_id: str = (await r.json())["comment"]["id"]
        return comment_id


async def listed(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    post_id: str,
    headers: dict[str, str] | None = None,
) -> list[str]:
    params = {"post_id": post_id}
    async with http.get(f"{server.url}/v1/comments", params=params, headers=headers) as r:
        assert r.status == 200, await r.text()
        return [c["id"] for c in (await r.json())["comments"]]
