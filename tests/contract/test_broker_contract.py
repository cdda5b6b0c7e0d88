"""The Bridge contract, one suite over every bridge: the in-memory one (a cluster of one node)
and the Redis one (two nodes on two private redis-servers, a ring over both).

What any bridge under a hub promises (live/bridge.py): every subscriber on every node receives
each comment once, in its publisher's order; nobody receives a comment twice through their own
node's echo; after the last local subscriber leaves, nothing more arrives; publishing to a post
nobody follows, or while nobody listens, never raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from livecomments.config import RedisSettings
from livecomments.live.bridge import MemoryBridge
from livecomments.live.hub import Hub
from livecomments.live.redis.bridge import RedisBridge
from livecomments.model.comment import Comment
from tests.support.redis_servers import RedisServers, redis_servers
from tests.support.wait import wait_for

DEADLINE = 10.0


class Socket:
    """A subscriber as the hub sees one: it takes whole frames."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def offer(self, frame: bytes) -> bool:
        event = orjson.loads(frame[2:] if frame[1] < 126 else frame[4:])
        if event["type"] == "comment":
            self.messages.append(event["comment"]["message"])
        return True


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path) as servers:
        yield servers


@pytest.fixture(params=["memory", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[list[Hub]]:
    """The hubs of one cluster, started; stopped afterwards."""
    if request.param == "memory":
        hubs = [Hub(MemoryBridge())]
    else:
        servers: RedisServers = request.getfixturevalue("redis")
        urls = [s.url for s in servers.start(2)]
        hubs = [Hub(RedisBridge(RedisSettings(urls=urls, probe_interval=5.0))) for _ in range(2)]
    for hub in hubs:
        await hub.start()
    for hub in hubs:
        await wait_for(lambda h=hub: h.bridge_status()["status"] == "ok", DEADLINE, "bridge up")
    yield hubs
    for hub in hubs:
        await hub.stop()


def publish(hub: Hub, post_id: str, message: str, i: int) -> None:
    hub.publish(post_id, Comment(i, post_id, "u", message, None, None, 1).encode())


async def test_every_subscriber_gets_every_comment_once_in_each_publishers_order(
    nodes: list[Hub],
):
    watchers = {id(hub): [Socket(), Socket()] for hub in nodes}
    for hub in nodes:
        for socket in watchers[id(hub)]:
            await hub.subscribe(socket, "contract")
    expected: list[str] = []
    for n, hub in enumerate(nodes):
        for i in range(50):
            message = f"node{n}-{i}"
            publish(hub, "contract", message, n * 1000 + i)
            expected.append(message)
    everyone = [s for sockets in watchers.values() for s in sockets]
    await wait_for(
        lambda: all(len(s.messages) >= len(expected) for s in everyone), DEADLINE, "delivery"
    )
    for socket in everyone:
        assert sorted(socket.messages) == sorted(expected)  # each once: no echo, no repeat
        for n in range(len(nodes)):
            mine = [m for m in socket.messages if m.startswith(f"node{n}-")]
            assert mine == [f"node{n}-{i}" for i in range(50)]  # the publisher's order


async def test_nothing_arrives_after_the_last_local_subscriber_left(nodes: list[Hub]):
    socket = Socket()
    listener = nodes[-1]
    await listener.subscribe(socket, "leaving")
    publish(nodes[0], "leaving", "before", 1)
    await wait_for(lambda: socket.messages == ["before"], DEADLINE, "the first comment")
    await listener.unsubscribe(socket, "leaving")
    assert listener.post_count == 0
    later = Socket()
    await nodes[0].subscribe(later, "leaving")  # a witness that the next one did go out
    publish(nodes[0], "leaving", "after", 2)
    await wait_for(lambda: later.messages == ["after"], DEADLINE, "the witness's comment")
    assert socket.messages == ["before"]


async def test_publishing_where_nobody_listens_never_raises(nodes: list[Hub]):
    for i, hub in enumerate(nodes):
        publish(hub, "nobody-here", "into the void", i)
        assert hub.bridge_status()["status"] == "ok"
