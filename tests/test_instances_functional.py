"""Several instances on one host or one store: each needs its own queue and its own id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livecomments.api.app import COMMENTS, create_app
from livecomments.config import load_settings
from livecomments.model.comment import Comment
from livecomments.model.ids import instance_of
from livecomments.storage.log import PageQuery, open_store
from tests.pg_cluster import pg_cluster, pg_url
from tests.server import ServerProcess

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
    comments = client.app[COMMENTS]
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
