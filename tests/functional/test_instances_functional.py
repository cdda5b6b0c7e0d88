"""Several instances on one host or one store: each needs its own queue and its own id."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from livecomments.api.app import create_app
from livecomments.api.keys import LEASE, LOG
from livecomments.config import load_settings
from livecomments.model.comment import Comment
from livecomments.model.ids import instance_of
from livecomments.storage import open_store
from livecomments.storage.base import PageQuery
from tests.support.pg_cluster import PgCluster, pg_cluster, pg_url
from tests.support.server import ServerProcess, free_port

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest


@pytest.mark.fault
def test_a_second_instance_on_the_same_queue_dir_exits_naming_the_dir_and_the_holder(
    start_server, tmp_path: Path
):
    first = start_server("first", data_dir=tmp_path / "shared")
    assert first.proc is not None
    queue_dir = tmp_path / "shared" / "queue"
    second = ServerProcess(
        tmp_path / "second", env={"LIVECOMMENTS_QUEUE_DIR": str(queue_dir)}, name="second"
    )
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    refusal = [line for line in second.logs().splitlines() if "cannot start" in line]
    assert len(refusal) == 1, second.logs()
    assert str(queue_dir) in refusal[0] and f"pid {first.proc.pid}" in refusal[0]
    assert "Traceback" not in second.logs()


WRITERS = 20
PER_WRITER = 150


async def write_comments(http, server: ServerProcess, post_id: str) -> list[str]:
    """WRITERS concurrent writers, PER_WRITER comments each, to one post; the acked ids."""

    async def writer(w: int) -> list[str]:
        ids = []
        for i in range(PER_WRITER):
            body = {"post_id": post_id, "uid": f"w{w}", "message": f"{server.name} {w} {i}"}
            async with http.post(f"{server.url}/v1/comments", json=body) as r:
                assert r.status == 201, await r.text()
                ids.append((await r.json())["comment"]["id"])
        return ids

    per_writer = await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return [i for ids in per_writer for i in ids]


async def stored_ids(store_url: str, post_id: str) -> list[int]:
    store = open_store(store_url)
    await store.open()
    try:
        comments: list[int] = []
        after = 0
        while True:
            page = await store.page(PageQuery(post_id, 1000, after=after))
            comments.extend(c.id for c in page[:1000])
            if len(page) <= 1000:
                return comments
            after = page[999].id
    finally:
        await store.close()


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_instances_sharing_a_store_without_redis_mint_distinct_ids(
    start_server, http, tmp_path: Path, request: pytest.FixtureRequest, backend: str
):
    """Issue 8's scenario: before, both became instance 0, 286 of 6000 acked comments were
    dropped by the store and two comments shared each of their ids, in silence."""
    if backend == "sqlite":
        store_url = f"sqlite:///{tmp_path}/shared.db"
    else:
        store_url = request.getfixturevalue("pg_url")
    env = {"LIVECOMMENTS_STORE_URL": store_url, "LIVECOMMENTS_LOG_LEVEL": "WARNING"}
    a = start_server("a", env=env)
    b = start_server("b", env=env)
    acked = await asyncio.gather(write_comments(http, a, "one"), write_comments(http, b, "one"))
    ids = acked[0] + acked[1]
    assert len(ids) == 2 * WRITERS * PER_WRITER == len(set(ids))
    assert {instance_of(int(i)) for i in acked[0]}.isdisjoint(instance_of(int(i)) for i in acked[1])
    assert a.stop() == 0 and b.stop() == 0  # both flush on the way out
    assert sorted(await stored_ids(store_url, "one")) == sorted(int(i) for i in ids)
    for server in (a, b):
        assert "already another comment's" not in server.logs()


async def test_a_collision_is_counted_logged_and_shown_by_readyz(aiohttp_client, tmp_path: Path):
    """If two instances ever do mint one id (a lease lapsed during an outage), the comment the
    store cannot keep is never dropped in silence."""
    url = f"sqlite:///{tmp_path}/c.db"
    settings = load_settings(
        None, {"LIVECOMMENTS_STORE_URL": url, "LIVECOMMENTS_QUEUE_DIR": str(tmp_path / "q")}
    )
    client = await aiohttp_client(create_app(settings))
    body = {"post_id": "p", "uid": "u", "message": "first"}
    async with client.post("/v1/comments", json=body) as r:
        first = Comment.from_wire((await r.json())["comment"])
    comments = client.app[LOG]
    await asyncio.wait_for(comments.queue.wait_empty(), 10)
    twin = Comment(first.id, "p", "other", "same id, other comment", None, None, first.created_at)
    await comments.accept(twin)  # as another instance would have minted it
    deadline = asyncio.get_running_loop().time() + 10
    while comments.id_collisions == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    async with client.get("/readyz") as r:
        ready = await r.json()
    assert ready["status"] == "degraded" and ready["store"]["id_collisions"] == 1


# -- instance ids leased in the store ---------------------------------------------------------


def test_two_servers_cannot_share_an_explicit_id(start_server, tmp_path: Path):
    db = f"sqlite:///{tmp_path}/shared.db"
    env = {"LIVECOMMENTS_STORE_URL": db, "LIVECOMMENTS_SERVER_INSTANCE_ID": "9"}
    start_server(name="first", env=env)
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*instance_id 9 is in use"):
        start_server(name="second", env=env)


@pytest.mark.fault
async def test_a_new_server_started_while_the_store_is_down_takes_comments_once_it_answers(
    start_server, http, pg_cluster: PgCluster, pg_url: str
):
    """A first start with `-1` and no store cannot know a free id: it starts anyway (readers are
    served, the queue replays), refuses comments plainly, and claims an id when it can."""
    pg_cluster.stop("fast")
    try:
        server = start_server(env={"LIVECOMMENTS_STORE_URL": pg_url})
        body = {"post_id": "p", "uid": "u", "message": "m"}
        async with http.post(f"{server.url}/v1/comments", json=body) as r:
            assert r.status == 503 and r.headers["Retry-After"]
            assert (await r.json())["error"]["code"] == "instance_id_pending"
        async with http.get(f"{server.url}/readyz") as r:
            assert r.status == 503 and "instance_id_pending" in (await r.json())["not_ready"]
    finally:
        pg_cluster.start()
    deadline = time.monotonic() + 30  # the flusher's backoff, then the lease's 1 s retries
    while True:
        async with http.post(f"{server.url}/v1/comments", json=body) as r:
            if r.status == 201:
                break
            assert time.monotonic() < deadline, await r.text()
        await asyncio.sleep(0.2)
    assert "claimed instance id" in server.logs()


def test_a_server_with_an_explicit_id_starts_while_the_store_is_down(start_server):
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    env = {"LIVECOMMENTS_STORE_URL": dead, "LIVECOMMENTS_SERVER_INSTANCE_ID": "5"}
    server = start_server(env=env)
    assert "starting as instance 5 unchecked" in server.logs()


async def test_an_instance_in_conflict_refuses_comments_and_is_not_ready(
    aiohttp_client, tmp_path: Path
):
    settings = load_settings(
        None,
        environ={
            "LIVECOMMENTS_STORE_URL": f"sqlite:///{tmp_path}/c.db",
            "LIVECOMMENTS_QUEUE_DIR": str(tmp_path / "queue"),
        },
    )
    client = await aiohttp_client(create_app(settings))
    body = {"post_id": "p", "uid": "u", "message": "m"}
    assert (await client.post("/v1/comments", json=body)).status == 201
    client.app[LEASE].conflict = True  # what renew() found
    r = await client.post("/v1/comments", json=body)
    assert r.status == 503 and (await r.json())["error"]["code"] == "instance_id_conflict"
    r = await client.get("/readyz")
    assert r.status == 503 and (await r.json())["not_ready"] == ["instance_id_conflict"]
