"""The smallest end-to-end loop over a real server: POST, see it live, GET it back."""

from __future__ import annotations

import aiohttp


async def test_post_is_delivered_live_and_listed(start_server, http: aiohttp.ClientSession):
    server = start_server()
    async with http.ws_connect(f"{server.ws_url}?post_id=p1") as ws:
        subscribed = await ws.receive_json(timeout=5)
        assert subscribed["type"] == "subscribed" and subscribed["post_id"] == "p1"
        assert subscribed["offset"] == 0 and subscribed["epoch"]  # a new post's position
        body = {"post_id": "p1", "uid": "alice", "message": "hello"}
        async with http.post(f"{server.url}/v1/comments", json=body) as r:
            assert r.status == 201
            created = (await r.json())["comment"]
        event = await ws.receive_json(timeout=5)
        assert event == {"type": "comment", "post_id": "p1", "offset": 1, "comment": created}
    async with http.get(f"{server.url}/v1/comments", params={"post_id": "p1"}) as r:
        assert r.status == 200
        assert await r.json() == {"comments": [created], "has_more": False}
    assert server.stop() == 0
