"""Several real instances (subprocesses) over a ring of private Redis servers, real WebSockets.

Viewers are `tests/support/viewer.py`'s documented client: they keep each post's position, apply
events in offset order, reload on `reset`, and log everything, so the tests count. Every comment
posted to any instance must reach every viewer of its post on every instance once, in its
stream's order (the same for every viewer). A ring change or a Redis server that restarted empty
costs the affected posts, and only those, a `reset`; a Pub/Sub connection lost or gone deaf costs
nothing visible: the hub fills the gap from the stream's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from livecomments.live.redis.ring import Ring
from tests.support.redis_servers import DeafeningProxy, RedisServers, redis_servers
from tests.support.server import ServerProcess
from tests.support.viewer import Viewer, settle
from tests.support.wait import wait_for

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


@pytest.fixture
async def viewers(http: aiohttp.ClientSession) -> AsyncIterator[Any]:
    """`open(server, posts)`: a started Viewer on one instance, stopped when the test ends."""
    rng = random.Random(10)
    async with contextlib.AsyncExitStack() as stack:

        async def open_viewer(server: ServerProcess, posts: Sequence[str]) -> Viewer:
            viewer = Viewer(
                http, [server.url], posts, rng=rng, name=f"{server.name}:{list(posts)[:2]}"
            )
            await stack.enter_async_context(viewer)
            await viewer.wait_positioned(DEADLINE)
            return viewer

        yield open_viewer


async def post(http: aiohttp.ClientSession, server: ServerProcess, post_id: str, text: str) -> str:
    body = {"post_id": post_id, "uid": "tester", "message": text}
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["comment"]["id"])


async def broker_status(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    async with http.get(f"{server.url}/readyz") as r:
        body = await r.json()
    found: dict[str, Any] = body["broker"]
    return found


async def _all_ok(http: aiohttp.ClientSession, servers: list[ServerProcess]) -> bool:
    statuses = [(await broker_status(http, s))["status"] for s in servers]
    return statuses == ["ok"] * len(servers)


async def _state_of(
    http: aiohttp.ClientSession, server: ServerProcess, url: str, key: str, value: Any
) -> bool:
    status = await broker_status(http, server)
    name = url  # node names are URLs without passwords; ours have none
    return any(n["url"] == name and n[key] == value for n in status["nodes"])


def posts_on(ring: Ring, url: str, count: int, prefix: str) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        if ring.node_for(f"{prefix}{i}") == url:
            found.append(f"{prefix}{i}")
        i += 1
    return found


def check_clean(viewer: Viewer) -> None:
    """What no viewer may ever see: an id twice, one comment under two offsets, a jump."""
    assert viewer.duplicates == [], viewer.name
    assert viewer.redelivered == [], viewer.name
    assert viewer.offset_violations == [], viewer.name
    viewer.raise_if_failed()


def check_undisturbed(viewer: Viewer, post_ids: Sequence[str]) -> None:
    """Since its first subscribe, the post's stream came to this viewer live, without a gap: no
    reset, no gap, no resubscribe, no reload but the first, consecutive offsets, one socket."""
    for post_id in post_ids:
        assert viewer.entries("reset", post_id) == [], (viewer.name, post_id)
        assert viewer.gaps(post_id) == [], (viewer.name, post_id)
        assert len(viewer.entries("subscribe", post_id)) == 1, (viewer.name, post_id)
        assert len(viewer.reloads(post_id)) == 1, (viewer.name, post_id)
        assert viewer.entries("unpositioned", post_id) == [], (viewer.name, post_id)
        (answer,) = viewer.entries("subscribed", post_id)
        offsets = [offset for _, offset, _ in viewer.applied(post_id)]
        assert answer.offset is not None
        assert offsets == list(range(answer.offset + 1, answer.offset + 1 + len(offsets)))
    assert len(viewer.connections) == 1, viewer.name


def ids_by_post(pairs: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
    """{post: {comment ids}} from (post, id) pairs."""
    out: dict[str, set[str]] = {}
    for post_id, cid in pairs:
        out.setdefault(post_id, set()).add(cid)
    return out


# -- delivery -----------------------------------------------------------------------------------


async def test_every_viewer_on_every_instance_gets_every_comment_once_in_stream_order(
    cluster: Cluster, http: aiohttp.ClientSession, viewers: Any
):
    urls = [s.url for s in cluster.redis.start(3)]
    instances = [cluster.start(urls, probe=CALM_PROBE) for _ in range(3)]
    ring = Ring(urls)
    posts = [p for url in urls for p in posts_on(ring, url, 2, "c")]  # two on each server
    await wait_for(lambda: _all_ok(http, instances), DEADLINE, "brokers connected")
    for server in instances:
        status = await broker_status(http, server)
        assert [n["connected"] for n in status["nodes"]] == [True, True, True]
    # Per instance: one socket on every post, one on half of them.
    watching: list[Viewer] = []
    for server in instances:
        watching.append(await viewers(server, posts))
        watching.append(await viewers(server, posts[::2]))

    pairs = [(server, p) for server in instances for p in posts for _ in range(3)]
    sent = await asyncio.gather(
        *(post(http, server, p, f"{server.name} on {p}") for server, p in pairs)
    )
    expected = ids_by_post([(p, cid) for (_, p), cid in zip(pairs, sent, strict=True)])
    await settle(watching, expected, DEADLINE)
    for post_id in posts:
        # Every comment under its own offset, the stream's last one at the end of it.
        lasts = {v.position(post_id) for v in watching if post_id in v.post_ids}
        assert len(lasts) == 1, lasts
        (last,) = lasts
        assert last is not None and last[1] == len(expected[post_id])
    for viewer in watching:
        check_clean(viewer)
        check_undisturbed(viewer, viewer.post_ids)
        for post_id in viewer.post_ids:
            # Every comment came live with its offset (the first reload found none yet).
            assert {cid for _, _, cid in viewer.applied(post_id)} == expected[post_id]
    for post_id in posts:
        # One order: every viewer of a post applied the same (epoch, offset, id) sequence.
        orders = {tuple(v.applied(post_id)) for v in watching if post_id in v.post_ids}
        assert len(orders) == 1, post_id


# -- ring change --------------------------------------------------------------------------------


def _config(urls: list[str]) -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return f"[redis]\nurls = [{listed}]\nprobe_interval = {CALM_PROBE}\ntimeout = 1.0\n"


async def _connected_nodes(server: ServerProcess, http: aiohttp.ClientSession) -> bool:
    status = await broker_status(http, server)
    return len(status["nodes"]) == 3 and all(n["connected"] for n in status["nodes"])


async def test_a_sighup_ring_change_resets_the_moved_posts_once_and_keeps_delivering(
    cluster: Cluster, http: aiohttp.ClientSession, viewers: Any
):
    servers = cluster.redis.start(3)
    urls = [s.url for s in servers]
    instances = [cluster.start(config=_config(urls[:2])) for _ in range(3)]
    await wait_for(lambda: _all_ok(http, instances), DEADLINE, "brokers connected")
    posts = [f"h{i}" for i in range(24)]
    before, after = Ring(urls[:2]), Ring(urls)
    moved = {p for p in posts if before.node_for(p) != after.node_for(p)}
    assert 2 <= len(moved) <= 16
    watching = [await viewers(server, posts) for server in instances]
    first = await asyncio.gather(*(post(http, instances[0], p, "before") for p in posts))
    await settle(watching, ids_by_post(list(zip(posts, first, strict=True))), DEADLINE)
    await wait_for(  # appended, not only shown by a reload from the queue
        lambda: all(v.applied(p) for v in watching for p in posts), DEADLINE, "offset 1 applied"
    )

    for server in instances:
        assert server.config_path is not None
        server.config_path.write_text(_config(urls))
        server.signal(1)  # SIGHUP
    for server in instances:
        await wait_for(
            lambda s=server: _connected_nodes(s, http), DEADLINE, f"{server.name} on 3 servers"
        )
    for viewer in watching:
        await wait_for(
            lambda v=viewer: {e.post_id for e in v.entries("reset")} == moved,
            DEADLINE,
            f"{viewer.name}: a reset of the moved posts",
        )
    channels = [f"livecomments:post:{p}" for p in sorted(moved)]
    await wait_for(
        lambda: set(servers[2].numsub(channels).values()) == {3}, DEADLINE, "moved posts on r2"
    )

    later = [(p, server) for server in instances for p in posts]
    ids = await asyncio.gather(*(post(http, server, p, "after") for p, server in later))
    expected = ids_by_post(
        list(zip(posts, first, strict=True))
        + [(p, cid) for (p, _), cid in zip(later, ids, strict=True)]
    )
    await settle(watching, expected, DEADLINE)
    for viewer in watching:
        check_clean(viewer)
        # The sockets stayed open; the moved posts reloaded once, from a new epoch, then went on.
        assert len(viewer.connections) == 1
        check_undisturbed(viewer, sorted(set(posts) - moved))
        for post_id in moved:
            (reset,) = viewer.entries("reset", post_id)
            (answer,) = viewer.entries("subscribed", post_id)
            assert reset.epoch != answer.epoch and reset.offset == 0
            assert viewer.gaps(post_id) == []
            after_reset = [(e, o) for e, o, _ in viewer.applied(post_id) if e == reset.epoch]
            assert after_reset == [(reset.epoch, o) for o in range(1, 4)]
    for post_id in posts:
        orders = {tuple(v.applied(post_id)) for v in watching}
        assert len(orders) == 1, post_id


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.fault
async def test_a_killed_redis_server_costs_only_its_own_posts_a_reset(
    cluster: Cluster, http: aiohttp.ClientSession, viewers: Any
):
    redis = cluster.redis.start(2)
    urls = [s.url for s in redis]
    sender, receiver = cluster.start(urls), cluster.start(urls)
    await wait_for(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "connected")
    ring = Ring(urls)
    alive, dead = posts_on(ring, urls[0], 2, "k"), posts_on(ring, urls[1], 2, "k")
    remote = await viewers(receiver, alive + dead)
    local = await viewers(sender, dead)
    sent = [(p, await post(http, sender, p, "before")) for p in alive + dead]
    await settle([remote, local], ids_by_post(sent), DEADLINE)

    redis[1].kill()
    await wait_for(
        lambda: _state_of(http, receiver, urls[1], "connected", False), DEADLINE, "node down"
    )
    for i in range(20):
        sent.append((alive[i % 2], await post(http, sender, alive[i % 2], f"during {i}")))
    # The dead shard's post: taken, and shown at once (offset null) to the sender's viewers.
    local_only = await post(http, sender, dead[0], "local only")
    await settle([remote], ids_by_post([s for s in sent if s[0] in alive]), DEADLINE)
    await wait_for(lambda: local_only in local.shown(dead[0]), DEADLINE, "shown locally")
    assert local.entries("unpositioned", dead[0])[0].id == local_only
    assert (await broker_status(http, receiver))["status"] == "degraded"
    # A newcomer to a post on the dead server: subscribed without a position, and shown what
    # its own instance takes.
    late_post = posts_on(ring, urls[1], 3, "k")[2]
    late = Viewer(http, [receiver.url], [late_post], rng=random.Random(1), name="late")
    async with late:
        await wait_for(lambda: late.entries("subscribed"), DEADLINE, "the newcomer answered")
        assert late.entries("subscribed")[0].detail == "no_position"
        late_id = await post(http, receiver, late_post, "local while down")
        await wait_for(lambda: late_id in late.shown(late_post), DEADLINE, "shown to the newcomer")

        redis[1].start()  # same port, empty: a new epoch for every post it carries
        for viewer, posts in ((remote, dead), (local, dead), (late, [late_post])):
            await wait_for(
                lambda v=viewer, p=posts: {e.post_id for e in v.entries("reset")} == set(p),
                DEADLINE,
                f"{viewer.name}: a reset of the dead server's posts",
            )
        await wait_for(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "both back")
        sent.append((dead[1], await post(http, sender, dead[1], "back")))
        sent.append((late_post, await post(http, sender, late_post, "from the other instance")))
        sent += [(dead[0], local_only), (late_post, late_id)]
        # Everything, the comments taken while the shard was down included, reaches everyone.
        await settle([remote, local, late], ids_by_post(sent), DEADLINE)
        check_clean(late)
    check_undisturbed(remote, alive)
    for viewer in (remote, local):
        check_clean(viewer)
        assert len(viewer.connections) == 1


@pytest.mark.fault
async def test_killed_and_deaf_pubsub_connections_are_repaired_without_a_reset(
    cluster: Cluster, http: aiohttp.ClientSession, viewers: Any
):
    """The receiver reaches Redis through a proxy. Each fault is arranged so that comments are
    surely published while its Pub/Sub connection cannot hear them; its hub must fill the gap
    from the history: its viewers see consecutive offsets, with no reset and no reload."""
    (redis,) = cluster.redis.start(1)
    proxy = await DeafeningProxy(redis.port).start()
    try:
        sender, receiver = cluster.start([redis.url]), cluster.start([proxy.url])
        await wait_for(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "connected")
        posts = ["d1", "d2"]
        watcher = await viewers(receiver, posts)
        witness = await viewers(sender, posts)
        sent: list[tuple[str, str]] = []

        async def publish_unheard(label: str) -> None:
            """Comments the receiver cannot hear now: appended (the sender's viewer has them
            with offsets), not seen by the receiver's."""
            new = [
                (p, await post(http, sender, p, f"{label} {i}")) for i in range(3) for p in posts
            ]
            sent.extend(new)
            await settle([witness], ids_by_post(sent), DEADLINE)
            assert not any(cid in watcher.shown(p) for p, cid in new), label

        sent += [(p, await post(http, sender, p, "before")) for p in posts]
        await settle([watcher, witness], ids_by_post(sent), DEADLINE)

        # 1. Redis drops every Pub/Sub client; the receiver cannot reconnect until admitted.
        proxy.refuse()
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_for(
            lambda: _state_of(http, receiver, proxy.url, "connected", False), DEADLINE, "dropped"
        )
        await publish_unheard("while killed")
        proxy.admit()
        await settle([watcher], ids_by_post(sent), DEADLINE)

        # 2. The connection stays open but hears nothing: only the probe finds it.
        deafened = time.monotonic()
        proxy.refuse()
        proxy.deafen()
        await publish_unheard("while deaf")
        await wait_for(
            lambda: _state_of(http, receiver, proxy.url, "connected", False),
            DEADLINE,
            "the deaf connection found by the probe",
        )
        assert time.monotonic() - deafened < PROBE + 3.0
        proxy.admit()
        await settle([watcher], ids_by_post(sent), DEADLINE)

        # 3. The server stops answering but every connection stays open: the probe sees it,
        #    the appends time out (their comments wait in the outbox), nothing is lost.
        paused = time.monotonic()
        redis.pause()
        try:
            await wait_for(
                lambda: _state_of(http, receiver, proxy.url, "connected", False),
                PROBE + 2,
                "the stall found by the probe",
            )
            stalled = [(p, await post(http, sender, p, "while stopped")) for p in posts]
            sent.extend(stalled)
            # Stay stopped a while longer: reconnecting to a server that accepts TCP (the
            # kernel does) but never answers must time out and back off, not hang.
            await wait_for(
                lambda: time.monotonic() - paused > 3 * PROBE, DEADLINE, "a stall of 3 probes"
            )
            assert not await _state_of(http, receiver, proxy.url, "connected", True)
            assert not any(cid in watcher.shown(p) for p, cid in stalled)
        finally:
            redis.resume()
        await settle([watcher, witness], ids_by_post(sent), DEADLINE)
        await wait_for(lambda: _all_ok(http, [sender, receiver]), DEADLINE, "both back")
        status = await broker_status(http, receiver)
        assert status["nodes"][0]["reconnects"] == 3

        sent += [(p, await post(http, sender, p, "after")) for p in posts]
        await settle([watcher, witness], ids_by_post(sent), DEADLINE)
        check_clean(watcher)
        check_undisturbed(watcher, posts)
        assert proxy.refused > 0  # the receiver did try to come back while refused
        for post_id in posts:
            assert watcher.applied(post_id) == witness.applied(post_id)
    finally:
        await proxy.close()
