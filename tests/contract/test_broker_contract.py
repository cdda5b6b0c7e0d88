"""The Broker contract, one suite over every broker: the in-memory one (a cluster of one node)
and the Redis one (two nodes over two private redis-servers, a ring over both).

What any broker promises (live/broker.py): `append` gives each comment the next offset of its
post's stream, once (a repeated append returns the first position); every node following the
post, the appending one included, is handed each publication in offset order; `history` says
where a stream is and replays what it still holds after a position, or says it cannot; and, under
a hub, every viewer on every node sees each comment once, in one order for all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import orjson
import pytest

from livecomments.config import HistorySettings, RedisSettings
from livecomments.live.broker import Broker, MemoryBroker
from livecomments.live.hub import Hub
from livecomments.live.redis.broker import RedisBroker
from livecomments.model.comment import Comment
from livecomments.model.stream import COMMENT, DELETE, Entry, Position
from tests.support.listener import RecordingListener
from tests.support.redis_servers import RedisServers, redis_servers
from tests.support.wait import wait_for

DEADLINE = 10.0
HISTORY = HistorySettings(size=50, ttl=60, meta_ttl=600)


def entry(i: int, post_id: str = "p", message: str | None = None) -> Entry:
    body = Comment(i, post_id, "u", message or f"m{i}", None, None, 1).encode()
    return Entry(i, post_id, COMMENT, body)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path) as servers:
        yield servers


@pytest.fixture(params=["memory", "redis"])
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[list[Broker]]:
    """The brokers of one cluster (one per node), not started."""
    made: list[Broker]
    if request.param == "memory":
        made = [MemoryBroker(HISTORY)]
    else:
        servers: RedisServers = request.getfixturevalue("redis")
        urls = [s.url for s in servers.start(2)]
        settings = RedisSettings(urls=urls, probe_interval=5.0)
        made = [RedisBroker(settings, HISTORY) for _ in range(2)]
    yield made
    for broker in made:
        await broker.stop()


async def started(brokers: list[Broker], posts: Iterable[str]) -> list[RecordingListener]:
    recorders = []
    for broker in brokers:
        recorder = RecordingListener(posts)
        await broker.start(recorder)
        recorders.append(recorder)
    for broker in brokers:
        await wait_for(lambda b=broker: b.status()["status"] == "ok", DEADLINE, "connected")
        for post in posts:
            await broker.subscribe(post)
    return recorders


# -- append ------------------------------------------------------------------------------------


async def test_append_numbers_a_stream_from_one_and_once_per_comment(brokers: list[Broker]):
    await started(brokers, [])
    first = await brokers[0].append([entry(1), entry(2)])
    assert [p.offset for p in first if p] == [1, 2]
    epoch = first[0].epoch if first[0] else ""
    # Another node continues the same stream; a repeat keeps its first offset.
    again = await brokers[-1].append([entry(3), entry(1), entry(4, "q")])
    assert again == [Position(epoch, 3), Position(epoch, 1), again[2]]
    assert again[2] is not None and again[2].offset == 1  # another post, its own stream
    assert await brokers[0].position("p") == Position(epoch, 3)


async def test_every_following_node_gets_every_publication_in_order_the_appender_too(
    brokers: list[Broker],
):
    recorders = await started(brokers, ["p"])
    for i in range(1, 31):
        await brokers[i % len(brokers)].append([entry(i)])
    for recorder in recorders:
        await wait_for(lambda r=recorder: len(r.offsets("p")) >= 30, DEADLINE, "delivery")
        assert recorder.offsets("p") == list(range(1, 31))
        bodies = [orjson.loads(p.body)["message"] for p in recorder.publications]
        assert bodies == [f"m{i}" for i in range(1, 31)]


# -- history -----------------------------------------------------------------------------------


async def test_history_replays_after_a_position_in_its_epoch(brokers: list[Broker]):
    await started(brokers, [])
    positions = await brokers[0].append([entry(i) for i in range(1, 6)])
    epoch = positions[0].epoch if positions[0] else ""
    history = await brokers[-1].history("p", Position(epoch, 2), 100)
    assert history.complete and history.position == Position(epoch, 5)
    assert [p.offset for p in history.publications] == [3, 4, 5]
    assert orjson.loads(history.publications[0].body)["message"] == "m3"
    assert (await brokers[-1].history("p", Position(epoch, 5), 100)).publications == []


async def test_history_says_so_when_it_cannot_replay(brokers: list[Broker]):
    await started(brokers, [])
    # Redis trims in whole nodes of about 100 entries: go well past the size.
    positions = await brokers[0].append([entry(i) for i in range(1, HISTORY.size * 6)])
    epoch = positions[0].epoch if positions[0] else ""
    trimmed = await brokers[-1].history("p", Position(epoch, 1), 1000)
    assert not trimmed.complete and trimmed.publications == []  # offset 2 is gone
    other = await brokers[-1].history("p", Position("another-epoch", 3), 1000)
    assert not other.complete and other.position.epoch == epoch


async def test_a_position_past_the_streams_end_is_not_complete(brokers: list[Broker]):
    """A viewer holding an offset its epoch never reached (the shard lost offsets: a restored
    snapshot): the offsets will be given again to other comments, so it must reload."""
    await started(brokers, [])
    positions = await brokers[0].append([entry(i) for i in range(1, 4)])
    epoch = positions[0].epoch if positions[0] else ""
    ahead = await brokers[-1].history("p", Position(epoch, 7), 100)
    assert not ahead.complete and ahead.publications == []
    assert ahead.position == Position(epoch, 3)


async def test_a_new_post_has_a_position_before_its_first_comment(brokers: list[Broker]):
    await started(brokers, [])
    empty = await brokers[0].history("fresh", None, 10)
    assert empty.position.offset == 0 and empty.complete
    appended = await brokers[-1].append([entry(1, "fresh")])
    assert appended == [Position(empty.position.epoch, 1)]  # the epoch a viewer was given


# -- under hubs: what viewers see --------------------------------------------------------------


class Socket:
    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.messages: list[str] = []

    def offer(self, frame: bytes) -> bool:
        event = orjson.loads(frame[2:] if frame[1] < 126 else frame[4:])
        if event["type"] == "comment":
            self.offsets.append(event["offset"])
            self.messages.append(event["comment"]["message"])
        return True


async def test_every_viewer_on_every_node_sees_every_comment_once_in_one_order(
    brokers: list[Broker],
):
    hubs = [Hub(broker) for broker in brokers]
    for hub in hubs:
        await hub.start()
    for broker in brokers:
        await wait_for(lambda b=broker: b.status()["status"] == "ok", DEADLINE, "connected")
    viewers = [Socket() for _ in range(2 * len(hubs))]
    for i, viewer in enumerate(viewers):
        await hubs[i % len(hubs)].subscribe(viewer, "shared", None)
    for i in range(1, 41):
        await brokers[i % len(brokers)].append([entry(i, "shared")])
    await wait_for(lambda: all(len(v.offsets) >= 40 for v in viewers), DEADLINE, "delivery")
    for viewer in viewers:
        assert viewer.offsets == list(range(1, 41))
        assert viewer.messages == viewers[0].messages  # one order for everyone
    for hub in hubs:
        await hub.stop()


# -- deletions ---------------------------------------------------------------------------------


async def test_a_deletion_takes_its_offset_and_leaves_the_recent_windows_full(
    brokers: list[Broker],
):
    """A deletion is a publication like a comment (one offset, once); a window of `recent`
    (Redis only: one node's memory broker has nothing another node lacks) never lists the
    deleted comment and still holds `limit` comments, however many deletions lie between."""
    recorders = await started(brokers, ["p"])
    await brokers[0].append([entry(i) for i in range(1, 11)])
    deletions = [Entry(100 + i, "p", DELETE, b"%d" % i) for i in (2, 4, 5, 6, 9)]
    positions = await brokers[-1].append(deletions)
    assert [p.offset for p in positions if p] == [11, 12, 13, 14, 15]
    again = await brokers[0].append(deletions[:1])  # the outbox repeating itself
    assert [p.offset for p in again if p] == [11]
    # ... and the deleted comment's own append, repeated: it must not come back.
    (comment_again,) = await brokers[-1].append([entry(2)])
    assert comment_again is not None and comment_again.epoch == positions[0].epoch
    assert comment_again.offset <= 15, comment_again  # no new offset: nothing published
    for recorder in recorders:
        await wait_for(lambda r=recorder: len(r.offsets("p")) == 15, DEADLINE, "15 offsets")
        assert recorder.offsets("p") == list(range(1, 16))
        assert [p.body for p in recorder.publications if p.kind == DELETE] == [
            b"2",
            b"4",
            b"5",
            b"6",
            b"9",
        ]
    if isinstance(brokers[0], MemoryBroker):
        assert await brokers[0].taken_down("p") == set()  # its queue and database know
        return
    assert await brokers[0].taken_down("p") == {2, 4, 5, 6, 9}

    def ids(bodies: list[bytes]) -> list[int]:
        return sorted(Comment.decode(b).id for b in bodies)

    assert ids(await brokers[1].recent("p", None, None, 3)) == [7, 8, 10]
    assert ids(await brokers[1].recent("p", None, 8, 3)) == [1, 3, 7]
    assert ids(await brokers[1].recent("p", 1, None, 3)) == [3, 7, 8]
    assert ids(await brokers[1].recent("p", None, None, 100)) == [1, 3, 7, 8, 10]
