"""The rate and connection limits against real servers, each with its refusal counted.

- comments per author: a flood is cut at the bucket's burst on every instance together (Redis
  shares the bucket), 429 with Retry-After; another author is not touched;
- per client address, through a real nginx (X-Forwarded-For from a trusted proxy): open
  WebSockets and new ones per second, 429 on the upgrade; a client's own X-Forwarded-For is
  not believed;
- per socket: frames per second, close 1008, other sockets untouched;
- per instance: `max_connections` counts connections that have not sent a request.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.metrics import scrape
from tests.support.nginx import Nginx
from tests.support.recording import Socket, listed
from tests.support.redis_servers import RedisServer, redis_servers
from tests.support.server import ServerProcess
from tests.support.tokens import bearer, jwt_env, mint
from tests.support.wait import wait_for

DEADLINE = 10.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_servers(tmp_path / "redis") as servers:
        yield servers.start(1)[0]


async def post_status(
    http: aiohttp.ClientSession, server: ServerProcess, headers: dict[str, str], n: int
) -> tuple[int, dict[str, str]]:
    body = {"post_id": "p", "message": f"m{n}"}
    async with http.post(f"{server.url}/v1/comments", json=body, headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_a_comment_flood_is_cut_at_the_burst_on_every_instance_together(
    start_server, http, redis: RedisServer
):
    env = jwt_env(
        LIVECOMMENTS_REDIS_URLS=redis.url,
        LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE="6",  # one every 10 s: none refill meanwhile
        LIVECOMMENTS_LIMITS_COMMENTS_BURST="5",
    )
    a, b = start_server("a", env=env), start_server("b", env=env)
    alice, bob = bearer(mint("alice")), bearer(mint("bob"))
    answers = [await post_status(http, (a, b)[n % 2], alice, n) for n in range(12)]
    statuses = [status for status, _ in answers]
    assert statuses == [201] * 5 + [429] * 7, statuses
    for _, headers in answers[5:]:
        assert 1 <= int(headers["Retry-After"]) <= 10
    assert (await post_status(http, b, bob, 0))[0] == 201  # another author has their own
    assert len(await listed(http, a, "p")) == 6
    refused = 0.0
    for server in (a, b):
        refused += (await scrape(http, server)).get('rate_limited_total{limit="comments"}', 0)
    assert refused == 7


async def test_open_mode_limits_an_unverified_author_by_address(start_server, http):
    server = start_server(
        env={
            "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "6",
            "LIVECOMMENTS_LIMITS_COMMENTS_BURST": "3",
        }
    )
    statuses = []
    for n in range(6):  # a fresh uid each time does not buy a fresh bucket
        body = {"post_id": "p", "uid": f"sock-puppet-{n}", "message": "spam"}
        async with http.post(f"{server.url}/v1/comments", json=body) as r:
            statuses.append(r.status)
    assert statuses == [201] * 3 + [429] * 3


def session_from(address: str) -> aiohttp.ClientSession:
    """A client on another loopback address: another client, as nginx and we see it."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def upgrade_status(http: aiohttp.ClientSession, url: str, **options: Any) -> int:
    try:
        ws = await http.ws_connect(url, **options)
    except aiohttp.WSServerHandshakeError as e:
        return e.status
    await ws.close()
    return 101


async def test_per_address_socket_limits_see_the_client_behind_nginx(start_server, tmp_path):
    server = start_server(
        env={
            "LIVECOMMENTS_LIMITS_WS_PER_IP": "3",
            "LIVECOMMENTS_LIMITS_WS_CONNECTS_PER_IP_PER_SECOND": "0.2",
            "LIVECOMMENTS_LIMITS_WS_CONNECTS_BURST": "4",
        }
    )
    nginx = Nginx(tmp_path / "nginx", [server.port]).start()
    url = f"{nginx.ws_url}?post_id=p"
    try:
        async with session_from("127.0.0.2") as one, session_from("127.0.0.3") as two:
            held = [await one.ws_connect(url) for _ in range(3)]
            # One client's fourth open socket is refused, with a Retry-After:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await one.ws_connect(url)
            assert refused.value.status == 429
            assert int(refused.value.headers["Retry-After"]) >= 1
            # ... and a client naming someone else in X-Forwarded-For is still itself:
            spoof = {"X-Forwarded-For": "198.51.100.7"}
            assert await upgrade_status(one, url, headers=spoof) == 429
            # Another client is not touched, until its own connect rate is spent (burst 4):
            assert [await upgrade_status(two, url) for _ in range(5)] == [101] * 4 + [429]
            for ws in held:
                await ws.close()
    finally:
        nginx.stop()
    async with aiohttp.ClientSession() as http:
        metrics = await scrape(http, server)
    assert metrics.get('rate_limited_total{limit="ws_per_ip"}', 0) == 2
    assert metrics.get('rate_limited_total{limit="ws_connects_per_ip"}', 0) == 1


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(start_server):
    server = start_server(
        env={"LIVECOMMENTS_LIMITS_WS_PER_IP": "1", "LIVECOMMENTS_HTTP_TRUSTED_PROXIES": ""}
    )
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(f"{server.ws_url}", headers={"X-Forwarded-For": "192.0.2.1"})
        other = {"X-Forwarded-For": "192.0.2.2"}
        assert await upgrade_status(http, server.ws_url, headers=other) == 429
        await first.close()


async def test_a_frame_flood_closes_that_socket_alone(start_server, http):
    server = start_server(
        env={
            "LIVECOMMENTS_LIMITS_FRAMES_PER_SECOND": "5",
            "LIVECOMMENTS_LIMITS_FRAMES_BURST": "10",
            "LIVECOMMENTS_LIMITS_POSTS_PER_SOCKET": "10",
        }
    )
    flood = await Socket.open(http, server)
    calm = await Socket.open(http, server, "post_id=p")
    for _ in range(50):
        if flood.ws.closed:
            break
        await flood.send(type="ping")
    assert await flood.closed() == 1008
    assert len(flood.of("pong")) <= 10
    await calm.send(type="ping")
    await calm.wait(lambda: calm.of("pong"), "the calm socket's pong")
    assert not calm.ws.closed
    await calm.close()


def idle_connection(port: int) -> socket.socket:
    """A connection that never sends its request (a slowloris, or a slow client)."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def cut_at_once(sock: socket.socket) -> bool:
    """The server closed it (EOF or reset) before the socket's 5 s timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_max_connections_counts_connections_that_sent_no_request(start_server, http):
    server = start_server(env={"LIVECOMMENTS_LIMITS_MAX_CONNECTIONS": "4"})
    idle = [idle_connection(server.port) for _ in range(4)]
    try:
        extra = idle_connection(server.port)
        # Closed at once: no HTTP answer, nothing read.
        assert await asyncio.to_thread(cut_at_once, extra)
        extra.close()
    finally:
        for sock in idle:
            sock.close()

    async def answers() -> bool:
        try:
            async with http.get(f"{server.url}/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(answers, DEADLINE, "room again once the idle connections left")
    assert (await scrape(http, server)).get("connections_refused_total", 0) >= 1
