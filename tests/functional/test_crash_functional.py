"""kill -9 with POSTs in flight: every comment that got a 201 comes back, none twice."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

POSTS = [f"crash-{i}" for i in range(5)]
WORKERS = 60


async def all_comments(http: aiohttp.ClientSession, url: str, post_id: str) -> list[dict[str, Any]]:
    """Page through a post with `after` (the catch-up path) until has_more is false."""
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"post_id": post_id, "limit": 200, "after": 0}
    for _ in range(1000):  # bounded: 200k comments at most
        async with http.get(f"{url}/v1/comments", params=params) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        out += body["comments"]
        if not body["has_more"]:
            return out
        params["after"] = body["comments"][-1]["id"]
    raise AssertionError("paging did not end")


async def post_until_killed(
    http: aiohttp.ClientSession, url: str, worker: int, acked: list[dict[str, Any]]
) -> None:
    for n in range(100_000):
        body = {"post_id": POSTS[n % len(POSTS)], "uid": f"w{worker}", "message": f"{worker}/{n}"}
        try:
            async with http.post(f"{url}/v1/comments", json=body) as r:
                if r.status != 201:
                    return
                acked.append((await r.json())["comment"])
        except (TimeoutError, aiohttp.ClientError):
            return  # the server died under us: this one's fate is unknown, and that is allowed


@pytest.mark.fault
async def test_kill_9_mid_load_loses_no_acknowledged_comment(start_server, tmp_path: Path):
    data = tmp_path / "node"
    server = start_server(data_dir=data)
    acked: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=WORKERS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        workers = [
            asyncio.create_task(post_until_killed(http, server.url, w, acked))
            for w in range(WORKERS)
        ]
        for _ in range(600):  # up to 30 s for 400 acknowledgements
            if len(acked) >= 400:
                break
            await asyncio.sleep(0.05)
        assert len(acked) >= 400, server.logs()
        server.kill()  # SIGKILL while ~WORKERS requests are in flight
        await asyncio.wait_for(asyncio.gather(*workers), 30)

    restarted = start_server(data_dir=data, name="restarted")
    async with aiohttp.ClientSession() as http:
        stored = [c for p in POSTS for c in await all_comments(http, restarted.url, p)]
    stored_ids = Counter(c["id"] for c in stored)
    assert not [i for i, n in stored_ids.items() if n > 1], "a comment is listed twice"
    messages = Counter((c["uid"], c["message"]) for c in stored)
    assert not [m for m, n in messages.items() if n > 1], "one POST became two comments"
    missing = [c for c in acked if c["id"] not in stored_ids]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged comments lost"
    by_id = {c["id"]: c for c in stored}
    assert all(by_id[c["id"]] == c for c in acked), "a comment came back different"

    # A clean stop flushes the replayed queue into the database itself.
    assert restarted.stop() == 0
    with sqlite3.connect(data / "comments.db") as db:
        rows = db.execute("SELECT id, COUNT(*) FROM comments GROUP BY id").fetchall()
        in_db = {str(i) for i, n in rows}
        assert all(n == 1 for _, n in rows)
    assert {c["id"] for c in acked} <= in_db
    with sqlite3.connect(data / "queue" / "queue.db") as q:
        assert q.execute("SELECT COUNT(*) FROM queue").fetchone() == (0,)
