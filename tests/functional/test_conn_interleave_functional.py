"""The batcher writes pre-built frames straight to the transport (live/conn.py); aiohttp writes
the handshake and the close frame through its own writer, and the read loop answers pings with
frames of ours. None of them may split another's frame: a client that parses every byte (aiohttp's
own) must see only whole, valid frames, in order, then the close."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import WSMsgType

COMMENTS = 400


async def post_many(http: aiohttp.ClientSession, url: str, post_id: str) -> None:
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            body = {"post_id": post_id, "uid": "u", "message": f"{i:04d} " + "y" * 300}
            async with http.post(f"{url}/v1/comments", json=body) as r:
                assert r.status == 201

    await asyncio.gather(*(one(i) for i in range(COMMENTS)))


@pytest.mark.fault
async def test_pings_comments_and_the_close_never_split_each_other(start_server, http):
    server = start_server()
    async with http.ws_connect(f"{server.ws_url}?post_id=mix", autoping=False) as ws:
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "subscribed"
        writer = asyncio.create_task(post_many(http, server.url, "mix"))
        comments = pongs = 0
        pinged = 0
        while comments < COMMENTS:
            if pinged < 50 and comments >= pinged * 5:
                pinged += 1
                await ws.ping(f"p{pinged}".encode())  # answered between batched frames
            msg = await ws.receive(timeout=10)
            assert msg.type in (WSMsgType.TEXT, WSMsgType.PONG), msg
            if msg.type == WSMsgType.PONG:
                pongs += 1
                assert msg.data == f"p{pongs}".encode()  # whole, and in the order asked
            else:
                assert json.loads(msg.data)["type"] == "comment"
                comments += 1
        await writer
        # A last burst, then aiohttp's close frame right behind the batched frames.
        burst = asyncio.create_task(post_many(http, server.url, "mix"))
        await burst
        server.signal(2)  # SIGINT: stop at once (SIGTERM would drain first)
        tail = 0
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type != WSMsgType.TEXT:
                break
            assert json.loads(msg.data)["type"] == "comment"
            tail += 1
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001, msg
        assert tail <= COMMENTS
    assert server.stop() == 0
