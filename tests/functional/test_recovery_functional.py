"""The ways viewers used to miss acknowledged comments, each reproduced on purpose (gates, not
sleeps), each now answered by positions and the durable outbox (issue 10):

1. a catch-up that ran before another instance flushed what it had acknowledged;
2. arrival order that is not id order (a remote comment late, its id older than what a viewer
   already had) across a reconnect;
3. kill -9 after the 201, before the comment left the process for the other instances;
plus what the outbox promises beside them: a comment whose shard is down is shown locally with a
null offset and delivered with its offset once the shard is back, and a comment delivered but
not yet in the database survives its stream losing its history (Redis restarted empty).
(4., a failed catch-up retried, is the clients' part: tests/functional/
test_page_browser_functional.py holds the page to it.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from livecomments.live.redis import streams
from tests.support.pg_cluster import PgCluster, pg_cluster, pg_url
from tests.support.recording import Socket, listed, post
from tests.support.redis_servers import DeafeningProxy, RedisServer, redis_servers
from tests.support.server import ServerProcess, free_port
from tests.support.wait import wait_for

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest

DEADLINE = 20.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_servers(tmp_path / "redis") as servers:
        yield servers.start(1)[0]


@pytest.fixture
async def proxy(redis: RedisServer) -> AsyncIterator[DeafeningProxy]:
    p = await DeafeningProxy(redis.port).start()
    yield p
    p.release_requests()
    await p.close()


def env(redis_url: str, store_url: str, **extra: str) -> dict[str, str]:
    return {
        "LIVECOMMENTS_REDIS_URLS": redis_url,
        "LIVECOMMENTS_REDIS_TIMEOUT": "1.0",
        "LIVECOMMENTS_REDIS_PROBE_INTERVAL": "1.0",
        "LIVECOMMENTS_STORE_URL": store_url,
        **extra,
    }


# -- 1. another instance has not flushed yet -----------------------------------------------


@pytest.mark.fault
async def test_a_viewer_back_on_another_instance_gets_what_that_one_never_stored(
    start_server, http, redis: RedisServer, pg_cluster: PgCluster, pg_url: str
):
    a = start_server("a", env=env(redis.url, pg_url))
    c = start_server("c", env=env(redis.url, pg_url))
    viewer = await Socket.open(http, a, "post_id=one")
    await viewer.wait(lambda: viewer.of("subscribed"), "subscribed")
    first = await post(http, c, "one", "before")
    await viewer.wait(lambda: len(viewer.comments()) == 1, "the first comment")
    epoch = viewer.of("subscribed")[0]["epoch"]
    await viewer.close()
    pg_cluster.stop("fast")  # nobody flushes: the next comment is only in c's queue
    try:
        missed = await post(http, c, "one", "while away")
        back = await Socket.open(http, a, f"post_id=one&epoch={epoch}&offset=1")
        await back.wait(back.comments, "the replay")
        assert back.of("subscribed")[0]["recovered"] is True
        assert back.comments() == [(2, missed)]
    finally:
        pg_cluster.start()
    # GET on a lists it too: from the stream's history, before c flushed it (before, a listed
    # only its database and its own queue).
    await wait_for(lambda: _has(http, a, missed), DEADLINE, "GET on a")
    assert first in await listed(http, a, "one")
    await back.close()


async def _has(http: aiohttp.ClientSession, server: ServerProcess, comment_id: str) -> bool:
    try:
        return comment_id in await listed(http, server, "one")
    except AssertionError:
        return False  # 503 while the database comes back


# -- 2. arrival order is not id order ------------------------------------------------------


@pytest.mark.fault
async def test_a_late_comment_with_an_older_id_is_not_skipped_across_a_reconnect(
    start_server, http, redis: RedisServer, proxy: DeafeningProxy, tmp_path: Path
):
    store = f"sqlite:///{tmp_path}/shared.db"
    a = start_server("a", env=env(redis.url, store))
    b = start_server("b", env=env(proxy.url, store))  # b reaches Redis through the proxy
    await wait_for(lambda: _broker_ok(http, b), DEADLINE, "b connected")
    viewer = await Socket.open(http, a, "post_id=two")
    witness = await Socket.open(http, a, "post_id=two")
    await viewer.wait(lambda: viewer.of("subscribed") and witness.of("subscribed"), "subscribed")
    epoch = viewer.of("subscribed")[0]["epoch"]
    proxy.hold_requests()  # b's comment will be late: its append has not reached Redis
    older = await post(http, b, "two", "older, late")
    newer = await post(http, a, "two", "newer, on time")
    assert int(older) < int(newer)
    await viewer.wait(lambda: viewer.comments() == [(1, newer)], "the newer comment")
    await viewer.close()  # the viewer's connection drops...
    proxy.release_requests()  # ...and the late comment arrives while it is away
    await witness.wait(lambda: len(witness.comments()) == 2, "the late comment")
    assert witness.comments() == [(1, newer), (2, older)]
    back = await Socket.open(http, a, f"post_id=two&epoch={epoch}&offset=1")
    await back.wait(back.comments, "the replay")
    assert back.of("subscribed")[0]["recovered"] is True
    assert back.comments() == [(2, older)]  # a catch-up by id ("after the newest") skipped it
    await asyncio.gather(witness.close(), back.close())


async def _broker_ok(http: aiohttp.ClientSession, server: ServerProcess) -> bool:
    async with http.get(f"{server.url}/readyz") as r:
        return bool((await r.json())["broker"]["status"] == "ok")


# -- 3. kill -9 between the 201 and the publication ----------------------------------------


@pytest.mark.fault
async def test_a_comment_acknowledged_just_before_kill_9_reaches_other_instances_after_restart(
    start_server, http, redis: RedisServer, tmp_path: Path
):
    store = f"sqlite:///{tmp_path}/shared.db"
    a = start_server("a", env=env(redis.url, store))
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # b cannot append: it stays in b's outbox
    b = start_server("b", env=env(nowhere, store))
    viewer = await Socket.open(http, a, "post_id=three")
    await viewer.wait(lambda: viewer.of("subscribed"), "subscribed")
    acked = await post(http, b, "three", "acknowledged, never published")
    b.kill()
    b.extra_env["LIVECOMMENTS_REDIS_URLS"] = redis.url  # one server: the same ring
    b.start()
    await viewer.wait(viewer.comments, "the comment, live")
    assert viewer.comments() == [(1, acked)]
    await viewer.close()


# -- the outbox beside them ----------------------------------------------------------------


@pytest.mark.fault
async def test_a_comment_whose_shard_is_down_is_shown_at_once_then_delivered_in_order(
    start_server, http, redis: RedisServer, proxy: DeafeningProxy, tmp_path: Path
):
    server = start_server("a", env=env(proxy.url, f"sqlite:///{tmp_path}/c.db"))
    await wait_for(lambda: _broker_ok(http, server), DEADLINE, "connected")
    viewer = await Socket.open(http, server, "post_id=four")
    await viewer.wait(lambda: viewer.of("subscribed"), "subscribed")
    proxy.hold_requests()
    during = await post(http, server, "four", "while the shard does not answer")
    await viewer.wait(viewer.comments, "shown with a null offset")
    assert viewer.comments() == [(None, during)]
    proxy.release_requests()
    await viewer.wait(lambda: len(viewer.comments()) == 2, "then with its offset")
    assert viewer.comments() == [(None, during), (1, during)]
    await viewer.close()


@pytest.mark.fault
async def test_a_comment_delivered_but_not_stored_survives_its_stream_losing_its_history(
    start_server, http, redis: RedisServer, pg_cluster: PgCluster, pg_url: str
):
    server = start_server("a", env=env(redis.url, pg_url))
    viewer = await Socket.open(http, server, "post_id=five")
    await viewer.wait(lambda: viewer.of("subscribed"), "subscribed")
    pg_cluster.stop("fast")
    try:
        comment_id = await post(http, server, "five", "delivered, not yet stored")
        await viewer.wait(lambda: viewer.comments() == [(1, comment_id)], "delivered")
        redis.restart()  # empty: the stream, its history and the comment's place in it are gone
        await viewer.wait(lambda: viewer.of("reset"), "a reset")
        index = streams.keys("five")[2]

        def appended_again() -> bool:
            rows = redis.command("ZRANGE", index, 0, -1)
            return any(row.startswith(streams.padded(int(comment_id)).encode()) for row in rows)

        # Appended into the new epoch by the outbox, though nobody posted anything since: so a
        # reload finds it (GET merges the history) and a live viewer gets it with its offset.
        await wait_for(appended_again, DEADLINE, "the comment appended again")
        reset = viewer.of("reset")[0]
        assert reset["epoch"] != viewer.of("subscribed")[0]["epoch"]
        await viewer.wait(lambda: len(viewer.comments()) >= 2 or reset["offset"] >= 1, "in it")
    finally:
        pg_cluster.start()
    await viewer.close()
