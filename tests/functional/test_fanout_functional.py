"""Live fan-out under faults: a peer that stops reading, a dead peer, and a clean shutdown."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.support.metrics import wait_metric
from tests.support.raw_ws import RawWebSocket
from tests.support.server import ServerProcess

# Enough bytes (3000 x ~1.9 KiB) to fill the loopback socket buffers (tcp_wmem max 4 MiB) and
# then the 256 KiB outbox of a peer that does not read.
FLOOD = 3000


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


async def flood(http, server: ServerProcess, post_id: str, sent_at: dict[str, float]) -> None:
    """POST FLOOD comments of ~1.9 KiB, 20 at a time, recording when each was sent."""
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            body = {"post_id": post_id, "uid": "flood", "message": f"{i} " + "x" * 1900}
            t0 = time.monotonic()
            async with http.post(f"{server.url}/v1/comments", json=body) as r:
                assert r.status == 201
                sent_at[(await r.json())["comment"]["id"]] = t0

    await asyncio.gather(*(one(i) for i in range(FLOOD)))


async def collect(ws: aiohttp.ClientWebSocketResponse, n: int) -> dict[str, float]:
    """Arrival time of each of the next n comments (handles single and batched events)."""
    arrived: dict[str, float] = {}
    while len(arrived) < n:
        msg = await ws.receive(timeout=20)
        assert msg.type == WSMsgType.TEXT, msg
        event: dict[str, Any] = msg.json()
        now = time.monotonic()
        comments = event.get("comments") or [event["comment"]]
        for c in comments:
            assert c["id"] not in arrived, "delivered twice"
            arrived[c["id"]] = now
    return arrived


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99) - 1]


@pytest.mark.fault
async def test_a_reader_that_stops_reading_does_not_delay_a_healthy_one(start_server, http):
    server = start_server(
        env={
            "LIVECOMMENTS_WEBSOCKET_OUTBOX_MAX_BYTES": str(256 * 1024),
        }
    )
    assert server.proc is not None
    async with http.ws_connect(f"{server.ws_url}?post_id=hot") as healthy:
        assert (await healthy.receive_json(timeout=5))["type"] == "subscribed"

        # Baseline: the healthy reader alone, in this same run.
        sent: dict[str, float] = {}
        arrivals = asyncio.create_task(collect(healthy, FLOOD))
        await flood(http, server, "hot", sent)
        got = await asyncio.wait_for(arrivals, 60)
        baseline = p99([got[i] - sent[i] for i in sent])
        rss_before = rss_kib(server.proc.pid)

        stalled = await asyncio.to_thread(RawWebSocket, server.port, "/v1/ws?post_id=hot")
        try:
            await wait_metric(http, server, "ws_connections", 2)
            sent.clear()
            arrivals = asyncio.create_task(collect(healthy, FLOOD))
            await flood(http, server, "hot", sent)
            got = await asyncio.wait_for(arrivals, 60)
            with_stalled = p99([got[i] - sent[i] for i in sent])
            rss_after = rss_kib(server.proc.pid)
            await wait_metric(http, server, "slow_consumer_closes_total", 1)
            code, _ = await asyncio.to_thread(stalled.read_until_closed, 15)
        finally:
            stalled.close()

    assert code in (4008, None)  # None: the close frame was cut with the connection
    # The healthy reader got everything, about as fast as with nobody stalled beside it.
    assert with_stalled < max(0.5, baseline * 5), (baseline, with_stalled)
    # The stalled socket's backlog is bounded by its outbox (256 KiB) and the kernel buffers.
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)


@pytest.mark.fault
async def test_heartbeat_drops_a_peer_that_never_answers_pings(start_server, http):
    server = start_server(env={"LIVECOMMENTS_WEBSOCKET_HEARTBEAT": "0.5"})
    dead = await asyncio.to_thread(RawWebSocket, server.port, "/v1/ws?post_id=p")
    try:
        await wait_metric(http, server, "ws_connections", 1)
        await wait_metric(http, server, "ws_connections", 0, timeout=10)
        await wait_metric(http, server, "posts_followed", 0)
    finally:
        dead.close()


async def test_sigterm_drains_sockets_then_flushes_and_exits(start_server, http, tmp_path):
    """SIGTERM hands viewers over before stopping: `reconnect`, then a close with 1012
    (service restart); then the queue is flushed and the process exits 0."""
    data = tmp_path / "node"
    server = start_server(data_dir=data, env={"LIVECOMMENTS_SERVER_DRAIN_SECONDS": "0.5"})
    async with http.ws_connect(f"{server.ws_url}?post_id=p") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        ids = []
        for i in range(20):
            body = {"post_id": "p", "uid": "u", "message": f"m{i}"}
            async with http.post(f"{server.url}/v1/comments", json=body) as r:
                ids.append((await r.json())["comment"]["id"])
        for _ in range(20):
            assert (await ws.receive_json(timeout=5))["type"] == "comment"
        server.signal(15)
        assert (await ws.receive_json(timeout=5)) == {"type": "reconnect"}
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1012
    assert server.stop() == 0
    with sqlite3.connect(Path(data) / "comments.db") as db:
        stored = {str(r[0]) for r in db.execute("SELECT id FROM comments")}
    assert set(ids) <= stored
    assert "stopped" in server.logs()


@pytest.mark.fault
async def test_shutdown_timeout_bounds_the_whole_stop(start_server, http):
    """A request that never finishes and a database that is down: SIGTERM still exits within
    server.shutdown_timeout (plus start-up slack), not once per thing it waits for."""
    timeout = 3.0
    env = {
        "LIVECOMMENTS_SERVER_SHUTDOWN_TIMEOUT": str(timeout),
        "LIVECOMMENTS_STORE_URL": "postgresql://nobody@127.0.0.1:1/none",  # refused at once
        # An explicit id: with -1, a first start without its store takes no comments.
        "LIVECOMMENTS_SERVER_INSTANCE_ID": "1",
    }
    server = start_server(env=env)
    body = {"post_id": "p", "uid": "u", "message": "stays queued"}
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        assert r.status == 201
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/comments HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()  # a body that never arrives: the request stays open
    started = time.monotonic()
    assert await asyncio.to_thread(server.stop, 20) == 0
    assert time.monotonic() - started < timeout + 1.5
    assert "stay queued for the next start" in server.logs()
    writer.close()
