"""RedisBridge against real, private redis-server processes (no fakes of Redis).

Two or more bridges in this process stand for instances; a recording listener stands for the
hub, except in the race tests, which drive the real Hub.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livecomments.config import RedisSettings
from livecomments.live.hub import Hub
from livecomments.live.redis.bridge import RedisBridge
from livecomments.live.redis.pubsub import CHANNEL_PREFIX, ShardUnavailable
from livecomments.live.redis.ring import Ring
from livecomments.model.ids import wall_clock_ms
from tests.support.redis_servers import DeafeningProxy, RedisServers, redis_servers
from tests.support.server import free_port
from tests.support.wait import wait_for as async_wait_until

PROBE = 0.5  # probe_interval in the fault tests, seconds
# Elsewhere the probe is not under test: a slower one cannot fail spuriously on a busy machine.
CALM_PROBE = 2.0
DEADLINE = 10.0  # for anything that should happen soon


class Listener:
    """A hub stand-in: records what the bridge hands it."""

    def __init__(self) -> None:
        self.posts: set[str] = set()
        self.delivered: list[tuple[str, bytes]] = []
        self.resyncs: list[str] = []
        self.resync_since: list[int] = []

    def deliver(self, post_id: str, payload: bytes) -> None:
        self.delivered.append((post_id, payload))

    def resync(self, post_ids: Iterable[str], since_ms: int) -> None:
        self.resyncs.extend(post_ids)
        self.resync_since.extend(since_ms for _ in post_ids)

    def local_posts(self) -> Collection[str]:
        return self.posts

    def got(self, post_id: str, payload: bytes) -> int:
        return self.delivered.count((post_id, payload))


MakeBridge = Callable[..., Awaitable[tuple[RedisBridge, Listener]]]


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path) as servers:
        yield servers


@pytest.fixture
async def make_bridge() -> AsyncIterator[MakeBridge]:
    bridges: list[RedisBridge] = []

    async def make(
        urls: list[str], wait: bool = True, grace: float = 60.0, **settings: Any
    ) -> tuple[RedisBridge, Listener]:
        values = {"probe_interval": CALM_PROBE, "timeout": 2.0, "publish_retry": 5.0, **settings}
        listener = Listener()
        bridge = RedisBridge(RedisSettings(urls=urls, **values), ring_change_grace=grace)
        await bridge.start(listener)
        bridges.append(bridge)
        if wait:
            await async_wait_until(
                lambda: bridge.status()["status"] == "ok", DEADLINE, "bridge connected"
            )
        return bridge, listener

    yield make
    await asyncio.gather(*(b.stop() for b in bridges))


def posts_per_node(ring: Ring, per_node: int, prefix: str = "p") -> dict[str, list[str]]:
    """`per_node` post ids on each server of the ring."""
    found: dict[str, list[str]] = {url: [] for url in ring.urls}
    i = 0
    while any(len(v) < per_node for v in found.values()):
        post = f"{prefix}{i}"
        if len(found[ring.node_for(post)]) < per_node:
            found[ring.node_for(post)].append(post)
        i += 1
    return found


async def follow(bridge: RedisBridge, listener: Listener, posts: Iterable[str]) -> None:
    """What the hub does for a first local subscriber."""
    for post in posts:
        await bridge.subscribe(post)
        listener.posts.add(post)


def node_status(bridge: RedisBridge, url: str) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = bridge.status()["nodes"]
    return next(n for n in nodes if n["url"] == url)


# -- delivery -----------------------------------------------------------------------------------


async def test_each_event_reaches_the_other_instances_once_and_never_its_origin(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    urls = [s.url for s in redis_nodes.start(2)]
    a, a_events = await make_bridge(urls)
    b, b_events = await make_bridge(urls)
    posts = [p for group in posts_per_node(a.ring, 2).values() for p in group]
    await follow(a, a_events, posts)
    await follow(b, b_events, posts)
    for i, post in enumerate(posts):
        a.publish(post, b'{"n":%d}' % i)
        b.publish(post, b'{"m":%d}' % i)
    expected = len(posts)
    await async_wait_until(
        lambda: len(b_events.delivered) >= expected and len(a_events.delivered) >= expected,
        DEADLINE,
        "every event delivered",
    )
    assert sorted(b_events.delivered) == sorted((p, b'{"n":%d}' % i) for i, p in enumerate(posts))
    assert sorted(a_events.delivered) == sorted((p, b'{"m":%d}' % i) for i, p in enumerate(posts))
    # The publisher counts a batch once its pipeline returns, which can be after the receivers
    # already have it: wait for the count rather than read it at once.
    await async_wait_until(
        lambda: sum(node_status(a, url)["published"] for url in urls) >= expected,
        DEADLINE,
        "the publish count",
    )
    assert sum(node_status(a, url)["published"] for url in urls) == expected


async def test_subscribe_returns_once_redis_confirmed(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    bridge, _events = await make_bridge([server.url])
    await bridge.subscribe("post-1")
    # No polling: the SUBSCRIBE is confirmed by the time subscribe() returns.
    assert server.numsub([CHANNEL_PREFIX + "post-1"]) == {CHANNEL_PREFIX + "post-1": 1}
    await bridge.unsubscribe("post-1")
    await async_wait_until(
        lambda: server.numsub([CHANNEL_PREFIX + "post-1"])[CHANNEL_PREFIX + "post-1"] == 0,
        DEADLINE,
        "UNSUBSCRIBE",
    )


async def test_subscribes_are_batched_on_one_pubsub_connection_per_server(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    servers = redis_nodes.start(2)
    bridge, _events = await make_bridge([s.url for s in servers])
    before = [s.subscribe_calls() for s in servers]
    posts = [f"batch-{i}" for i in range(400)]
    await asyncio.gather(*(bridge.subscribe(p) for p in posts))
    for server, calls in zip(servers, before, strict=True):
        # 400 requests arriving together: one SUBSCRIBE per server, two at worst.
        assert server.subscribe_calls() - calls <= 2
        clients = server.command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines()
        ours = [c for c in clients if bridge.node_id.decode() in c]
        assert len(ours) == 1, clients
    channels = [CHANNEL_PREFIX + p for p in posts]
    assert sum(sum(s.numsub(channels).values()) for s in servers) == len(posts)
    for url in bridge.ring.urls:
        assert node_status(bridge, url)["channels"] == sum(
            1 for p in posts if bridge.ring.node_for(p) == url
        )


# -- publishing ---------------------------------------------------------------------------------


async def test_publish_never_blocks_and_a_full_buffer_drops_the_oldest(make_bridge: MakeBridge):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    bridge, _ = await make_bridge([nowhere], wait=False, publish_buffer=5, publish_retry=0.2)
    started = time.monotonic()
    for i in range(50):
        bridge.publish("post-1", b"%d" % i)
    assert time.monotonic() - started < 0.1
    node = node_status(bridge, nowhere)
    assert node["buffered"] <= 5
    assert node["dropped_publishes"] >= 44
    assert bridge.status()["status"] == "degraded"
    # What was left is retried for publish_retry seconds, then counted as dropped too.
    await async_wait_until(
        lambda: node_status(bridge, nowhere)["dropped_publishes"] == 50,
        DEADLINE,
        "the retried batch to be dropped",
    )
    assert node_status(bridge, nowhere)["buffered"] == 0
    with pytest.raises(ShardUnavailable):
        await bridge.subscribe("post-1")


async def test_events_dropped_from_a_full_buffer_make_the_receivers_resync(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url], publish_buffer=3)
    receiver, events = await make_bridge([server.url])
    await follow(receiver, events, ["full", "calm"])
    before_ms = wall_clock_ms()
    for i in range(10):  # no await in between: the worker cannot drain meanwhile
        sender.publish("full", b"%d" % i)
    assert node_status(sender, server.url)["dropped_publishes"] == 7
    await async_wait_until(lambda: events.resyncs == ["full"], DEADLINE, "a LOST notice")
    # The notice says since when: no later than the first dropped event was published.
    assert before_ms <= events.resync_since[0] <= wall_clock_ms()
    assert events.delivered == [("full", b"7"), ("full", b"8"), ("full", b"9")]
    sender.publish("calm", b"x")
    await async_wait_until(lambda: events.got("calm", b"x"), DEADLINE, "delivery")
    assert events.resyncs == ["full"]
    assert node_status(sender, server.url)["lost_notices_pending"] == 0


async def test_publish_never_raises_and_a_failing_listener_stops_nothing(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url])
    receiver, events = await make_bridge([server.url])
    await follow(receiver, events, ["bad", "good"])
    sender.publish("good", "not bytes")  # a bug upstream: logged, not raised

    deliver = events.deliver

    def deliver_or_fail(post_id: str, payload: bytes) -> None:
        if post_id == "bad":
            raise RuntimeError("a bug in the hub")
        deliver(post_id, payload)

    events.deliver = deliver_or_fail
    sender.publish("bad", b"1")
    sender.publish("good", b"2")
    await async_wait_until(lambda: events.got("good", b"2"), DEADLINE, "the next post's event")
    assert node_status(receiver, server.url)["reconnects"] == 0


@pytest.mark.fault
async def test_the_pubsub_worker_survives_a_bug_and_keeps_reconnecting(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url], probe_interval=PROBE)
    receiver, events = await make_bridge([server.url], probe_interval=PROBE)
    await follow(receiver, events, ["w1"])
    real = events.local_posts
    calls = 0

    def local_posts_failing_once() -> Collection[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the hub")
        return real()

    events.local_posts = local_posts_failing_once
    server.command("CLIENT", "KILL", "TYPE", "pubsub")
    await async_wait_until(lambda: events.resyncs == ["w1"], DEADLINE, "recovery")
    assert calls == 3  # the failed session, then the next one's start and its late check
    sender.publish("w1", b"ok")
    await async_wait_until(lambda: events.got("w1", b"ok"), DEADLINE, "delivery")


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.fault
async def test_a_subscribe_that_gives_up_while_the_server_is_up_is_not_lost(redis_nodes):
    """Replies 1.5 s late, timeout 2 s: p0's round is confirmed at 1.5 s; p1, asked meanwhile,
    rides the next round, confirmed at 3 s, after p1's caller gave up (2.1 s) but within that
    round's deadline (3.5 s), so the session lives on. The hub keeps p1 (BridgeUnavailable):
    the bridge must go on following it, on this very connection, and resync it."""
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    slow = RedisSettings(urls=[proxy.url], timeout=2.0, probe_interval=30.0)
    hub = Hub(RedisBridge(slow))
    sender = RedisBridge(RedisSettings(urls=[server.url], probe_interval=30.0))
    watchers = [Watcher(), Watcher()]
    try:
        await hub.start()
        await sender.start(Listener())
        node = hub._bridge.node(proxy.url)  # type: ignore[attr-defined]
        await async_wait_until(lambda: node.status()["state"] == "up", DEADLINE, "connected")
        proxy.reply_delay = 1.5
        first = asyncio.create_task(hub.subscribe(watchers[0], "p0"))
        for _ in range(100):  # p0's SUBSCRIBE is on the wire: its round is in flight
            if CHANNEL_PREFIX + "p0" in node.pubsub.channels.pending_sub:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(first, hub.subscribe(watchers[1], "p1"))
        await async_wait_until(
            lambda: server.numsub([CHANNEL_PREFIX + "p1"])[CHANNEL_PREFIX + "p1"] == 1,
            DEADLINE,
            "p1 followed on Redis",
        )
        assert node.pubsub.reconnects == 0
        sender.publish("p1", b'{"n":1}')
        await async_wait_until(lambda: watchers[1].got(b'{"n":1}'), DEADLINE, "p1 delivered")
        assert watchers[1].resynced()
    finally:
        await hub.stop()
        await sender.stop()
        await proxy.close()


class Watcher:
    """A hub subscriber that records the events (frames) offered to it."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def offer(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def got(self, payload: bytes) -> bool:
        return any(f.endswith(payload) for f in self.frames)

    def resynced(self) -> bool:
        return any(b'"type":"resync"' in f for f in self.frames)


async def test_a_subscribe_confirmed_too_late_is_followed_and_resynced(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    """The hub keeps a post whose subscribe gave up (BridgeUnavailable). The bridge must not
    drop it: when Redis confirms after all, the post is followed and its subscribers resync."""
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    try:
        sender, _ = await make_bridge([server.url])
        receiver, events = await make_bridge([proxy.url], timeout=0.3, probe_interval=5.0)
        proxy.hold_replies()  # the SUBSCRIBE goes out; its confirmation waits
        with pytest.raises(ShardUnavailable):
            await receiver.subscribe("late-1")
        gave_up_ms = wall_clock_ms()
        events.posts.add("late-1")  # what the hub does on BridgeUnavailable
        proxy.release_replies()
        # Confirmed late on this connection, or followed by the next session (the unconfirmed
        # round also ends this one): either way the post is followed and resynced from before
        # its subscriber was told "subscribed".
        await async_wait_until(lambda: "late-1" in events.resyncs, DEADLINE, "a late resync")
        assert events.resync_since[events.resyncs.index("late-1")] <= gave_up_ms
        sender.publish("late-1", b"after")
        await async_wait_until(lambda: events.got("late-1", b"after"), DEADLINE, "delivery")
    finally:
        await proxy.close()


@pytest.mark.fault
async def test_a_deaf_pubsub_connection_is_found_within_the_probe_interval(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    try:
        sender, _ = await make_bridge([server.url], probe_interval=PROBE)
        receiver, events = await make_bridge([proxy.url], probe_interval=PROBE)
        # The ring is keyed by URL: both must map the post to their only server anyway.
        await follow(receiver, events, ["deaf-1"])
        sender.publish("deaf-1", b"before")
        await async_wait_until(lambda: events.got("deaf-1", b"before"), DEADLINE, "delivery")
        node = receiver.node(proxy.url)
        deafened = time.monotonic()
        proxy.deafen()  # Redis still thinks it delivers: PUBLISH answers 1 receiver
        await async_wait_until(
            lambda: node.pubsub.reconnects == 1, DEADLINE, "the deaf connection found"
        )
        found_after = time.monotonic() - deafened
        # One probe interval, plus a reconnect and the scheduling noise of a busy machine.
        assert found_after < PROBE + 1.0, found_after
        assert "probe" in (node.pubsub.last_error or "")
        assert node.pubsub.probe_failures == 1
        assert events.resyncs == ["deaf-1"]
        sender.publish("deaf-1", b"after")
        await async_wait_until(lambda: events.got("deaf-1", b"after"), DEADLINE, "delivery")
    finally:
        await proxy.close()


@pytest.mark.fault
async def test_client_kill_pubsub_is_recovered_with_a_resync(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url], probe_interval=PROBE)
    receiver, events = await make_bridge([server.url], probe_interval=PROBE)
    await follow(receiver, events, ["k1", "k2"])
    killed = time.monotonic()
    server.command("CLIENT", "KILL", "TYPE", "pubsub")
    node = receiver.node(server.url)
    await async_wait_until(lambda: node.pubsub.reconnects >= 1, DEADLINE, "reconnect")
    assert time.monotonic() - killed < PROBE + 1.0
    await async_wait_until(lambda: sorted(events.resyncs) == ["k1", "k2"], DEADLINE, "resync")
    assert server.numsub([CHANNEL_PREFIX + "k1"])[CHANNEL_PREFIX + "k1"] == 1
    sender.publish("k1", b"again")
    await async_wait_until(lambda: events.got("k1", b"again") == 1, DEADLINE, "delivery")


@pytest.mark.fault
async def test_a_dead_server_leaves_the_others_alone_and_resyncs_when_back(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    servers = redis_nodes.start(2)
    urls = [s.url for s in servers]
    sender, _ = await make_bridge(urls, probe_interval=PROBE)
    receiver, events = await make_bridge(urls, probe_interval=PROBE)
    groups = posts_per_node(sender.ring, 2)
    alive, dead = groups[urls[0]], groups[urls[1]]
    await follow(receiver, events, alive + dead)

    servers[1].kill()
    await async_wait_until(
        lambda: receiver.status()["status"] == "degraded", DEADLINE, "degraded status"
    )
    assert node_status(receiver, urls[0])["connected"]
    for i in range(20):
        sender.publish(alive[i % 2], b"live-%d" % i)
    await async_wait_until(
        lambda: all(events.got(alive[i % 2], b"live-%d" % i) == 1 for i in range(20)),
        DEADLINE,
        "the live server's posts",
    )
    with pytest.raises(ShardUnavailable):
        await receiver.subscribe(
            next(p for p in (f"x{i}" for i in range(99)) if receiver.ring.node_for(p) == urls[1])
        )
    assert events.resyncs == []

    servers[1].start()  # same port
    await async_wait_until(lambda: sorted(events.resyncs) == sorted(dead), DEADLINE, "resync")
    await async_wait_until(
        lambda: sender.status()["status"] == "ok", DEADLINE, "the sender reconnected"
    )
    sender.publish(dead[0], b"back")
    await async_wait_until(lambda: events.got(dead[0], b"back") == 1, DEADLINE, "delivery")
    assert node_status(receiver, urls[1])["reconnects"] == 1
    assert node_status(receiver, urls[0])["reconnects"] == 0


@pytest.mark.fault
async def test_a_stopped_server_is_detected_and_recovered_after_sigcont(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url], probe_interval=PROBE, timeout=0.5)
    receiver, events = await make_bridge([server.url], probe_interval=PROBE, timeout=0.5)
    await follow(receiver, events, ["s1"])
    node = receiver.node(server.url)
    server.pause()
    try:
        await async_wait_until(lambda: not node.connected, PROBE + 1.5, "the stall found")
        assert node.pubsub.probe_failures == 1
    finally:
        server.resume()
    await async_wait_until(lambda: events.resyncs == ["s1"], DEADLINE, "resync")
    await async_wait_until(lambda: sender.status()["status"] == "ok", DEADLINE, "sender back")
    sender.publish("s1", b"after")
    await async_wait_until(lambda: events.got("s1", b"after") == 1, DEADLINE, "delivery")


# -- ring changes -------------------------------------------------------------------------------


async def test_a_ring_change_moves_posts_resyncs_them_and_loses_nothing_meanwhile(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    servers = redis_nodes.start(3)
    urls = [s.url for s in servers]
    sender, _ = await make_bridge(urls[:2], grace=0.5)
    receiver, events = await make_bridge(urls[:2], grace=0.5)
    posts = [f"ring-{i}" for i in range(60)]
    await follow(receiver, events, posts)
    old, new = Ring(urls[:2]), Ring(urls)
    moved = sorted(p for p in posts if old.node_for(p) != new.node_for(p))
    assert 5 < len(moved) < 40

    new_settings = RedisSettings(urls=urls, probe_interval=CALM_PROBE, timeout=2.0)
    await receiver.reconfigure(new_settings)
    assert sorted(events.resyncs) == moved
    channels = [CHANNEL_PREFIX + p for p in moved]
    assert set(servers[2].numsub(channels).values()) == {1}
    # The sender has not reloaded yet: it still publishes moved posts to their old server.
    for post in posts:
        sender.publish(post, b"old-ring")
    await async_wait_until(
        lambda: all(events.got(p, b"old-ring") == 1 for p in posts), DEADLINE, "old-ring events"
    )
    await sender.reconfigure(new_settings)
    for post in posts:
        sender.publish(post, b"new-ring")
    await async_wait_until(
        lambda: all(events.got(p, b"new-ring") == 1 for p in posts), DEADLINE, "new-ring events"
    )
    # After the grace, moved posts are followed on their new server only.
    await async_wait_until(
        lambda: not receiver.status()["ring_change_in_progress"], DEADLINE, "grace end"
    )
    await async_wait_until(
        lambda: (
            sum(servers[0].numsub(channels).values()) + sum(servers[1].numsub(channels).values())
            == 0
        ),
        DEADLINE,
        "old subscriptions dropped",
    )
    assert len(events.delivered) == 2 * len(posts)

    # Removing a server: its posts move back, the server is retired after the grace.
    await receiver.reconfigure(RedisSettings(urls=urls[:2], probe_interval=CALM_PROBE, timeout=2.0))
    assert sorted(events.resyncs) == sorted(moved + moved)
    await async_wait_until(
        lambda: len(receiver.status()["nodes"]) == 2,
        DEADLINE,
        "server retired",
    )
    with pytest.raises(ValueError):
        await receiver.reconfigure(RedisSettings(urls=[]))


async def test_a_reload_applies_the_scalar_settings(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    bridge, _ = await make_bridge([server.url], publish_buffer=100)
    node = bridge.node(server.url)
    changed = RedisSettings(
        urls=[server.url], probe_interval=0.3, publish_buffer=7, publish_retry=1.5, timeout=0.7
    )
    await bridge.reconfigure(changed)
    assert node.settings == changed
    probes = node.pubsub.last_probe_ok
    await async_wait_until(
        lambda: node.pubsub.last_probe_ok != probes, DEADLINE, "a probe at the new pace"
    )


# -- races, driven through the real Hub ----------------------------------------------------------


class Sub:
    """A socket as the hub sees it."""

    def offer(self, payload: bytes) -> bool:
        return True


class GatedBridge:
    """Wraps a RedisBridge; subscribe/unsubscribe wait on a gate before going through."""

    def __init__(self, inner: RedisBridge) -> None:
        self.inner = inner
        self.sub_gate = asyncio.Event()
        self.unsub_gate = asyncio.Event()
        self.sub_gate.set()
        self.unsub_gate.set()
        self.entered: list[str] = []

    async def start(self, listener: Any) -> None:
        await self.inner.start(listener)

    async def stop(self) -> None:
        await self.inner.stop()

    async def subscribe(self, post_id: str) -> None:
        self.entered.append(f"sub {post_id}")
        await self.sub_gate.wait()
        await self.inner.subscribe(post_id)

    async def unsubscribe(self, post_id: str) -> None:
        self.entered.append(f"unsub {post_id}")
        await self.unsub_gate.wait()
        await self.inner.unsubscribe(post_id)

    def publish(self, post_id: str, payload: bytes) -> None:
        self.inner.publish(post_id, payload)

    def status(self) -> dict[str, object]:
        return self.inner.status()

    async def reconfigure(self, settings: RedisSettings) -> None:
        await self.inner.reconfigure(settings)


@pytest.fixture
async def gated_hub(redis_nodes: RedisServers) -> AsyncIterator[tuple[Hub, GatedBridge, Any, Any]]:
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    inner = RedisBridge(RedisSettings(urls=[proxy.url], probe_interval=5.0, timeout=5.0))
    bridge = GatedBridge(inner)
    hub = Hub(bridge)
    await hub.start()
    await async_wait_until(lambda: inner.status()["status"] == "ok", DEADLINE, "connected")
    try:
        yield hub, bridge, server, proxy
    finally:
        await hub.stop()
        await proxy.close()


def subscribed_in_redis(server: Any, post: str) -> int:
    return int(server.numsub([CHANNEL_PREFIX + post])[CHANNEL_PREFIX + post])


async def test_race_unsubscribe_in_flight_then_a_new_subscriber(gated_hub: Any):
    hub, bridge, server, _ = gated_hub
    first, second = Sub(), Sub()
    await hub.subscribe(first, "r1")
    bridge.unsub_gate.clear()
    leaving = asyncio.create_task(hub.unsubscribe(first, "r1"))
    await async_wait_until(lambda: "unsub r1" in bridge.entered, DEADLINE, "unsubscribe entered")
    joining = asyncio.create_task(hub.subscribe(second, "r1"))
    await asyncio.sleep(0)
    assert not joining.done()  # it waits for the post's lock, held by the unsubscribe
    bridge.unsub_gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, joining), DEADLINE)
    assert hub.subscribers("r1") == 1
    assert subscribed_in_redis(server, "r1") == 1


async def test_race_subscribe_while_redis_has_not_confirmed_the_unsubscribe(gated_hub: Any):
    hub, _bridge, server, proxy = gated_hub
    first, second = Sub(), Sub()
    await hub.subscribe(first, "r2")
    subscribes = proxy.sent(b"SUBSCRIBE")
    proxy.hold_replies()  # Redis answers, but the bridge does not hear it yet
    await hub.unsubscribe(first, "r2")  # returns at once: the UNSUBSCRIBE is on its way
    await async_wait_until(lambda: proxy.sent(b"UNSUBSCRIBE") == 1, DEADLINE, "UNSUBSCRIBE sent")
    joining = asyncio.create_task(hub.subscribe(second, "r2"))
    # The bridge must not trust its stale "subscribed": it re-sends SUBSCRIBE after the
    # UNSUBSCRIBE is confirmed, and subscribe() waits for that confirmation.
    await asyncio.sleep(0)
    assert not joining.done()
    proxy.release_replies()
    await asyncio.wait_for(joining, DEADLINE)
    assert proxy.sent(b"SUBSCRIBE") == subscribes + 1
    assert hub.subscribers("r2") == 1
    assert subscribed_in_redis(server, "r2") == 1


async def test_race_subscribe_in_flight_while_the_only_subscriber_leaves(gated_hub: Any):
    hub, bridge, server, _ = gated_hub
    first, second = Sub(), Sub()
    bridge.sub_gate.clear()
    joining = asyncio.create_task(hub.subscribe(first, "r3"))
    await async_wait_until(lambda: "sub r3" in bridge.entered, DEADLINE, "subscribe entered")
    also = asyncio.create_task(hub.subscribe(second, "r3"))
    await hub.unsubscribe(first, "r3")  # not a member yet: nothing to do
    bridge.sub_gate.set()
    await asyncio.wait_for(asyncio.gather(joining, also), DEADLINE)
    await hub.unsubscribe(first, "r3")
    assert hub.subscribers("r3") == 1
    assert subscribed_in_redis(server, "r3") == 1


async def test_race_many_concurrent_joins_and_leaves_keep_redis_in_step(gated_hub: Any):
    hub, _bridge, server, _ = gated_hub
    rng = random.Random(3)
    subs = [Sub() for _ in range(6)]
    posts = ["m1", "m2", "m3"]
    gates = [asyncio.Event() for _ in range(8)]

    async def churn(i: int) -> None:
        for _ in range(25):
            await gates[rng.randrange(len(gates))].wait()
            sub, post = rng.choice(subs), rng.choice(posts)
            if rng.random() < 0.5:
                await hub.subscribe(sub, post)
            else:
                await hub.unsubscribe(sub, post)

    workers = [asyncio.create_task(churn(i)) for i in range(12)]
    for gate in rng.sample(gates, len(gates)):  # opened in a shuffled order
        gate.set()
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*workers), 30)

    def in_step() -> bool:
        return all((subscribed_in_redis(server, p) == 1) == (hub.subscribers(p) > 0) for p in posts)

    # Local subscribers imply a confirmed SUBSCRIBE right now; empty posts unsubscribe soon.
    for post in posts:
        if hub.subscribers(post):
            assert subscribed_in_redis(server, post) == 1
    await async_wait_until(in_step, DEADLINE, "Redis subscriptions matching local subscribers")


async def test_a_publish_batch_lost_to_a_bug_is_counted_and_announced(
    redis_nodes: RedisServers, make_bridge: MakeBridge
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_bridge([server.url])
    receiver, events = await make_bridge([server.url])
    await follow(receiver, events, ["bug"])
    node = sender.node(server.url)
    real_pipeline = node._client.pipeline
    calls = 0

    def pipeline_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug, not a Redis error")
        return real_pipeline(*args, **kwargs)

    node._client.pipeline = pipeline_failing_once  # type: ignore[method-assign]
    sender.publish("bug", b"lost")
    await async_wait_until(
        lambda: node_status(sender, server.url)["dropped_publishes"] == 1,
        DEADLINE,
        "the lost batch counted",
    )
    sender.publish("bug", b"next")  # the worker restarted: publishing works, LOST goes out
    await async_wait_until(lambda: events.got("bug", b"next"), DEADLINE, "the next event")
    await async_wait_until(lambda: events.resyncs == ["bug"], DEADLINE, "a LOST notice")
