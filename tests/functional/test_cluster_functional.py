"""Several real instances (subprocesses) over a ring of private Redis servers, real WebSockets.

Every comment posted to any instance must reach every subscriber of its post on every instance,
exactly once; a Redis fault or a ring change must end, for the affected posts, in a `resync`
event and then live delivery again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from livecomments.live.redis.ring import Ring
from tests.support.redis_servers import RedisServer, RedisServers, redis_servers
from tests.support.server import ServerProcess
from tests.support.wait import wait_for as async_wait_until

PROBE = 0.5  # redis.probe_interval in the fault tests, seconds
# Elsewhere the probe is not under test: a slower one cannot fail spuriously on a busy machine.
CALM_PROBE = 2.0
DEADLINE = 15.0


class Cluster:
    """Instances started here are stopped (SIGTERM, then SIGKILL) when the test ends."""

    def __init__(self, base: Path, redis: RedisServers) -> None:
        self.base = base
        self.redis = redis
        self.instances: list[ServerProcess] = []

    def start(
        self, urls: list[str] | None = None, config: str | None = None, probe: float = PROBE
    ) -> ServerProcess:
        """An instance with a distinct instance id and data dir; Redis from env or a file."""
        n = len(self.instances)
        env = {"LIVECOMMENTS_SERVER_INSTANCE_ID": str(n + 1)}
        if config is None:
            env["LIVECOMMENTS_REDIS_PROBE_INTERVAL"] = str(probe)
            env["LIVECOMMENTS_REDIS_TIMEOUT"] = "1.0"
        if urls is not None:
            env["LIVECOMMENTS_REDIS_URLS"] = ",".join(urls)
        config_path = None
        if config is not None:
            config_path = self.base / f"instance{n}.toml"
            config_path.write_text(config)
        server = ServerProcess(
            self.base / f"instance{n}", env=env, name=f"instance{n}", config_path=config_path
        )
        self.instances.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.instances:
            try:
                server.stop(timeout=15)
            except Exception:
                server.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with redis_servers(tmp_path / "redis") as servers:
        cluster = Cluster(tmp_path, servers)
        try:
            yield cluster
        finally:
            cluster.stop()


class Watcher:
    """One WebSocket subscribed to some posts; records every event it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, name: str) -> None:
        self.ws = ws
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, http: aiohttp.ClientSession, server: ServerProcess, posts: list[str]
    ) -> Watcher:
        watcher = cls(await http.ws_connect(server.ws_url), f"{server.name}:{posts[:2]}")
        for post in posts:
            await watcher.ws.send_json({"type": "subscribe", "post_id": post})
        await watcher.wait(
            lambda: {e["post_id"] for e in watcher.of("subscribed")} == set(posts), "subscribed"
        )
        return watcher

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(msg.json())

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def comment_ids(self) -> list[str]:
        """Ids of every comment received, from `comment` and batched `comments` events."""
        ids = []
        for e in self.events:
            if e["type"] == "comment":
                ids.append(e["comment"]["id"])
            elif e["type"] == "comments":
                ids.extend(c["id"] for c in e["comments"])
        return ids

    def resynced(self) -> set[str]:
        return {e["post_id"] for e in self.of("resync")}

    async def wait(self, check: Any, what: str, timeout: float = DEADLINE) -> None:
        await async_wait_until(check, timeout, f"{self.name}: {what}")

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


async def post(http: aiohttp.ClientSession, server: ServerProcess, post_id: str, text: str) -> str:
    body = {"post_id": post_id, "uid": "tester", "message": text}
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["comment"]["id"])


async def bridge_status(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    async with http.get(f"{server.url}/readyz") as r:
        body = await r.json()
    # The bridge's status is embedded in /readyz (top level, or under "hub" in older builds).
    found: dict[str, Any] = body.get("bridge") or body["hub"]["bridge"]
    return found


def posts_on(ring: Ring, url: str, count: int, prefix: str) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        if ring.node_for(f"{prefix}{i}") == url:
            found.append(f"{prefix}{i}")
        i += 1
    return found


# -- delivery -----------------------------------------------------------------------------------


async def test_every_subscriber_on_every_instance_gets_every_comment_once(
    cluster: Cluster, http: aiohttp.ClientSession
):
    urls = [s.url for s in cluster.redis.start(3)]
    instances = [cluster.start(urls, probe=CALM_PROBE) for _ in range(3)]
    ring = Ring(urls)
    posts = [p for url in urls for p in posts_on(ring, url, 2, "c")]  # two on each server
    await async_wait_until(lambda: _all_ok(http, instances), DEADLINE, "bridges connected")
    for server in instances:
        status = await bridge_status(http, server)
        assert [n["connected"] for n in status["nodes"]] == [True, True, True]
    # Per instance: one socket on every post, one on half of them.
    watchers = []
    for server in instances:
        watchers.append((await Watcher.open(http, server, posts), set(posts)))
        watchers.append((await Watcher.open(http, server, posts[::2]), set(posts[::2])))

    pairs = [(server, p) for server in instances for p in posts for _ in range(2)]
    sent = await asyncio.gather(
        *(post(http, server, p, f"{server.name} on {p}") for server, p in pairs)
    )
    # Then a fence per instance and post: a duplicate from a retried publish would precede it.
    fence_pairs = [(server, p) for server in instances for p in posts]
    fences = await asyncio.gather(*(post(http, server, p, "fence") for server, p in fence_pairs))
    ids_of = [(cid, p) for cid, (_, p) in zip(sent, pairs, strict=True)]
    ids_of += [(cid, p) for cid, (_, p) in zip(fences, fence_pairs, strict=True)]
    for watcher, watched in watchers:
        expected = {cid for cid, p in ids_of if p in watched}
        await watcher.wait(lambda w=watcher, e=expected: set(w.comment_ids()) >= e, "all comments")
        counts = Counter(watcher.comment_ids())
        assert set(counts) == expected
        assert max(counts.values()) == 1, [c for c, n in counts.items() if n > 1]
        assert watcher.of("resync") == []
    for watcher, _ in watchers:
        await watcher.close()


# -- ring change --------------------------------------------------------------------------------


def _config(urls: list[str]) -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return f"[redis]\nurls = [{listed}]\nprobe_interval = {CALM_PROBE}\ntimeout = 1.0\n"


async def test_a_sighup_ring_change_moves_posts_resyncs_them_and_keeps_delivering(
    cluster: Cluster, http: aiohttp.ClientSession
):
    servers = cluster.redis.start(3)
    urls = [s.url for s in servers]
    instances = [cluster.start(config=_config(urls[:2])) for _ in range(3)]
    await async_wait_until(lambda: _all_ok(http, instances), DEADLINE, "bridges connected")
    posts = [f"h{i}" for i in range(24)]
    before, after = Ring(urls[:2]), Ring(urls)
    moved = {p for p in posts if before.node_for(p) != after.node_for(p)}
    assert 2 <= len(moved) <= 16
    watchers = [await Watcher.open(http, server, posts) for server in instances]

    for server in instances:
        assert server.config_path is not None
        server.config_path.write_text(_config(urls))
        server.signal(1)  # SIGHUP
    for server in instances:
        await async_wait_until(
            lambda s=server: _connected_nodes(s, http), DEADLINE, f"{server.name} on 3 servers"
        )
    for watcher in watchers:
        await watcher.wait(lambda w=watcher: w.resynced() == moved, "resync of moved posts")
        assert not watcher.ws.closed  # sockets stay connected through a ring change
    channels = [f"livecomments:post:{p}" for p in sorted(moved)]
    await async_wait_until(
        lambda: set(servers[2].numsub(channels).values()) == {3}, DEADLINE, "moved posts on r2"
    )

    ids = await asyncio.gather(
        *(post(http, server, p, "after the change") for server in instances for p in posts)
    )
    for watcher in watchers:
        await watcher.wait(lambda w=watcher: set(w.comment_ids()) >= set(ids), "every comment")
        assert sorted(watcher.comment_ids()) == sorted(ids)
    for watcher in watchers:
        await watcher.close()


async def _connected_nodes(server: ServerProcess, http: aiohttp.ClientSession) -> bool:
    status = await bridge_status(http, server)
    return len(status["nodes"]) == 3 and all(n["connected"] for n in status["nodes"])


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.fault
async def test_a_killed_redis_server_costs_only_its_own_posts_a_resync(
    cluster: Cluster, http: aiohttp.ClientSession
):
    redis = cluster.redis.start(2)
    urls = [s.url for s in redis]
    sender, receiver = cluster.start(urls), cluster.start(urls)
    await async_wait_until(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "connected")
    ring = Ring(urls)
    alive, dead = posts_on(ring, urls[0], 2, "k"), posts_on(ring, urls[1], 2, "k")
    remote = await Watcher.open(http, receiver, alive + dead)
    local = await Watcher.open(http, sender, dead)

    redis[1].kill()
    await async_wait_until(
        lambda: _state_of(http, receiver, urls[1], "connected", False), DEADLINE, "node down"
    )
    sent = []
    for i in range(20):
        sent.append(await post(http, sender, alive[i % 2], f"during {i}"))
    local_ids = [await post(http, sender, dead[0], "local only")]
    await remote.wait(lambda: set(remote.comment_ids()) >= set(sent), "the live node's posts")
    await local.wait(lambda: set(local.comment_ids()) >= set(local_ids), "local delivery")
    assert remote.resynced() == set()
    assert (await bridge_status(http, receiver))["status"] == "degraded"
    # A newcomer to a post on the dead server is accepted and served what its instance takes.
    late_post = posts_on(ring, urls[1], 3, "k")[2]
    late = await Watcher.open(http, receiver, [late_post])
    late_ids = [await post(http, receiver, late_post, "local while down")]
    await late.wait(lambda: set(late.comment_ids()) >= set(late_ids), "local delivery, late")

    _restart(redis[1])
    await remote.wait(lambda: remote.resynced() == set(dead), "resync of the dead node's posts")
    await local.wait(lambda: local.resynced() == set(dead), "resync on the sending instance too")
    await async_wait_until(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "both back")
    back = await post(http, sender, dead[1], "back")
    await remote.wait(lambda: back in remote.comment_ids(), "delivery after the restart")
    await late.wait(lambda: late.resynced() == {late_post}, "resync of the newcomer's post")
    late_back = await post(http, sender, late_post, "from the other instance")
    await late.wait(lambda: late_back in late.comment_ids(), "remote delivery to the newcomer")
    await late.close()
    assert sorted(Counter(remote.comment_ids()).values())[-1] == 1
    await remote.close()
    await local.close()


def _restart(server: RedisServer) -> None:
    server.start()  # same port, empty: every subscription is gone


async def _state_of(
    http: aiohttp.ClientSession, server: ServerProcess, url: str, key: str, value: Any
) -> bool:
    status = await bridge_status(http, server)
    name = url  # node names are URLs without passwords; ours have none
    return any(n["url"] == name and n[key] == value for n in status["nodes"])


async def _all_ok(http: aiohttp.ClientSession, servers: list[ServerProcess]) -> bool:
    statuses = [(await bridge_status(http, s))["status"] for s in servers]
    return statuses == ["ok"] * len(servers)


@pytest.mark.fault
async def test_killed_and_deaf_pubsub_connections_are_replaced_with_a_resync(
    cluster: Cluster, http: aiohttp.ClientSession
):
    (redis,) = cluster.redis.start(1)
    sender, receiver = cluster.start([redis.url]), cluster.start([redis.url])
    await async_wait_until(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "connected")
    watcher = await Watcher.open(http, receiver, ["d1", "d2"])

    # 1. Redis drops every Pub/Sub client: the connection ends, the bridge reconnects.
    killed = time.monotonic()
    redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    await watcher.wait(lambda: watcher.resynced() == {"d1", "d2"}, "resync", timeout=PROBE + 2)
    assert time.monotonic() - killed < PROBE + 2
    first = await post(http, sender, "d1", "after the kill")
    await watcher.wait(lambda: first in watcher.comment_ids(), "delivery after the kill")

    # 2. The server stops answering but every connection stays open: only the probe sees it.
    resyncs = len(watcher.of("resync"))
    paused = time.monotonic()
    redis.pause()
    try:
        await async_wait_until(
            lambda: _state_of(http, receiver, redis.url, "connected", False),
            PROBE + 2,
            "the stall found by the probe",
        )
        # Stay stopped a while longer: reconnecting to a server that accepts TCP (the kernel
        # does) but never answers must time out and back off, not hang.
        await async_wait_until(
            lambda: time.monotonic() - paused > 3 * PROBE, DEADLINE, "a stall of 3 probes"
        )
        assert not await _state_of(http, receiver, redis.url, "connected", True)
    finally:
        redis.resume()
    await watcher.wait(lambda: len(watcher.of("resync")) == resyncs + 2, "resync after SIGCONT")
    await async_wait_until(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "both back")
    status = await bridge_status(http, receiver)
    assert status["nodes"][0]["reconnects"] == 2
    second = await post(http, sender, "d2", "after the stall")
    await watcher.wait(lambda: second in watcher.comment_ids(), "delivery after the stall")
    assert max(Counter(watcher.comment_ids()).values()) == 1
    await watcher.close()
