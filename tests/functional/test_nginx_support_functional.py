"""The private nginx of tests/support/nginx.py, in front of two tiny upstreams.

One upstream answers its WebSocket upgrade with 503 (a node that is draining), the other
upgrades. Through nginx every upgrade lands on the second one, and the access log proves it:
the 503 node is tried (round-robin) and passed over. The lines the docs should show, in the
`location` that proxies `/v1/ws`:

    proxy_next_upstream error timeout http_503;
    proxy_next_upstream_tries 2;          # the number of servers: each is tried once

with, as before, `proxy_http_version 1.1;`, `proxy_set_header Upgrade $http_upgrade;`,
`proxy_set_header Connection $connection_upgrade;` and `proxy_read_timeout 90s;`. nginx retries
an upgrade (a GET) but never a POST it has sent, so a 503 to a POST still reaches the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.nginx import Nginx
from tests.support.server import free_port
from tests.support.wait import wait_for

UPGRADES = 4


async def start_upstream(name: str, *, refuse_upgrades: bool) -> tuple[web.AppRunner, int]:
    async def ws(request: web.Request) -> web.StreamResponse:
        if refuse_upgrades:
            return web.json_response(
                {"error": {"code": "draining", "message": name}},
                status=503,
                headers={"Retry-After": "1"},
            )
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for msg in socket:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await socket.send_str(f"{msg.data} from {name}")
        return socket

    async def hello(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": name, "forwarded_for": request.headers.get("X-Forwarded-For")}
        )

    app = web.Application()
    app.router.add_get("/v1/ws", ws)
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, int]]:
    draining, draining_port = await start_upstream("draining", refuse_upgrades=True)
    ready, ready_port = await start_upstream("ready", refuse_upgrades=False)
    yield {"draining": draining_port, "ready": ready_port}
    await draining.cleanup()
    await ready.cleanup()


async def test_upgrades_pass_over_a_503_node_and_the_log_shows_where_they_went(
    tmp_path: Path, upstreams: dict[str, int], http: aiohttp.ClientSession
):
    nginx = Nginx(tmp_path / "nginx", [upstreams["draining"], upstreams["ready"]]).start()
    try:
        for i in range(UPGRADES):
            async with http.ws_connect(f"{nginx.ws_url}?post_id=p{i}") as ws:
                await ws.send_str(f"hi {i}")
                reply = await ws.receive(timeout=5)
                assert reply.data == f"hi {i} from ready"

        async with http.get(f"{nginx.url}/hello") as r:
            assert r.status == 200
            body = await r.json()
        assert body["forwarded_for"] == "127.0.0.1"

        def upgrades() -> list:
            return [e for e in nginx.access_log_entries() if e.request.startswith("GET /v1/ws")]

        await wait_for(lambda: len(upgrades()) == UPGRADES, 5, "a log line per upgrade")
        ready = f"127.0.0.1:{upstreams['ready']}"
        draining = f"127.0.0.1:{upstreams['draining']}"
        for entry in upgrades():
            assert entry.status == 101
            assert entry.upstream_port == upstreams["ready"]
            assert entry.upstream_addrs in ([ready], [draining, ready])
            assert entry.forwarded_for == "127.0.0.1"
        # Round-robin hands half of the upgrades to the draining node first: they were retried.
        retried = [e for e in upgrades() if e.upstream_addrs == [draining, ready]]
        assert retried, nginx.access_log_lines()
        assert all(e.upstream_statuses == ["503", "101"] for e in retried)
    finally:
        nginx.stop()
    assert nginx.proc is not None and nginx.proc.returncode == 0, nginx.logs()
