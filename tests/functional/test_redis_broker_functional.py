"""RedisBroker against real, private redis-server processes (no fakes of Redis).

Two or more brokers in this process stand for nodes; a recording listener stands for the hub,
except where the hub's own part is under test (a subscribe that gives up, the races), which
drive the real Hub over a real RedisBroker.

What is checked, in the words of live/broker.py: each post's stream is numbered by its shard
(APPEND: dedupe by comment id, the next offset, bounded history, PUBLISH to every node, the
appending one included); publications reach every node's listener in offset order, each once;
whenever Pub/Sub may have lost some (a session that came back, a late subscribe confirmation,
a ring change), the broker says so with `on_stream_gap`, and the history says what was missed
or that the epoch changed. After a ring change, the sweeper (live/redis/sweep.py) leaves on each
shard only what may be continued: a post that comes back to a shard never resumes its old
epoch there, and a post that never moved keeps its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from livecomments.config import HistorySettings, RedisSettings
from livecomments.live.broker import BrokerUnavailable, History, StreamListener
from livecomments.live.hub import Hub
from livecomments.live.redis import streams, sweep
from livecomments.live.redis.broker import RedisBroker
from livecomments.live.redis.client import COMMAND_CONNECTIONS
from livecomments.live.redis.pubsub import CHANNEL_PREFIX, ShardUnavailable
from livecomments.live.redis.ring import Ring
from livecomments.model.stream import COMMENT, DELETE, Entry, Position, Publication
from tests.support.listener import RecordingListener
from tests.support.redis_servers import DeafeningProxy, RedisServer, RedisServers, redis_servers
from tests.support.server import free_port
from tests.support.wait import wait_for

PROBE = 0.5  # probe_interval in the fault tests, seconds
# Elsewhere the probe is not under test: a slower one cannot fail spuriously on a busy machine.
CALM_PROBE = 2.0
DEADLINE = 10.0  # for anything that should happen soon


MakeBroker = Callable[..., Awaitable[tuple[RedisBroker, RecordingListener]]]


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path) as servers:
        yield servers


@pytest.fixture
async def make_broker() -> AsyncIterator[MakeBroker]:
    brokers: list[RedisBroker] = []

    async def make(
        urls: list[str],
        wait: bool = True,
        history: HistorySettings | None = None,
        **settings: Any,
    ) -> tuple[RedisBroker, RecordingListener]:
        values = {"probe_interval": CALM_PROBE, "timeout": 2.0, **settings}
        listener = RecordingListener()
        broker = RedisBroker(RedisSettings(urls=urls, **values), history or HistorySettings())
        await broker.start(listener)
        brokers.append(broker)
        if wait:
            await wait_for(lambda: broker.status()["status"] == "ok", DEADLINE, "broker up")
        return broker, listener

    yield make
    await asyncio.gather(*(b.stop() for b in brokers))


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


async def follow(broker: RedisBroker, listener: RecordingListener, posts: Iterable[str]) -> None:
    """What the hub does for a first local subscriber."""
    for post in posts:
        await broker.subscribe(post)
        listener.posts.add(post)


def comment(comment_id: int, post_id: str, body: bytes | None = None) -> Entry:
    return Entry(comment_id, post_id, COMMENT, b"c%d" % comment_id if body is None else body)


def node_status(broker: RedisBroker, url: str) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = broker.status()["nodes"]
    return next(n for n in nodes if n["url"] == url)


def numsub(server: RedisServer, post: str) -> int:
    return server.numsub([CHANNEL_PREFIX + post])[CHANNEL_PREFIX + post]


async def append_when_back(broker: RedisBroker, entry: Entry) -> Position:
    """Append until the shard answers (what the outbox does; the dedupe makes repeats free)."""

    async def attempt() -> Position | None:
        return (await broker.append([entry]))[0]

    position: Position = await wait_for(attempt, DEADLINE, f"an append to {entry.post_id}")
    return position


# -- delivery -----------------------------------------------------------------------------------


async def test_appends_reach_every_node_the_appending_one_included_in_offset_order_once(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    urls = [s.url for s in redis_nodes.start(2)]
    a, a_heard = await make_broker(urls)
    b, b_heard = await make_broker(urls)
    posts = [p for group in posts_per_node(a.ring, 2).values() for p in group]
    await follow(a, a_heard, posts)
    await follow(b, b_heard, posts)
    # Both nodes append at once, interleaved over the posts: each shard orders its posts.
    a_entries = [comment(1000 + 10 * i + j, p) for i in range(5) for j, p in enumerate(posts)]
    b_entries = [comment(2000 + 10 * i + j, p) for i in range(5) for j, p in enumerate(posts)]
    a_positions, b_positions = await asyncio.gather(a.append(a_entries), b.append(b_entries))

    placed: dict[tuple[str, int], bytes] = {}
    epochs: dict[str, str] = {}
    for entry, position in zip(a_entries + b_entries, a_positions + b_positions, strict=True):
        assert position is not None
        assert epochs.setdefault(entry.post_id, position.epoch) == position.epoch
        placed[(entry.post_id, position.offset)] = entry.body
    for post in posts:
        assert sorted(o for p, o in placed if p == post) == list(range(1, 11))
    for heard in (a_heard, b_heard):
        await wait_for(
            lambda h=heard: all(len(h.of(p)) >= 10 for p in posts), DEADLINE, "every publication"
        )
        for post in posts:
            assert heard.offsets(post) == list(range(1, 11))  # in order, each once
            assert [p.body for p in heard.of(post)] == [placed[(post, o)] for o in range(1, 11)]
            assert {p.epoch for p in heard.of(post)} == {epochs[post]}
    assert sum(node_status(a, url)["appended"] for url in urls) == len(a_entries)
    assert a_heard.gaps == b_heard.gaps == []


async def test_a_repeated_append_returns_its_first_position_and_publishes_nothing(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    a, a_heard = await make_broker([server.url])
    b, b_heard = await make_broker([server.url])
    await follow(a, a_heard, ["dup"])
    await follow(b, b_heard, ["dup"])
    (first,) = await a.append([comment(7, "dup", b"first")])
    assert first is not None and first.offset == 1
    # The outbox of another node, or this one after a crash, repeats it (even with another
    # body): the stream keeps its first offset. Repeats within one pipeline too.
    again = await b.append(
        [comment(7, "dup", b"again"), comment(8, "dup", b"next"), comment(8, "dup", b"next")]
    )
    assert again == [first, Position(first.epoch, 2), Position(first.epoch, 2)]
    # Pub/Sub keeps order per connection: a repeat published would arrive before offset 2.
    for heard in (a_heard, b_heard):
        await wait_for(lambda h=heard: 2 in h.offsets("dup"), DEADLINE, "offset 2")
        assert [(p.offset, p.body) for p in heard.of("dup")] == [(1, b"first"), (2, b"next")]
    history = await a.history("dup", Position(first.epoch, 0))
    assert [p.body for p in history.publications] == [b"first", b"next"]


async def test_subscribe_returns_once_redis_confirmed(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    broker, _heard = await make_broker([server.url])
    await broker.subscribe("post-1")
    # No polling: the SUBSCRIBE is confirmed by the time subscribe() returns.
    assert numsub(server, "post-1") == 1
    await broker.unsubscribe("post-1")
    await wait_for(lambda: numsub(server, "post-1") == 0, DEADLINE, "UNSUBSCRIBE")


async def test_subscribes_are_batched_on_one_pubsub_connection_per_server(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    servers = redis_nodes.start(2)
    broker, _heard = await make_broker([s.url for s in servers])
    before = [s.subscribe_calls() for s in servers]
    posts = [f"batch-{i}" for i in range(400)]
    await asyncio.gather(*(broker.subscribe(p) for p in posts))
    for server, calls in zip(servers, before, strict=True):
        # 400 requests arriving together: one SUBSCRIBE per server, two at worst.
        assert server.subscribe_calls() - calls <= 2
        clients = server.command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines()
        ours = [c for c in clients if broker.node_id in c]
        assert len(ours) == 1, clients
    channels = [CHANNEL_PREFIX + p for p in posts]
    assert sum(sum(s.numsub(channels).values()) for s in servers) == len(posts)
    for url in broker.ring.urls:
        assert node_status(broker, url)["channels"] == sum(
            1 for p in posts if broker.ring.node_for(p) == url
        )


# -- history ------------------------------------------------------------------------------------


async def test_history_after_a_position_is_complete_until_trimmed(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    broker, _ = await make_broker([server.url], history=HistorySettings(size=5))
    positions = await broker.append([comment(i, "h") for i in range(1, 4)])
    assert positions[0] is not None
    epoch = positions[0].epoch
    assert positions == [Position(epoch, 1), Position(epoch, 2), Position(epoch, 3)]

    def offsets(history: History) -> list[int]:
        return [p.offset for p in history.publications]

    everything = await broker.history("h", Position(epoch, 0))
    assert everything.complete and everything.position == Position(epoch, 3)
    assert offsets(everything) == [1, 2, 3]
    assert [p.body for p in everything.publications] == [b"c1", b"c2", b"c3"]
    assert offsets(await broker.history("h", Position(epoch, 1), limit=1)) == [2]
    up_to_date = await broker.history("h", Position(epoch, 3))
    assert up_to_date.complete and up_to_date.publications == []
    where = await broker.history("h")
    assert where.complete and where.position == Position(epoch, 3) and where.publications == []
    assert await broker.position("h") == Position(epoch, 3)

    # Far more than history.size: Redis trims the stream by whole nodes of entries (MAXLEN ~),
    # so about `size` are left, and what is gone cannot be replayed.
    await broker.append([comment(i, "h") for i in range(4, 304)])
    trimmed = await broker.history("h", Position(epoch, 0))
    assert not trimmed.complete and trimmed.publications == []
    assert trimmed.position == Position(epoch, 303)
    assert server.command("XLEN", streams.keys("h")[1]) < 300
    recent = await broker.history("h", Position(epoch, 298))
    assert recent.complete and offsets(recent) == [299, 300, 301, 302, 303]
    # The index by comment id is trimmed to `size` exactly.
    assert server.command("ZCARD", streams.keys("h")[2]) == 5


async def test_a_stream_whose_keys_are_gone_starts_a_new_epoch(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    broker, heard = await make_broker([server.url])
    await follow(broker, heard, ["e"])
    (before,) = await broker.append([comment(1, "e")])
    assert before is not None

    # Expired or deleted: the next reader makes a new epoch, and the next append continues it.
    server.command("DEL", *streams.keys("e"))
    lost = await broker.history("e", before)
    assert not lost.complete and lost.publications == []
    assert lost.position.epoch != before.epoch and lost.position.offset == 0
    (after,) = await broker.append([comment(2, "e")])
    assert after == Position(lost.position.epoch, 1)

    # Restarted empty (same port): the session comes back and reports the gap; the stream
    # starts again in a new epoch, which the history names.
    server.restart()
    await wait_for(lambda: heard.gaps == ["e"], DEADLINE, "the gap after the restart")
    restarted = await append_when_back(broker, comment(3, "e"))
    assert restarted.epoch not in (before.epoch, after.epoch) and restarted.offset == 1
    since_after = await broker.history("e", after)
    assert not since_after.complete and since_after.position == restarted
    await wait_for(lambda: heard.got("e", b"c3"), DEADLINE, "delivery after the restart")


async def test_recent_returns_a_get_window_by_comment_id(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    broker, _ = await make_broker([server.url])
    # Appended out of id order (two nodes' outboxes): the window is by id, not by offset.
    await broker.append([comment(i, "w") for i in (30, 10, 50, 20, 40)])

    async def window(after: int | None, before: int | None, limit: int) -> list[bytes]:
        return sorted(await broker.recent("w", after, before, limit))

    assert await window(None, None, 3) == [b"c30", b"c40", b"c50"]  # the newest
    assert await window(20, None, 2) == [b"c30", b"c40"]  # the oldest after 20
    assert await window(None, 40, 2) == [b"c20", b"c30"]  # the newest before 40
    assert await window(10, 50, 10) == [b"c20", b"c30", b"c40"]
    assert await window(50, None, 10) == []
    assert await broker.recent("nothing-here", None, None, 10) == []


async def test_a_burst_of_reads_shares_a_bounded_set_of_connections(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """500 GET windows at once (a hostile client's burst) must not open 500 connections to the
    shard: Redis's maxclients is shared by every instance. They wait for one, and all answer."""
    (server,) = redis_nodes.start(1)
    broker, _ = await make_broker([server.url])
    await broker.append([comment(i, "w") for i in range(1, 6)])
    windows = await asyncio.gather(*(broker.recent("w", None, None, 3) for _ in range(500)))
    assert all(len(w) == 3 for w in windows)
    clients = server.command("CLIENT", "LIST").decode().splitlines()
    commands = [c for c in clients if ":cmd" in c]
    assert 0 < len(commands) <= COMMAND_CONNECTIONS, len(commands)


# -- bugs downstream and upstream ---------------------------------------------------------------


async def test_a_failing_listener_and_a_malformed_message_stop_nothing(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_broker([server.url])
    receiver, heard = await make_broker([server.url])
    await follow(receiver, heard, ["bad", "good"])
    record = heard.on_publication

    def record_or_fail(publication: Publication) -> None:
        if publication.post_id == "bad":
            raise RuntimeError("a bug in the hub")
        record(publication)

    heard.on_publication = record_or_fail  # type: ignore[method-assign]
    # Not an envelope (another version, garbage): dropped and counted, never delivered.
    server.command("PUBLISH", CHANNEL_PREFIX + "good", b"garbage")
    server.command("PUBLISH", CHANNEL_PREFIX + "good", b"9" + b"0" * 16 + b"c1|x")
    await sender.append([comment(1, "bad"), comment(2, "good")])
    await wait_for(lambda: heard.got("good", b"c2"), DEADLINE, "the next post's publication")
    assert [p.body for p in heard.publications] == [b"c2"]
    assert node_status(receiver, server.url)["reconnects"] == 0
    assert heard.gaps == []


@pytest.mark.fault
async def test_the_pubsub_worker_survives_a_bug_and_keeps_reconnecting(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_broker([server.url], probe_interval=PROBE)
    receiver, heard = await make_broker([server.url], probe_interval=PROBE)
    await follow(receiver, heard, ["w1"])
    real = heard.local_posts
    calls = 0

    def local_posts_failing_once() -> Collection[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the hub")
        return real()

    heard.local_posts = local_posts_failing_once  # type: ignore[method-assign]
    server.command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_for(lambda: heard.gaps == ["w1"], DEADLINE, "recovery")
    assert calls == 3  # the failed session, then the next one's start and its late check
    await sender.append([comment(1, "w1")])
    await wait_for(lambda: heard.got("w1", b"c1"), DEADLINE, "delivery")


async def test_an_append_lost_to_a_bug_is_harmless_to_repeat(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """A bug (not a Redis error) in one shard's append: the outbox parks the whole batch and
    appends it again; the shard that did append keeps its offsets, nothing is published twice."""
    urls = [s.url for s in redis_nodes.start(2)]
    broker, heard = await make_broker(urls)
    groups = posts_per_node(broker.ring, 1)
    ok, buggy = groups[urls[0]][0], groups[urls[1]][0]
    await follow(broker, heard, [ok, buggy])
    node = broker.node(urls[1])
    real_pipeline = node._client.pipeline
    calls = 0

    def pipeline_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug, not a Redis error")
        return real_pipeline(*args, **kwargs)

    node._client.pipeline = pipeline_failing_once  # type: ignore[method-assign]
    entries = [comment(1, ok), comment(2, buggy)]
    with contextlib.suppress(RuntimeError):  # what the outbox's worker catches and parks
        await broker.append(entries)
    await wait_for(lambda: heard.offsets(ok) == [1], DEADLINE, "the healthy shard's append")
    positions = await broker.append(entries)  # the outbox, again
    assert [p.offset if p else None for p in positions] == [1, 1]
    await broker.append([comment(3, ok), comment(4, buggy)])
    await wait_for(
        lambda: heard.offsets(ok) == heard.offsets(buggy) == [1, 2], DEADLINE, "each once"
    )


# -- faults -------------------------------------------------------------------------------------


async def test_a_node_starts_without_redis_and_fails_appends_and_reads_at_once(
    make_broker: MakeBroker,
):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    broker, _ = await make_broker([nowhere], wait=False, timeout=2.0)
    started = time.monotonic()
    assert await broker.append([comment(1, "post-1")]) == [None]  # stays in the outbox
    assert time.monotonic() - started < 1.0  # refused: not a wait for `timeout`
    assert broker.status()["status"] == "degraded"
    assert (broker.node(nowhere).last_error or "").startswith("append: ConnectionError")
    with pytest.raises(ShardUnavailable):
        await broker.subscribe("post-1")
    with pytest.raises(BrokerUnavailable):
        await broker.history("post-1")
    with pytest.raises(BrokerUnavailable):
        await broker.recent("post-1", None, None, 10)
    assert time.monotonic() - started < 2.0


class Watcher:
    """A hub subscriber that records the events offered to it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def offer(self, frame: bytes) -> bool:
        assert frame[0] == 0x81, "not a final text frame"
        start = 2 if frame[1] < 126 else 4 if frame[1] == 126 else 10
        self.events.append(orjson.loads(frame[start:]))
        return True

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def offsets(self) -> list[int]:
        return [e["offset"] for e in self.of("comment")]


@pytest.mark.fault
async def test_a_subscribe_that_gives_up_while_the_server_is_up_is_not_lost(
    redis_nodes: RedisServers,
):
    """Replies 1.5 s late, timeout 2 s: p0's round is confirmed at 1.5 s; p1, asked meanwhile,
    rides the next round, confirmed at 3 s, after p1's caller gave up (2 s) but within that
    round's deadline (3.5 s), so the session lives on. The hub keeps p1 (BrokerUnavailable):
    the broker must go on following it, on this very connection, and report its gap."""
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    broker = RedisBroker(
        RedisSettings(urls=[proxy.url], timeout=2.0, probe_interval=30.0), HistorySettings()
    )
    hub = Hub(broker)
    sender = RedisBroker(RedisSettings(urls=[server.url], probe_interval=30.0), HistorySettings())
    watchers = [Watcher(), Watcher()]
    gaps: list[str] = []
    fill = hub.on_stream_gap

    def record_gap(post_ids: Iterable[str]) -> None:
        post_ids = list(post_ids)
        gaps.extend(post_ids)
        fill(post_ids)

    hub.on_stream_gap = record_gap  # type: ignore[method-assign]
    try:
        await hub.start()
        await sender.start(RecordingListener())
        node = broker.node(proxy.url)
        await wait_for(lambda: node.status()["state"] == "up", DEADLINE, "connected")
        proxy.reply_delay = 1.5
        first = asyncio.create_task(hub.subscribe(watchers[0], "p0", None))
        await wait_for(
            lambda: CHANNEL_PREFIX + "p0" in node.pubsub.channels.pending_sub,
            DEADLINE,
            "p0's SUBSCRIBE on the wire",
        )
        await asyncio.gather(first, hub.subscribe(watchers[1], "p1", None))
        (answer,) = watchers[1].of("subscribed")
        assert answer["offset"] == 0 and answer["recovered"] is False  # kept, with a position
        (meanwhile,) = await sender.append([comment(1, "p1", b'{"n":1}')])
        assert meanwhile is not None and meanwhile.epoch == answer["epoch"]
        await wait_for(lambda: numsub(server, "p1") == 1, DEADLINE, "p1 followed on Redis")
        await wait_for(lambda: "p1" in gaps, DEADLINE, "p1's gap reported on confirmation")
        assert node.pubsub.reconnects == 0
        await sender.append([comment(2, "p1", b'{"n":2}')])
        await wait_for(lambda: watchers[1].offsets() == [1, 2], DEADLINE, "p1 delivered")
        assert watchers[1].of("reset") == []
        assert gaps == ["p1"]
    finally:
        await hub.stop()
        await sender.stop()
        await proxy.close()


async def test_a_subscribe_confirmed_too_late_is_followed_and_its_gap_reported(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """The hub keeps a post whose subscribe gave up (BrokerUnavailable). The broker must not
    drop it: when Redis confirms after all, the post is followed and its gap reported."""
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    try:
        sender, _ = await make_broker([server.url])
        receiver, heard = await make_broker([proxy.url], timeout=0.3, probe_interval=5.0)
        proxy.hold_replies()  # the SUBSCRIBE goes out; its confirmation waits
        with pytest.raises(ShardUnavailable):
            await receiver.subscribe("late-1")
        heard.posts.add("late-1")  # what the hub does on BrokerUnavailable
        (during,) = await sender.append([comment(1, "late-1")])
        proxy.release_replies()
        # Confirmed late on this connection, or followed by the next session (the unconfirmed
        # round also ends this one): either way the post is followed and its gap reported, and
        # the history has what was published before.
        await wait_for(lambda: "late-1" in heard.gaps, DEADLINE, "the late gap")
        assert during is not None
        missed = await receiver.history("late-1", Position(during.epoch, 0))
        assert [p.body for p in missed.publications] == [b"c1"]
        await sender.append([comment(2, "late-1")])
        await wait_for(lambda: heard.got("late-1", b"c2"), DEADLINE, "delivery")
    finally:
        await proxy.close()


@pytest.mark.fault
async def test_a_deaf_pubsub_connection_is_found_within_the_probe_interval(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    try:
        sender, _ = await make_broker([server.url], probe_interval=PROBE)
        receiver, heard = await make_broker([proxy.url], probe_interval=PROBE)
        # The ring is keyed by URL: both must map the post to their only server anyway.
        await follow(receiver, heard, ["deaf-1"])
        await sender.append([comment(1, "deaf-1")])
        await wait_for(lambda: heard.got("deaf-1", b"c1"), DEADLINE, "delivery")
        node = receiver.node(proxy.url)
        deafened = time.monotonic()
        proxy.deafen()  # Redis still thinks it delivers: PUBLISH answers 1 receiver
        (lost,) = await sender.append([comment(2, "deaf-1")])
        await wait_for(lambda: node.pubsub.reconnects == 1, DEADLINE, "the deaf connection found")
        found_after = time.monotonic() - deafened
        # One probe interval, plus a reconnect and the scheduling noise of a busy machine.
        assert found_after < PROBE + 1.0, found_after
        assert "probe" in (node.pubsub.last_error or "")
        assert node.pubsub.probe_failures == 1
        await wait_for(lambda: heard.gaps == ["deaf-1"], DEADLINE, "the gap reported")
        assert heard.got("deaf-1", b"c2") == 0  # lost to Pub/Sub: the history has it
        assert lost is not None
        missed = await receiver.history("deaf-1", Position(lost.epoch, 1))
        assert missed.complete and [p.body for p in missed.publications] == [b"c2"]
        await sender.append([comment(3, "deaf-1")])
        await wait_for(lambda: heard.got("deaf-1", b"c3"), DEADLINE, "delivery")
    finally:
        await proxy.close()


@pytest.mark.fault
async def test_client_kill_pubsub_is_recovered_with_a_gap_report(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_broker([server.url], probe_interval=PROBE)
    receiver, heard = await make_broker([server.url], probe_interval=PROBE)
    await follow(receiver, heard, ["k1", "k2"])
    killed = time.monotonic()
    server.command("CLIENT", "KILL", "TYPE", "pubsub")
    node = receiver.node(server.url)
    await wait_for(lambda: node.pubsub.reconnects >= 1, DEADLINE, "reconnect")
    assert time.monotonic() - killed < PROBE + 1.0  # seen at once (EOF), not by the probe
    await wait_for(lambda: sorted(heard.gaps) == ["k1", "k2"], DEADLINE, "the gap reported")
    assert numsub(server, "k1") == 1
    await sender.append([comment(1, "k1")])
    await wait_for(lambda: heard.got("k1", b"c1") == 1, DEADLINE, "delivery")


@pytest.mark.fault
async def test_a_dead_server_leaves_the_others_alone_and_comes_back_in_a_new_epoch(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    servers = redis_nodes.start(2)
    urls = [s.url for s in servers]
    sender, _ = await make_broker(urls, probe_interval=PROBE, timeout=1.0)
    receiver, heard = await make_broker(urls, probe_interval=PROBE, timeout=1.0)
    groups = posts_per_node(sender.ring, 2)
    alive, dead = groups[urls[0]], groups[urls[1]]
    await follow(receiver, heard, alive + dead)
    (old,) = await sender.append([comment(1, dead[0])])
    assert old is not None

    servers[1].kill()
    await wait_for(lambda: receiver.status()["status"] == "degraded", DEADLINE, "degraded")
    assert node_status(receiver, urls[0])["connected"]
    mixed = [comment(10 + i, alive[i % 2] if i % 2 == 0 else dead[i % 2]) for i in range(4)]
    started = time.monotonic()
    positions = await sender.append(mixed)
    assert time.monotonic() - started < 1.0  # a dead server refuses at once
    assert [p is not None for p in positions] == [True, False, True, False]
    for i in range(20):
        assert (await sender.append([comment(100 + i, alive[i % 2])]))[0] is not None
    await wait_for(
        lambda: all(heard.got(alive[i % 2], b"c%d" % (100 + i)) == 1 for i in range(20)),
        DEADLINE,
        "the live server's posts",
    )
    other = next(p for p in (f"x{i}" for i in range(99)) if receiver.ring.node_for(p) == urls[1])
    with pytest.raises(ShardUnavailable):
        await receiver.subscribe(other)
    with pytest.raises(BrokerUnavailable):
        await receiver.history(dead[0])
    assert heard.gaps == []

    servers[1].start()  # same port, empty
    await wait_for(lambda: sorted(heard.gaps) == sorted(dead), DEADLINE, "the gap reported")
    await wait_for(lambda: sender.status()["status"] == "ok", DEADLINE, "the sender back")
    back = await append_when_back(sender, comment(1000, dead[0]))
    assert back.epoch != old.epoch and back.offset == 1  # its history died with the server
    assert not (await receiver.history(dead[0], old)).complete
    await wait_for(lambda: heard.got(dead[0], b"c1000") == 1, DEADLINE, "delivery")
    assert node_status(receiver, urls[1])["reconnects"] == 1
    assert node_status(receiver, urls[0])["reconnects"] == 0


@pytest.mark.fault
async def test_a_stopped_server_is_detected_and_recovered_after_sigcont(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    sender, _ = await make_broker([server.url], probe_interval=PROBE, timeout=0.5)
    receiver, heard = await make_broker([server.url], probe_interval=PROBE, timeout=0.5)
    await follow(receiver, heard, ["s1"])
    (before,) = await sender.append([comment(1, "s1")])
    assert before is not None
    node = receiver.node(server.url)
    server.pause()
    try:
        await wait_for(lambda: not node.connected, PROBE + 1.5, "the stall found")
        assert node.pubsub.probe_failures == 1
        started = time.monotonic()
        # Sent, unanswered: given up after `timeout` (Redis may still run it once resumed).
        assert await sender.append([comment(2, "s1")]) == [None]
        assert time.monotonic() - started < 0.5 + 0.5
    finally:
        server.resume()
    await wait_for(lambda: heard.gaps == ["s1"], DEADLINE, "the gap reported")
    await wait_for(lambda: sender.status()["status"] == "ok", DEADLINE, "the sender back")
    # The data survived the stall: same epoch, and no reply read for another command.
    again = await append_when_back(sender, comment(2, "s1"))
    assert again == Position(before.epoch, 2)
    (after,) = await sender.append([comment(3, "s1")])
    assert after == Position(before.epoch, 3)
    history = await receiver.history("s1", before)
    assert history.complete and [p.body for p in history.publications] == [b"c2", b"c3"]
    await wait_for(lambda: heard.got("s1", b"c3") == 1, DEADLINE, "delivery")


# -- ring changes -------------------------------------------------------------------------------


async def test_a_ring_change_moves_posts_to_a_new_epoch_and_reports_them(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    servers = redis_nodes.start(3)
    urls = [s.url for s in servers]
    sender, _ = await make_broker(urls[:2])
    receiver, heard = await make_broker(urls[:2])
    posts = [f"ring-{i}" for i in range(60)]
    await follow(receiver, heard, posts)
    old, new = Ring(urls[:2]), Ring(urls)
    moved = sorted(p for p in posts if old.node_for(p) != new.node_for(p))
    stayed = [p for p in posts if p not in moved]
    assert 5 < len(moved) < 40
    first = await sender.append([comment(i, p) for i, p in enumerate(posts)])
    epoch_before = {p: pos.epoch for p, pos in zip(posts, first, strict=True) if pos}
    await wait_for(lambda: len(heard.publications) == len(posts), DEADLINE, "before the change")

    new_settings = RedisSettings(urls=urls, probe_interval=CALM_PROBE, timeout=2.0)
    await receiver.reconfigure(new_settings)
    assert set(heard.gaps) == set(moved)  # at least once each (the new session may add one)
    assert len(receiver.status()["nodes"]) == 3
    channels = [CHANNEL_PREFIX + p for p in moved]
    assert set(servers[2].numsub(channels).values()) == {1}
    await wait_for(
        lambda: (
            sum(servers[0].numsub(channels).values()) + sum(servers[1].numsub(channels).values())
            == 0
        ),
        DEADLINE,
        "the old subscriptions dropped",
    )
    # The sender has not reloaded yet: it appends moved posts to their old shard, which the
    # receiver no longer follows (documented: those reach its viewers by their reload).
    await sender.append([comment(100 + i, p) for i, p in enumerate(posts)])
    await wait_for(
        lambda: all(heard.got(p, b"c%d" % (100 + i)) for i, p in enumerate(posts) if p in stayed),
        DEADLINE,
        "old-ring publications of the posts that stayed",
    )
    assert not any(heard.got(p, b"c%d" % (100 + i)) for i, p in enumerate(posts) if p in moved)

    await sender.reconfigure(new_settings)
    latest = await sender.append([comment(200 + i, p) for i, p in enumerate(posts)])
    for post, position in zip(posts, latest, strict=True):
        assert position is not None
        if post in moved:  # a new stream on the new shard
            assert position.epoch != epoch_before[post] and position.offset == 1
        else:
            assert position == Position(epoch_before[post], 3)
    await wait_for(
        lambda: all(heard.got(p, b"c%d" % (200 + i)) == 1 for i, p in enumerate(posts)),
        DEADLINE,
        "new-ring publications",
    )

    # Removing a server: its posts move back and it is retired at once.
    heard.gaps.clear()
    await receiver.reconfigure(RedisSettings(urls=urls[:2], probe_interval=CALM_PROBE))
    assert set(heard.gaps) == set(moved)
    assert len(receiver.status()["nodes"]) == 2
    assert all(servers[0].numsub([c])[c] + servers[1].numsub([c])[c] == 1 for c in channels), (
        "moved posts followed on their old shards again"
    )
    await wait_for(
        lambda: sum(servers[2].numsub(channels).values()) == 0, DEADLINE, "the retired server"
    )
    with pytest.raises(ValueError):
        await receiver.reconfigure(RedisSettings(urls=[]))


async def test_a_post_moved_back_to_its_old_shard_starts_a_new_epoch(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """A server added, then removed again (a rolled-back change): the posts it carried meanwhile
    go back to shards that still hold their old position. Their stream there must not simply
    go on: a client holding that old position missed what was published on the other shard,
    and must be told so (another epoch), not `recovered`."""
    servers = redis_nodes.start(3)
    urls = [s.url for s in servers]
    broker, _ = await make_broker(urls[:2])
    post = next(f"back-{i}" for i in range(999) if Ring(urls).node_for(f"back-{i}") == urls[2])
    (on_old,) = await broker.append([comment(1, post)])
    assert on_old is not None
    await broker.reconfigure(RedisSettings(urls=urls, probe_interval=CALM_PROBE))
    (on_new,) = await broker.append([comment(2, post)])
    assert on_new is not None and on_new.epoch != on_old.epoch
    await broker.reconfigure(RedisSettings(urls=urls[:2], probe_interval=CALM_PROBE))
    # A client that last saw `on_old` (it was away meanwhile) comes back: comment 2 is in no
    # history it can be replayed from, so the answer must not be "complete".
    history = await broker.history(post, on_old)
    assert not history.complete, f"{history.position} continues {on_old}; comment 2 was missed"


async def test_a_reload_applies_the_scalar_settings(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    (server,) = redis_nodes.start(1)
    broker, _ = await make_broker([server.url], probe_interval=CALM_PROBE, timeout=5.0)
    node = broker.node(server.url)
    changed = RedisSettings(urls=[server.url], probe_interval=0.3, timeout=0.4)
    await broker.reconfigure(changed)
    assert node.settings == changed and node.pubsub.settings == changed
    # probe_interval: probes come at the new pace (every 0.15 s, not every second).
    seen: list[float] = []

    def probed() -> bool:
        last = node.pubsub.last_probe_ok
        if last is not None and (not seen or last != seen[-1]):
            seen.append(last)
        return len(seen) >= 4

    await wait_for(probed, DEADLINE, "probes at the new pace", every=0.01)
    assert seen[-1] - seen[-2] < 0.6, seen
    # timeout: an append to a stalled server gives up after 0.4 s, not 5.
    server.pause()
    try:
        started = time.monotonic()
        assert await broker.append([comment(1, "r")]) == [None]
        assert time.monotonic() - started < 0.4 + 0.6
    finally:
        server.resume()


# -- races, driven through the real Hub ----------------------------------------------------------


class Sub:
    """A socket as the hub sees it."""

    def offer(self, frame: bytes) -> bool:
        return True


class GatedBroker:
    """Wraps a RedisBroker; subscribe/unsubscribe wait on a gate before going through."""

    def __init__(self, inner: RedisBroker) -> None:
        self.inner = inner
        self.sub_gate = asyncio.Event()
        self.unsub_gate = asyncio.Event()
        self.sub_gate.set()
        self.unsub_gate.set()
        self.entered: list[str] = []

    async def start(self, listener: StreamListener) -> None:
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

    async def history(self, post_id: str, since: Position | None = None, limit: int = 0) -> History:
        return await self.inner.history(post_id, since, limit)

    def status(self) -> dict[str, object]:
        return self.inner.status()


@pytest.fixture
async def gated_hub(
    redis_nodes: RedisServers,
) -> AsyncIterator[tuple[Hub, GatedBroker, RedisServer, DeafeningProxy]]:
    (server,) = redis_nodes.start(1)
    proxy = await DeafeningProxy(server.port).start()
    inner = RedisBroker(
        RedisSettings(urls=[proxy.url], probe_interval=5.0, timeout=5.0), HistorySettings()
    )
    broker = GatedBroker(inner)
    hub = Hub(broker)  # type: ignore[arg-type]
    await hub.start()
    try:
        await wait_for(lambda: inner.status()["status"] == "ok", DEADLINE, "connected")
        yield hub, broker, server, proxy
    finally:
        await hub.stop()
        await proxy.close()


async def test_race_unsubscribe_in_flight_then_a_new_subscriber(gated_hub: Any):
    hub, broker, server, _ = gated_hub
    first, second = Sub(), Sub()
    await hub.subscribe(first, "r1", None)
    broker.unsub_gate.clear()
    leaving = asyncio.create_task(hub.unsubscribe(first, "r1"))
    await wait_for(lambda: "unsub r1" in broker.entered, DEADLINE, "unsubscribe entered")
    joining = asyncio.create_task(hub.subscribe(second, "r1", None))
    await asyncio.sleep(0)
    assert not joining.done()  # it waits for the post's lock, held by the unsubscribe
    broker.unsub_gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, joining), DEADLINE)
    assert hub.subscribers("r1") == 1
    assert numsub(server, "r1") == 1


async def test_race_subscribe_while_redis_has_not_confirmed_the_unsubscribe(gated_hub: Any):
    hub, _broker, server, proxy = gated_hub
    first, second = Sub(), Sub()
    await hub.subscribe(first, "r2", None)
    subscribes = proxy.sent(b"SUBSCRIBE")
    proxy.hold_replies()  # Redis answers, but the broker does not hear it yet
    await hub.unsubscribe(first, "r2")  # returns at once: the UNSUBSCRIBE is on its way
    await wait_for(lambda: proxy.sent(b"UNSUBSCRIBE") == 1, DEADLINE, "UNSUBSCRIBE sent")
    joining = asyncio.create_task(hub.subscribe(second, "r2", None))
    # The broker must not trust its stale "subscribed": it re-sends SUBSCRIBE after the
    # UNSUBSCRIBE is confirmed, and subscribe() waits for that confirmation.
    await asyncio.sleep(0)
    assert not joining.done()
    proxy.release_replies()
    await asyncio.wait_for(joining, DEADLINE)
    assert proxy.sent(b"SUBSCRIBE") == subscribes + 1
    assert hub.subscribers("r2") == 1
    assert numsub(server, "r2") == 1


async def test_race_subscribe_in_flight_while_the_only_subscriber_leaves(gated_hub: Any):
    hub, broker, server, _ = gated_hub
    first, second = Sub(), Sub()
    broker.sub_gate.clear()
    joining = asyncio.create_task(hub.subscribe(first, "r3", None))
    await wait_for(lambda: "sub r3" in broker.entered, DEADLINE, "subscribe entered")
    also = asyncio.create_task(hub.subscribe(second, "r3", None))
    leaving = asyncio.create_task(hub.unsubscribe(first, "r3"))  # not a member yet
    await asyncio.sleep(0)
    broker.sub_gate.set()
    await asyncio.wait_for(asyncio.gather(joining, also, leaving), DEADLINE)
    await hub.unsubscribe(first, "r3")
    assert hub.subscribers("r3") == 1
    assert numsub(server, "r3") == 1
    assert broker.entered.count("sub r3") == 1 and "unsub r3" not in broker.entered


async def test_race_many_concurrent_joins_and_leaves_keep_redis_in_step(gated_hub: Any):
    hub, _broker, server, _ = gated_hub
    rng = random.Random(3)
    subs = [Sub() for _ in range(6)]
    posts = ["m1", "m2", "m3"]
    gates = [asyncio.Event() for _ in range(8)]

    async def churn() -> None:
        for _ in range(25):
            await gates[rng.randrange(len(gates))].wait()
            sub, post = rng.choice(subs), rng.choice(posts)
            if rng.random() < 0.5:
                await hub.subscribe(sub, post, None)
            else:
                await hub.unsubscribe(sub, post)

    workers = [asyncio.create_task(churn()) for _ in range(12)]
    for gate in rng.sample(gates, len(gates)):  # opened in a shuffled order
        gate.set()
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*workers), 30)

    def in_step() -> bool:
        return all((numsub(server, p) == 1) == (hub.subscribers(p) > 0) for p in posts)

    # Local subscribers imply a confirmed SUBSCRIBE right now; empty posts unsubscribe soon.
    for post in posts:
        if hub.subscribers(post):
            assert numsub(server, post) == 1
    await wait_for(in_step, DEADLINE, "Redis subscriptions matching local subscribers")


# -- ring sweeps (live/redis/sweep.py) -----------------------------------------------------------

SWEPT = 20.0  # a sweep of a few thousand posts ends well within this


def ring_settings(urls: list[str], **settings: Any) -> RedisSettings:
    return RedisSettings(urls=urls, **{"probe_interval": CALM_PROBE, "timeout": 2.0, **settings})


def quick_retries(broker: RedisBroker, attempts: int) -> None:
    """A sweep's retries tenths of a second apart, not seconds: the tests wait for them."""
    broker.sweeper.attempts = attempts
    broker.sweeper.retry_base = 0.05
    broker.sweeper.retry_cap = 0.2


async def swept(broker: RedisBroker) -> dict[str, dict[str, Any]]:
    """Wait for the broker's sweep to end; each shard's sweep status, by URL."""
    await wait_for(lambda: not broker.sweeper.sweeping, SWEPT, "the ring sweep")
    shards: list[dict[str, Any]] = broker.sweeper.status()["shards"]  # type: ignore[assignment]
    return {shard["url"]: shard for shard in shards}


def positions_on(server: RedisServer) -> set[str | None]:
    """The posts that have a position (`:m`) on the server."""
    with server.client() as c:
        return {sweep.post_of_key(k) for k in c.scan_iter(match=sweep.MATCH, count=1000)}


def epoch_on(server: RedisServer, post: str) -> str | None:
    epoch = server.command("HGET", streams.keys(post)[0], "epoch")
    return None if epoch is None else epoch.decode()


def failed_sweeps() -> float:
    return REGISTRY.get_sample_value("livecomments_redis_ring_sweep_failures_total") or 0.0


def swept_posts(reason: str) -> float:
    name = "livecomments_redis_ring_swept_posts_total"
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


MakeHub = Callable[..., Awaitable[tuple[Hub, RedisBroker]]]


@pytest.fixture
async def make_hub() -> AsyncIterator[MakeHub]:
    """A real Hub over a real RedisBroker: a node whose viewers are Watchers."""
    hubs: list[Hub] = []

    async def make(urls: list[str], **settings: Any) -> tuple[Hub, RedisBroker]:
        broker = RedisBroker(ring_settings(urls, **settings), HistorySettings())
        hub = Hub(broker)
        await hub.start()
        hubs.append(hub)
        await wait_for(lambda: broker.status()["status"] == "ok", DEADLINE, "broker up")
        return hub, broker

    yield make
    await asyncio.gather(*(hub.stop() for hub in hubs))


def numbers(watcher: Watcher) -> list[int]:
    """The `n` of every comment the watcher was given, in order."""
    return [e["comment"]["n"] for e in watcher.of("comment")]


@pytest.mark.parametrize("sweeps", ["done", "unreachable"])
async def test_a_post_back_from_another_shard_gets_its_viewers_a_reset_never_recovered(
    redis_nodes: RedisServers, make_broker: MakeBroker, make_hub: MakeHub, sweeps: str
):
    """A -> B -> A, through the hub: a server added, then removed again. A viewer away the whole
    time comes back with its position on A: it must be told to reload, not `recovered` (it
    missed what was published on B). A viewer that stayed sees every comment once, and one
    reset per move. `unreachable`: no sweep ever reaches a shard, so the guard alone (DROP_STALE
    before each script) must keep the promise; `done`: the sweeps run to the end in between."""
    a, b = (server.url for server in redis_nodes.start(2))
    post = next(p for p in (f"trip-{i}" for i in range(999)) if Ring([a, b]).node_for(p) == b)
    sender, _ = await make_broker([a])
    hub, receiver = await make_hub([a])
    nodes = [sender, receiver]
    if sweeps == "unreachable":
        nowhere = f"redis://127.0.0.1:{free_port()}/0"
        for node in nodes:
            quick_retries(node, attempts=1)
            node.sweeper.connect = lambda url: Redis.from_url(nowhere, protocol=2)
    stayed, away = Watcher(), Watcher()
    await hub.subscribe(stayed, post, None)
    await hub.subscribe(away, post, None)
    n = 0

    async def publish(count: int) -> None:
        """Comments appended by the other node, heard through Redis."""
        nonlocal n
        for _ in range(count):
            n += 1
            body = b'{"n":%d}' % n
            assert (await sender.append([comment(n, post, body)]))[0] is not None
        await wait_for(lambda: n in numbers(stayed), DEADLINE, f"comment {n}")

    await publish(2)
    (subscribed,) = away.of("subscribed")
    left = Position(subscribed["epoch"], away.offsets()[-1])
    assert left.offset == 2
    await hub.unsubscribe(away, post)

    for urls in ([a, b], [a]):  # out to B, and back
        resets = len(stayed.of("reset"))
        for node in nodes:
            await node.reconfigure(ring_settings(urls))
        await wait_for(lambda r=resets: len(stayed.of("reset")) > r, DEADLINE, "the move's reset")
        if sweeps == "done":
            for node in nodes:
                await swept(node)
                assert node.sweeper.status()["pending"] == {}
        else:
            assert receiver.sweeper.status()["pending"]  # the sweeps failed: still guarded
        await publish(2)

    # The stayed viewer: every comment once, in order; a reset at each move, each a new epoch.
    assert numbers(stayed) == [1, 2, 3, 4, 5, 6]
    reset_epochs = [e["epoch"] for e in stayed.of("reset")]
    assert len(reset_epochs) == 2 and len({left.epoch, *reset_epochs}) == 3
    offsets = [e["offset"] for e in stayed.events if e["type"] in ("comment", "reset")]
    assert offsets == [1, 2, 0, 1, 2, 0, 1, 2]
    # The away viewer: its epoch is gone for good; told to reload, from the current position.
    back = Watcher()
    await hub.subscribe(back, post, left)
    (answer,) = back.of("subscribed")
    assert answer["recovered"] is False
    assert (answer["epoch"], answer["offset"]) == (reset_epochs[-1], 2)
    history = await sender.history(post, left)
    assert not history.complete and history.position == Position(reset_epochs[-1], 2)


@pytest.mark.fault
async def test_a_server_removed_while_stopped_and_added_back_continues_none_of_its_positions(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """Removed from the ring while it did not answer (its removal sweep gives up, so it keeps
    every key), then added back: the change that adds it makes every epoch it kept stale. The
    guard drops the one asked for at once; the sweep drops the rest."""
    a, b = redis_nodes.start(2)
    broker, _ = await make_broker([a.url, b.url], timeout=0.5)
    quick_retries(broker, attempts=2)
    on_b = [p for p in (f"gone-{i}" for i in range(200)) if broker.ring.node_for(p) == b.url]
    post, others = on_b[0], on_b[1:10]
    (left,) = await broker.append([comment(1, post)])
    assert left is not None and epoch_on(b, post) == left.epoch
    assert None not in await broker.append([comment(10 + i, p) for i, p in enumerate(others)])
    # One of them with a deletion: its deleted-ids key (:x) is one of its keys too.
    assert None not in await broker.append([Entry(99, others[0], DELETE, b"10")])
    assert b.command("EXISTS", streams.keys(others[0])[3]) == 1
    failures = failed_sweeps()

    b.pause()
    try:
        started = time.monotonic()
        await broker.reconfigure(ring_settings([a.url], timeout=0.5))
        assert time.monotonic() - started < 1.5, "the reload waited for the sweep"
        (while_away,) = await broker.append([comment(2, post)])
        assert while_away is not None and while_away.epoch != left.epoch
        sweeps = await swept(broker)
        assert sweeps[b.url]["retired"] and sweeps[b.url]["state"] == "failed"
        assert sweeps[b.url]["attempts"] == 2 and "Timeout" in sweeps[b.url]["last_error"]
        assert sweeps[a.url]["state"] == "done"
        assert failed_sweeps() == failures + 1
    finally:
        b.resume()
    assert epoch_on(b, post) == left.epoch  # kept: nobody could delete it

    await broker.reconfigure(ring_settings([a.url, b.url], timeout=0.5))
    history = await broker.history(post, left)
    assert not history.complete, f"{history.position} continues {left}"
    assert history.position.epoch not in (left.epoch, while_away.epoch)
    (again,) = await broker.append([comment(3, post)])
    assert again == Position(history.position.epoch, 1)
    sweeps = await swept(broker)
    assert sweeps[b.url]["state"] == sweeps[a.url]["state"] == "done"
    assert positions_on(b) == {post}  # the others' stale epochs are gone, the new one stays
    for other in others:
        assert b.command("EXISTS", *streams.keys(other)) == 0
    assert positions_on(a) == set()  # the post left A again
    assert epoch_on(b, post) == again.epoch


async def test_posts_that_stay_on_their_shard_keep_their_epoch_across_ring_changes(
    redis_nodes: RedisServers, make_broker: MakeBroker, make_hub: MakeHub
):
    """A server added and removed again: the posts it never carried are untouched (same epoch,
    offsets go on, no reset, their keys where they were); the posts that went and came back
    reset once per move."""
    urls = [s.url for s in redis_nodes.start(3)]
    sender, _ = await make_broker(urls[:2])
    hub, receiver = await make_hub(urls[:2])
    posts = [f"stay-{i}" for i in range(40)]
    old, new = Ring(urls[:2]), Ring(urls)
    moved = {p for p in posts if old.node_for(p) != new.node_for(p)}
    assert 3 < len(moved) < 30
    watchers = {p: Watcher() for p in posts}
    for post, watcher in watchers.items():
        await hub.subscribe(watcher, post, None)
    first = await sender.append([comment(i, p, b'{"n":1}') for i, p in enumerate(posts)])
    await wait_for(
        lambda: all(numbers(w) == [1] for w in watchers.values()), DEADLINE, "first comments"
    )

    for ring in (urls, urls[:2]):
        for node in (sender, receiver):
            await node.reconfigure(ring_settings(ring))
        for node in (sender, receiver):
            await swept(node)
    latest = await sender.append([comment(100 + i, p, b'{"n":2}') for i, p in enumerate(posts)])
    after_move = dict(zip(posts, latest, strict=True))

    def has_second(post: str) -> bool:
        """Live, or covered by the move's reset: the hub learns the post's position on its
        shard in the background, so the append may come first and the reset's offset then
        includes it (the client reloads with GET and continues from there: nothing missed)."""
        if numbers(watchers[post]) == [1, 2]:
            return True
        resets = watchers[post].of("reset")
        position = after_move[post]
        return (
            post in moved
            and numbers(watchers[post]) == [1]
            and len(resets) == 2
            and position is not None
            and resets[-1]["epoch"] == position.epoch
            and resets[-1]["offset"] >= position.offset
        )

    await wait_for(lambda: all(has_second(p) for p in posts), DEADLINE, "second comments")
    await wait_for(
        lambda: all(len(watchers[p].of("reset")) == 2 for p in moved), DEADLINE, "moves' resets"
    )
    servers = {s.url: s for s in redis_nodes.servers}
    old = Ring(urls[:2])
    for post, before, after in zip(posts, first, latest, strict=True):
        assert before is not None and after is not None
        if post in moved:
            assert after.epoch != before.epoch and after.offset == 1
        else:
            assert after == Position(before.epoch, 2)
            assert watchers[post].of("reset") == []
            assert epoch_on(servers[old.node_for(post)], post) == before.epoch
    assert positions_on(servers[urls[2]]) == set()  # left the ring: emptied


async def test_a_sweep_of_thousands_of_posts_deletes_exactly_what_no_longer_belongs(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """5000 posts on two servers, a third added; that third one kept keys from an earlier
    stay in a ring. After the sweep each server holds exactly the posts the new ring gives it,
    minus the stale ones, in bounded time, and the reload did not wait for it."""
    a, b, c = redis_nodes.start(3)
    broker, _ = await make_broker([a.url, b.url])
    posts = [f"many-{i}" for i in range(5000)]
    assert None not in await broker.append([comment(i, p) for i, p in enumerate(posts)])
    # What C kept: half from long ago, half written just now (by nodes already on the new
    # ring, as far as anyone can tell: within the margin, so fresh).
    earlier, _ = await make_broker([c.url])
    kept_on_c = [f"earlier-{i}" for i in range(400)]
    assert None not in await earlier.append([comment(i, p) for i, p in enumerate(kept_on_c)])
    long_ago, lately = kept_on_c[::2], kept_on_c[1::2]
    seconds, _ = c.command("TIME")
    with c.client() as r, r.pipeline(transaction=False) as pipe:
        for post in long_ago:
            pipe.hset(streams.keys(post)[0], "at", (int(seconds) - 3600) * 1000)
        pipe.execute()

    old, new = Ring([a.url, b.url]), Ring([a.url, b.url, c.url])
    counted = {r: swept_posts(r) for r in sweep.REASONS}
    started = time.monotonic()
    await broker.reconfigure(ring_settings([a.url, b.url, c.url]))
    assert time.monotonic() - started < 1.0, "the reload waited for the sweep"
    sweeps = await swept(broker)
    took = time.monotonic() - started
    assert took < 10.0, took

    for server in (a, b):
        mine = {p for p in posts if new.node_for(p) == server.url}
        assert positions_on(server) == mine
        gone = {p for p in posts if old.node_for(p) == server.url} - mine
        assert sweeps[server.url]["dropped"] == {"moved_away": len(gone), "stale": 0, "retired": 0}
        assert sweeps[server.url]["scanned"] == len(mine) + len(gone)
        for post in list(gone)[:20]:
            assert server.command("EXISTS", *streams.keys(post)) == 0  # :s and :i too
    assert positions_on(c) == {p for p in lately if new.node_for(p) == c.url}
    assert sweeps[c.url]["dropped"] == {
        "moved_away": sum(1 for p in kept_on_c if new.node_for(p) != c.url),
        "stale": sum(1 for p in long_ago if new.node_for(p) == c.url),
        "retired": 0,
    }
    assert broker.sweeper.status()["pending"] == {}
    for reason in sweep.REASONS:
        assert swept_posts(reason) - counted[reason] == sum(
            s["dropped"][reason] for s in sweeps.values()
        )


@pytest.mark.fault
async def test_a_shard_down_during_the_sweep_does_not_stop_the_others(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """A, B, C -> A, B, D with C dead and B stopped in the middle of its sweep: A and D are
    swept meanwhile, C is given up (logged, counted), and B's sweep resumes where it stopped
    once B answers again."""
    a, b, c, d = redis_nodes.start(4)
    broker, _ = await make_broker([a.url, b.url, c.url], timeout=0.5)
    sweeper = broker.sweeper
    sweeper.scan_count, sweeper.pause = 20, 0.05  # a sweep of a few seconds: time to stop B
    quick_retries(broker, attempts=10)
    posts = [f"down-{i}" for i in range(600)]
    assert None not in await broker.append([comment(i, p) for i, p in enumerate(posts)])
    old, new = Ring([a.url, b.url, c.url]), Ring([a.url, b.url, d.url])

    def stay_on(server: RedisServer) -> set[str | None]:
        return {p for p in posts if old.node_for(p) == new.node_for(p) == server.url}

    failures = failed_sweeps()

    c.kill()
    await broker.reconfigure(ring_settings([a.url, b.url, d.url], timeout=0.5))
    await wait_for(
        lambda: b.url in sweeper.sweeps and sweeper.sweeps[b.url].scanned > 0,
        DEADLINE,
        "B's sweep under way",
        every=0.002,
    )
    b.pause()
    try:
        await wait_for(
            lambda: sweeper.sweeps[a.url].state == sweeper.sweeps[d.url].state == "done",
            DEADLINE,
            "A and D swept",
        )
        await wait_for(lambda: sweeper.sweeps[c.url].state == "failed", DEADLINE, "C given up")
        await wait_for(lambda: sweeper.sweeps[b.url].attempts >= 2, DEADLINE, "B retried")
        assert sweeper.sweeps[b.url].state in ("sweeping", "retrying")
        assert positions_on(a) == stay_on(a)
    finally:
        b.resume()
    sweeps = await swept(broker)
    assert sweeps[b.url]["state"] == "done" and sweeps[b.url]["attempts"] >= 2
    assert positions_on(b) == stay_on(b)
    assert sweeps[c.url]["retired"] and sweeps[c.url]["attempts"] == 10
    assert failed_sweeps() == failures + 1
    assert sweeper.status()["pending"] == {}


async def test_a_rollback_in_the_middle_of_a_sweep_is_swept_as_well(
    redis_nodes: RedisServers, make_broker: MakeBroker
):
    """A server added, and removed again while the first sweep is half done: that sweep stops
    and the next covers both changes. The posts that went and came back leave no old epoch
    behind (whether or not the first sweep had reached them), the others keep theirs, and no
    sweep connection is left open."""
    servers = redis_nodes.start(3)
    urls = [s.url for s in servers]
    broker, _ = await make_broker(urls[:2])
    sweeper = broker.sweeper
    sweeper.scan_count, sweeper.pause = 10, 0.02  # a sweep of a few seconds
    posts = [f"roll-{i}" for i in range(600)]
    assert None not in await broker.append([comment(i, p) for i, p in enumerate(posts)])
    two, three = Ring(urls[:2]), Ring(urls)
    stayed = {p for p in posts if two.node_for(p) == three.node_for(p)}
    assert 100 < len(stayed) < len(posts) - 100

    await broker.reconfigure(ring_settings(urls))
    await wait_for(
        lambda: any(s.dropped["moved_away"] for s in sweeper.sweeps.values()),
        DEADLINE,
        "the first sweep under way",
        every=0.002,
    )
    assert sweeper.sweeping
    await broker.reconfigure(ring_settings(urls[:2]))
    assert sweeper.status()["pending"] == {urls[0]: 2, urls[1]: 2}
    sweeps = await swept(broker)
    assert sweeps[urls[0]]["state"] == sweeps[urls[1]]["state"] == "done"
    assert positions_on(servers[0]) | positions_on(servers[1]) == stayed
    assert sweeper.status()["pending"] == {}

    def sweep_connections() -> int:
        names = [s.command("CLIENT", "LIST").decode() for s in servers]
        return sum(text.count(f"name=livecomments:{broker.node_id}:sweep") for text in names)

    await wait_for(lambda: sweep_connections() == 0, DEADLINE, "sweep connections closed")
