"""A real server on a real PostgreSQL that goes away: nothing acknowledged may be lost.

Each test runs the service as a subprocess against a fresh database in a private cluster
(tests/support/pg_cluster.py), stops or crashes that cluster (and the service) while comments are
posted, brings it back, and then checks the database itself: every comment that got a 201 is
there exactly once, in its post, and GET lists them all.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import astuple
from typing import Any

import aiohttp
import asyncpg
import pytest

from livecomments.model.comment import Comment
from tests.conftest import StartServer
from tests.support.metrics import scrape as metrics
from tests.support.pg_cluster import PgCluster, pg_cluster, pg_url
from tests.support.server import REPO, ServerProcess, free_port
from tests.support.wait import wait_for as until

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest

# Acknowledged comments: id -> (post_id, message).
Acked = dict[int, tuple[str, str]]

# Seconds the database stays down while comments are posted.
OUTAGE = 3.0


def pg_env(url: str, **extra: str) -> dict[str, str]:
    # A short backoff cap, so the flusher notices the database is back within a second.
    return {"LIVECOMMENTS_STORE_URL": url, "LIVECOMMENTS_QUEUE_RETRY_MAX": "0.3", **extra}


async def post(
    http: aiohttp.ClientSession, server: ServerProcess, post_id: str, message: str
) -> tuple[int, Any, Mapping[str, str]]:
    body = {"post_id": post_id, "uid": "u1", "message": message}
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        return r.status, await r.json(), r.headers


async def post_acked(
    http: aiohttp.ClientSession, server: ServerProcess, acked: Acked, post_id: str, message: str
) -> None:
    """POST one comment; it must be acknowledged, and is recorded as such."""
    status, body, _ = await post(http, server, post_id, message)
    assert status == 201, body
    acked[int(body["comment"]["id"])] = (post_id, message)


async def post_several(
    http: aiohttp.ClientSession, server: ServerProcess, acked: Acked, n: int, tag: str
) -> None:
    await asyncio.gather(
        *(post_acked(http, server, acked, f"p{i % 3}", f"{tag}-{i}") for i in range(n))
    )


async def get_json(http: aiohttp.ClientSession, url: str, **params: Any) -> tuple[int, Any]:
    async with http.get(url, params=params) as r:
        return r.status, await r.json()


async def readyz(http: aiohttp.ClientSession, server: ServerProcess) -> tuple[int, Any]:
    return await get_json(http, f"{server.url}/readyz")


async def wait_drained(http: aiohttp.ClientSession, server: ServerProcess, timeout: float) -> None:
    async def drained() -> bool:
        _, body = await readyz(http, server)
        return bool(body["store"]["status"] == "ok" and body["store"]["queue_depth"] == 0)

    await until(drained, timeout, "the queue to drain into PostgreSQL")


async def stored_rows(url: str) -> list[tuple[int, str, str]]:
    con = await asyncpg.connect(url, timeout=10)
    try:
        rows = await con.fetch("SELECT id, post_id, message FROM comments")
    finally:
        await con.close()
    return [(row["id"], row["post_id"], row["message"]) for row in rows]


async def assert_stored_exactly_once(url: str, acked: Acked) -> None:
    rows = await stored_rows(url)
    assert len(rows) == len(acked), "a comment is missing or stored twice"
    assert {row[0]: (row[1], row[2]) for row in rows} == acked


async def listed(http: aiohttp.ClientSession, server: ServerProcess, post_id: str) -> list[int]:
    """Every comment GET lists for a post, walking back page by page."""
    ids: list[int] = []
    params: dict[str, Any] = {"post_id": post_id, "limit": 200}
    while True:
        status, body = await get_json(http, f"{server.url}/v1/comments", **params)
        assert status == 200, body
        page = [int(c["id"]) for c in body["comments"]]
        ids = page + ids
        if not body["has_more"]:
            return ids
        params["before"] = page[0]


async def assert_listed(http: aiohttp.ClientSession, server: ServerProcess, acked: Acked) -> None:
    for post_id in {p for p, _ in acked.values()}:
        expected = sorted(i for i, (p, _) in acked.items() if p == post_id)
        assert await listed(http, server, post_id) == expected


async def assert_store_unavailable(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    async with http.get(f"{server.url}/v1/comments", params={"post_id": "p0"}) as r:
        body = await r.json()
        assert r.status == 503, body
        assert body["error"]["code"] == "store_unavailable"
        assert "Retry-After" in r.headers


# -- an outage under load -------------------------------------------------------------------


@pytest.mark.fault
async def test_outage_under_load_loses_nothing(
    pg_cluster: PgCluster, pg_url: str, start_server: StartServer, http: aiohttp.ClientSession
):
    server = start_server(env=pg_env(pg_url))
    acked: Acked = {}
    await post_several(http, server, acked, 30, "before")
    async with http.ws_connect(f"{server.ws_url}?post_id=p0") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        earlier = set(acked)
        live: list[int] = []

        async def listen() -> None:
            async for msg in ws:
                event = msg.json()
                if event["type"] == "comment":
                    live.append(int(event["comment"]["id"]))

        listener = asyncio.create_task(listen())
        loading = asyncio.Event()
        loading.set()

        async def load(worker: int) -> None:
            n = 0
            while loading.is_set():
                await post_acked(http, server, acked, f"p{(worker + n) % 3}", f"w{worker}-{n}")
                n += 1

        workers = [asyncio.create_task(load(w)) for w in range(8)]
        await asyncio.to_thread(pg_cluster.stop, "fast")
        stopped_at = time.monotonic()
        depth_before = len(acked)

        async def degraded() -> bool:
            status, body = await readyz(http, server)
            return bool(status == 200 and body["store"]["status"] == "degraded")

        await until(degraded, 10, "/readyz to report the store degraded")
        # Comments keep coming in; the queue holds them, and says how old the oldest is.
        target = depth_before + 50
        await until(lambda: _more(acked, target), 10, "POSTs during the outage")
        status, body = await readyz(http, server)
        assert status == 200 and body["status"] == "degraded", body
        assert body["not_ready"] == []
        assert body["store"]["queue_depth"] > 0
        assert body["store"]["oldest_unflushed_age_s"] > 0
        assert body["store"]["last_error"]
        await assert_store_unavailable(http, server)
        m = await metrics(http, server)
        assert m["store_up"] == 0 and m["flush_errors_total"] > 0 and m["queue_depth"] > 0

        # The outage lasts OUTAGE seconds: a chosen length, not a wait for something.
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped_at)))
        await asyncio.to_thread(pg_cluster.start)
        target = len(acked) + 50
        await until(lambda: _more(acked, target), 10, "POSTs after the restart")
        loading.clear()
        await asyncio.gather(*workers)

        # Live delivery never depended on the database.
        expected_live = sorted(i for i, (p, _) in acked.items() if p == "p0" and i not in earlier)
        await until(
            lambda: _true(sorted(live) == expected_live),
            10,
            "every p0 comment to arrive on the socket",
        )
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

    await wait_drained(http, server, 20)
    await assert_stored_exactly_once(pg_url, acked)
    await assert_listed(http, server, acked)
    m = await metrics(http, server)
    assert m["store_up"] == 1 and m["queue_depth"] == 0
    assert m["flushed_total"] >= len(acked)  # more if a batch committed but its reply was lost
    assert server.stop() == 0


async def _more(acked: Acked, n: int) -> bool:
    return len(acked) >= n


async def _true(value: bool) -> bool:
    return value


# -- read-your-writes while the flusher is held up ------------------------------------------


async def test_get_lists_queued_comments_before_the_database_has_them(
    pg_url: str, start_server: StartServer, http: aiohttp.ClientSession
):
    server = start_server(env=pg_env(pg_url))
    acked: Acked = {}
    await post_several(http, server, acked, 5, "stored")
    await wait_drained(http, server, 10)
    blocker = await asyncpg.connect(pg_url, timeout=10)
    try:
        async with blocker.transaction():
            # SHARE blocks INSERT (so the flusher waits) but not SELECT (so GET still works).
            await blocker.execute("LOCK TABLE comments IN SHARE MODE")
            await post_several(http, server, acked, 5, "queued")
            assert len(await stored_rows(pg_url)) == 5
            await assert_listed(http, server, acked)
            _, body = await readyz(http, server)
            assert body["store"]["queue_depth"] == 5
    finally:
        await blocker.close()
    await wait_drained(http, server, 20)
    await assert_stored_exactly_once(pg_url, acked)


# -- a crash of the app during the outage ---------------------------------------------------


@pytest.mark.fault
async def test_kill_during_outage_then_restart_loses_nothing(
    pg_cluster: PgCluster, pg_url: str, start_server: StartServer, http: aiohttp.ClientSession
):
    env = pg_env(pg_url)
    app = start_server(name="app", env=env)
    acked: Acked = {}
    await post_several(http, app, acked, 20, "a")
    await wait_drained(http, app, 10)
    pg_cluster.stop("immediate")
    queued: Acked = {}
    await post_several(http, app, queued, 40, "b")
    app.kill()

    # Back up while the database is still down: the queue is replayed from disk.
    app = start_server(name="app", env=env, data_dir=app.data_dir)
    status, body = await readyz(http, app)
    assert status == 200 and body["status"] == "degraded", body
    assert body["store"]["queue_depth"] == len(queued)
    await assert_store_unavailable(http, app)
    await post_several(http, app, queued, 10, "c")
    app.kill()

    # A crash can also fall between a flush's commit and the queue's delete: those comments
    # are then flushed again. Do to half of them what that flush did, then let the app replay.
    pg_cluster.start()
    # What that flush stored is the queued comment itself, every field: read it from the queue.
    with sqlite3.connect(app.data_dir / "queue" / "queue.db") as queue_db:
        rows = queue_db.execute("SELECT payload FROM queue ORDER BY id").fetchall()
    replayed = [Comment.decode(payload) for (payload,) in rows[: len(queued) // 2]]
    con = await asyncpg.connect(pg_url, timeout=10)
    try:
        await con.executemany(
            "INSERT INTO comments (id, post_id, uid, message, parent_id, reply_to, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [astuple(c) for c in replayed],
        )
    finally:
        await con.close()

    app = start_server(name="app", env=env, data_dir=app.data_dir)
    await wait_drained(http, app, 20)
    acked.update(queued)
    await assert_stored_exactly_once(pg_url, acked)
    await assert_listed(http, app, acked)
    assert app.stop() == 0


# -- the queue's size limit -----------------------------------------------------------------


@pytest.mark.fault
async def test_full_queue_refuses_with_retry_after_and_keeps_what_it_took(
    pg_cluster: PgCluster, pg_url: str, start_server: StartServer, http: aiohttp.ClientSession
):
    server = start_server(env=pg_env(pg_url, LIVECOMMENTS_QUEUE_MAX_BYTES="4096"))
    pg_cluster.stop("fast")
    acked: Acked = {}
    refused = None
    for n in range(500):
        status, body, headers = await post(http, server, f"p{n % 3}", f"m-{n}")
        if status != 201:
            refused = (status, body, headers)
            break
        acked[int(body["comment"]["id"])] = (f"p{n % 3}", f"m-{n}")
    assert refused is not None, "4 KiB of queue took 500 comments"
    status, body, headers = refused
    assert status == 503 and body["error"]["code"] == "queue_full", body
    assert int(headers["Retry-After"]) > 0
    assert 10 < len(acked) < 40  # ~150 bytes each
    ready_status, ready = await readyz(http, server)
    assert ready_status == 503 and ready["not_ready"] == ["queue_full"], ready
    assert ready["store"]["queue_depth"] == len(acked), ready
    assert ready["store"]["queue_bytes"] > 4096 - 200, ready
    assert (await metrics(http, server))["comments_rejected_total"] >= 1

    pg_cluster.start()
    await wait_drained(http, server, 20)
    await assert_stored_exactly_once(pg_url, acked)
    await post_acked(http, server, acked, "p0", "room again")
    await wait_drained(http, server, 10)
    await assert_stored_exactly_once(pg_url, acked)
    assert (await readyz(http, server))[0] == 200


# -- `livecomments migrate` ------------------------------------------------------------------


def migrate(url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    env["LIVECOMMENTS_STORE_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "livecomments", "--config", os.devnull, "migrate"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


async def schema_versions(url: str) -> list[int]:
    con = await asyncpg.connect(url, timeout=10)
    try:
        return [r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")]
    finally:
        await con.close()


async def test_migrate_command_twice_then_twice_at_once(pg_cluster: PgCluster, pg_url: str):
    for _ in range(2):
        code, out = finish(migrate(pg_url))
        assert code == 0, out
    assert await schema_versions(pg_url) == [1, 2, 3]

    fresh = pg_cluster.create_database()
    racers = [migrate(fresh) for _ in range(2)]
    for code, out in map(finish, racers):
        assert code == 0, out
    assert await schema_versions(fresh) == [1, 2, 3]


def test_migrate_command_fails_promptly_without_a_database():
    started = time.monotonic()
    code, out = finish(migrate(f"postgresql://postgres@127.0.0.1:{free_port()}/none"))
    assert code == 1, out
    assert "migrate:" in out
    assert time.monotonic() - started < 30
