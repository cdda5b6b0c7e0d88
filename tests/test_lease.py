"""Instance-id leases against a private redis-server: no two live instances share an id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from livecomments.app import STATE, create_app
from livecomments.config import load_settings
from livecomments.lease import KEY, InstanceIdUnavailable, InstanceLease
from tests.redis_servers import RedisServer, redis_servers
from tests.server import ServerProcess, free_port


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_servers(tmp_path) as servers:
        yield servers.start(1)[0]


async def test_auto_leases_pick_distinct_ids(redis_node: RedisServer):
    leases = [InstanceLease(redis_node.url, -1, timeout=2) for _ in range(5)]
    try:
        ids = [await lease.acquire() for lease in leases]
        assert len(set(ids)) == 5
        assert all(0 <= i <= 1023 for i in ids)
    finally:
        for lease in leases:
            await lease.release()
    assert redis_node.command("DBSIZE") == 0  # released leases are gone


async def test_an_explicit_id_held_by_a_live_instance_is_refused(redis_node: RedisServer):
    first = InstanceLease(redis_node.url, 7, timeout=2)
    second = InstanceLease(redis_node.url, 7, timeout=2)
    try:
        assert await first.acquire() == 7
        with pytest.raises(InstanceIdUnavailable, match=r"server\.instance_id 7 is in use"):
            await second.acquire()
        ttl = redis_node.command("PTTL", KEY.format(7))
        assert 0 < ttl <= 60_000
    finally:
        await second.release()
        await first.release()
    third = InstanceLease(redis_node.url, 7, timeout=2)
    assert await third.acquire() == 7  # free again once released
    await third.release()


async def test_unreachable_redis_is_a_clear_error(redis_node: RedisServer):
    redis_node.kill()
    lease = InstanceLease(redis_node.url, -1, timeout=0.5)
    with pytest.raises(InstanceIdUnavailable, match="cannot reach Redis"):
        await lease.acquire()
    await lease.release()


def test_server_with_auto_id_refuses_to_start_without_redis(tmp_path: Path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = ServerProcess(tmp_path, env={"LIVECOMMENTS_REDIS_URLS": dead})
    with pytest.raises(RuntimeError, match="exited with 1"):
        server.start(timeout=20)
    assert "cannot reach Redis to claim an instance id" in server.logs()


def test_server_with_explicit_id_starts_while_redis_is_down(start_server):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {"LIVECOMMENTS_REDIS_URLS": dead, "LIVECOMMENTS_SERVER_INSTANCE_ID": "5"}
    server = start_server(env=env)
    assert "starting as instance 5 unchecked" in server.logs()


def test_two_servers_cannot_share_an_explicit_id(start_server, redis_node: RedisServer):
    env = {"LIVECOMMENTS_REDIS_URLS": redis_node.url, "LIVECOMMENTS_SERVER_INSTANCE_ID": "9"}
    start_server(name="first", env=env)
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*instance_id 9 is in use"):
        start_server(name="second", env=env)


async def test_a_lapsed_lease_taken_by_another_instance_is_a_conflict(redis_node: RedisServer):
    mine = InstanceLease(redis_node.url, 3, timeout=2)
    assert await mine.acquire() == 3
    redis_node.command("DEL", KEY.format(3))  # Redis restarted empty, say
    newcomer = InstanceLease(redis_node.url, 3, timeout=2)
    assert await newcomer.acquire() == 3
    await mine.renew()
    assert mine.conflict, "kept minting ids another live instance mints too"
    await newcomer.release()
    await mine.renew()
    assert not mine.conflict  # free again: re-claimed
    assert redis_node.command("EXISTS", KEY.format(3)) == 1
    await mine.release()


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
    client.app[STATE]["lease"] = SimpleNamespace(conflict=True)  # what renew() found
    r = await client.post("/v1/comments", json=body)
    assert r.status == 503 and (await r.json())["error"]["code"] == "instance_id_conflict"
    r = await client.get("/readyz")
    assert r.status == 503 and (await r.json())["not_ready"] == ["instance_id_conflict"]
