"""Draining a node behind a real nginx: its viewers move to the other node over
`server.drain_seconds`, nothing is missed, and no WebSocket upgrade reaches it once it drains
(nginx's `proxy_next_upstream error timeout http_503` sends them on)."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import metric
from tests.support.nginx import Nginx
from tests.support.redis_servers import RedisServer, redis_servers
from tests.support.server import ServerProcess
from tests.support.viewer import Viewer, settle
from tests.support.wait import wait_for

POSTS = ["drain-a", "drain-b", "drain-c"]
VIEWERS = 20
DRAIN_SECONDS = 2.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_servers(tmp_path / "redis") as servers:
        yield servers.start(1)[0]


async def readyz(http: aiohttp.ClientSession, server: ServerProcess) -> tuple[int, dict]:
    async with http.get(f"{server.url}/readyz") as r:
        return r.status, await r.json()


@pytest.mark.fault
async def test_a_drained_node_hands_its_viewers_over_through_nginx_and_misses_nothing(
    start_server, http, redis: RedisServer, tmp_path: Path
):
    env = {
        "LIVECOMMENTS_REDIS_URLS": redis.url,
        "LIVECOMMENTS_STORE_URL": f"sqlite:///{tmp_path}/shared.db",
        "LIVECOMMENTS_SERVER_DRAIN_SECONDS": str(DRAIN_SECONDS),
    }
    a = start_server("a", env=env)
    b = start_server("b", env=env)
    nginx = Nginx(tmp_path / "nginx", [a.port, b.port]).start()
    rng = random.Random(7)
    viewers = [
        Viewer(http, [nginx.url], [rng.choice(POSTS)], rng=rng).start() for _ in range(VIEWERS)
    ]
    acked: dict[str, str] = {}
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            post_id = POSTS[i % len(POSTS)]
            body = {"post_id": post_id, "uid": "w", "message": f"m{i}"}
            async with http.post(f"{nginx.url}/v1/comments", json=body) as r:
                assert r.status == 201, await r.text()  # a draining node still takes POSTs
                acked[(await r.json())["comment"]["id"]] = post_id
            i += 1
            await asyncio.sleep(0.01)

    try:
        for viewer in viewers:
            await viewer.wait_positioned(10)
        _, before = await readyz(http, a)
        assert before["connections"] > 0, "round-robin put no viewer on a"
        writer = asyncio.create_task(write())
        a.signal(signal.SIGUSR1)  # drain, and stay up
        await wait_for(lambda: _draining(http, a), 5, "a draining")
        accepted_at_drain = await metric(http, a, "ws_connections_accepted_total")
        await wait_for(lambda: _connections(http, a, 0), DRAIN_SECONDS + 5, "every viewer off a")
        stop.set()  # the writer kept going across the hand-over
        await writer
        expected: dict[str, set[str]] = {p: set() for p in POSTS}
        for comment_id, post_id in acked.items():
            expected[post_id].add(comment_id)
        await settle(viewers, expected, 30)
        for viewer in viewers:
            assert viewer.duplicates == [] and viewer.offset_violations == [], viewer.name
        assert await metric(http, a, "ws_connections_accepted_total") == accepted_at_drain
        await wait_for(lambda: _connections(http, b, VIEWERS), 10, "every viewer on b")
        status, drained = await readyz(http, a)
        assert status == 503 and drained["not_ready"] == ["draining"]
    finally:
        for viewer in viewers:
            await viewer.stop()
        nginx.stop()
    # nginx tried a and was sent on: an upgrade a answered 503, then b answered 101.
    retried = [
        e
        for e in nginx.access_log_entries()
        if e.request.startswith("GET /v1/ws") and e.upstream_statuses[:1] == ["503"]
    ]
    assert retried and all(e.upstream_statuses[-1] == "101" for e in retried)
    assert all(e.upstream_port == b.port for e in retried)


async def _draining(http: aiohttp.ClientSession, server: ServerProcess) -> bool:
    status, body = await readyz(http, server)
    return status == 503 and "draining" in body["not_ready"]


async def _connections(http: aiohttp.ClientSession, server: ServerProcess, want: int) -> bool:
    return (await readyz(http, server))[1]["connections"] == want
