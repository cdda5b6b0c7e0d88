"""The hub with fake sockets and a gated bridge: fan-out, and the per-post transitions."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from livecomments.config import RedisSettings
from livecomments.live.bridge import BridgeUnavailable, HubListener, MemoryBridge
from livecomments.live.conn import Conn, WriteBatcher, text_frame
from livecomments.live.hub import Hub, TooManyPosts
from livecomments.model.comment import Comment
from livecomments.model.ids import EPOCH_MS, SnowflakeGenerator, lowest_id_at


class FakeSocket:
    def __init__(self, accept: bool = True) -> None:
        self.received: list[bytes] = []
        self.accept = accept

    def offer(self, payload: bytes) -> bool:
        if self.accept:
            self.received.append(payload)
        return self.accept


class GatedBridge(MemoryBridge):
    """Records bridge calls; subscribe/unsubscribe wait on gates the test opens."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.following: set[str] = set()
        self.sub_gate = asyncio.Event()
        self.unsub_gate = asyncio.Event()
        self.sub_gate.set()
        self.unsub_gate.set()
        self.fail_subscribe: type[Exception] | None = None
        self.published: list[tuple[str, bytes]] = []

    async def subscribe(self, post_id: str) -> None:
        self.calls.append(("subscribe", post_id))
        await self.sub_gate.wait()
        if self.fail_subscribe is not None:
            raise self.fail_subscribe("redis down")
        self.following.add(post_id)

    async def unsubscribe(self, post_id: str) -> None:
        self.calls.append(("unsubscribe", post_id))
        await self.unsub_gate.wait()
        self.following.discard(post_id)

    def publish(self, post_id: str, payload: bytes) -> None:
        self.published.append((post_id, payload))

    async def start(self, listener: HubListener) -> None:
        pass

    async def reconfigure(self, settings: RedisSettings) -> None:
        pass


def payload_of(frame: bytes) -> bytes:
    """Strip the WebSocket header the hub put in front of the event."""
    assert frame[0] == 0x81, "not a final text frame"
    n = frame[1]
    start = 2 if n < 126 else 4 if n == 126 else 10
    return frame[start:]


def make_comment(i: int, post: str = "p") -> Comment:
    return Comment(i, post, "u", f"m{i}", None, None, 1)


async def test_publish_encodes_once_and_offers_the_same_bytes_to_everyone():
    bridge = GatedBridge()
    hub = Hub(bridge)
    socks = [FakeSocket() for _ in range(50)]
    for s in socks:
        await hub.subscribe(s, "p")
    other = FakeSocket()
    await hub.subscribe(other, "q")
    hub.publish("p", make_comment(1).encode())
    payloads = {id(s.received[0]) for s in socks}
    assert len(payloads) == 1, "each socket got its own copy: encoded more than once"
    assert orjson.loads(payload_of(socks[0].received[0]))["comment"]["id"] == "1"
    assert other.received == []
    assert bridge.published == [("p", payload_of(socks[0].received[0]))]


async def test_a_refusing_socket_does_not_stop_the_others():
    hub = Hub(GatedBridge())
    slow, fine = FakeSocket(accept=False), FakeSocket()
    await hub.subscribe(slow, "p")
    await hub.subscribe(fine, "p")
    for i in range(3):
        hub.publish("p", make_comment(i).encode())
    assert len(fine.received) == 3


async def test_bridge_follows_a_post_only_while_it_has_local_subscribers():
    bridge = GatedBridge()
    hub = Hub(bridge)
    a, b = FakeSocket(), FakeSocket()
    await hub.subscribe(a, "p")
    await hub.subscribe(b, "p")
    assert bridge.calls == [("subscribe", "p")]
    await hub.unsubscribe(a, "p")
    assert "p" in bridge.following
    await hub.unsubscribe(b, "p")
    assert bridge.calls == [("subscribe", "p"), ("unsubscribe", "p")]
    assert hub.post_count == 0 and not bridge.following


async def test_failed_bridge_subscribe_is_rolled_back():
    bridge = GatedBridge()
    bridge.fail_subscribe = ConnectionError
    hub = Hub(bridge)
    with pytest.raises(ConnectionError):
        await hub.subscribe(FakeSocket(), "p")
    assert hub.post_count == 0 and not hub.local_posts()
    bridge.fail_subscribe = None
    s = FakeSocket()
    await hub.subscribe(s, "p")
    assert "p" in bridge.following
    hub.publish("p", make_comment(1).encode())
    assert len(s.received) == 1


async def test_a_bridge_that_is_down_keeps_the_subscriber_and_the_post_for_later():
    bridge = GatedBridge()
    bridge.fail_subscribe = BridgeUnavailable
    hub = Hub(bridge)
    s = FakeSocket()
    await hub.subscribe(s, "p")
    hub.publish("p", make_comment(1).encode())
    assert len(s.received) == 1, "local delivery must not wait for the bridge"
    # The bridge resubscribes from local_posts() when it reconnects: the post must be there.
    assert "p" in hub.local_posts()


async def test_subscribe_while_last_unsubscribe_is_in_flight_keeps_the_post_followed():
    bridge = GatedBridge()
    hub = Hub(bridge)
    first, second = FakeSocket(), FakeSocket()
    await hub.subscribe(first, "p")
    bridge.unsub_gate.clear()
    leaving = asyncio.create_task(hub.unsubscribe(first, "p"))
    for _ in range(100):  # the task reaches the bridge within a few loop turns
        if ("unsubscribe", "p") in bridge.calls:
            break
        await asyncio.sleep(0)
    assert ("unsubscribe", "p") in bridge.calls
    joining = asyncio.create_task(hub.subscribe(second, "p"))
    await asyncio.sleep(0)
    assert not joining.done(), "joined on the fast path while the bridge was unsubscribing"
    bridge.unsub_gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, joining), 5)
    assert "p" in bridge.following, "a local subscriber but the bridge stopped following"
    assert bridge.calls[-1] == ("subscribe", "p")


async def test_unsubscribe_while_first_subscribe_is_in_flight():
    bridge = GatedBridge()
    hub = Hub(bridge)
    a, b = FakeSocket(), FakeSocket()
    bridge.sub_gate.clear()
    sub_a = asyncio.create_task(hub.subscribe(a, "p"))
    sub_b = asyncio.create_task(hub.subscribe(b, "p"))
    await asyncio.sleep(0)
    bridge.sub_gate.set()
    await asyncio.wait_for(asyncio.gather(sub_a, sub_b), 5)
    assert bridge.calls == [("subscribe", "p")], "second subscriber subscribed the bridge again"
    await hub.unsubscribe(a, "p")
    assert "p" in bridge.following
    hub.publish("p", make_comment(1).encode())
    assert len(b.received) == 1 and a.received == []


async def test_post_limit_per_instance():
    hub = Hub(GatedBridge(), max_posts=2)
    s = FakeSocket()
    await hub.subscribe(s, "a")
    await hub.subscribe(s, "b")
    with pytest.raises(TooManyPosts):
        await hub.subscribe(s, "c")
    await hub.subscribe(FakeSocket(), "a")  # an already-followed post is still fine


async def test_resync_reaches_subscribers_of_the_named_posts_only():
    hub = Hub(GatedBridge())
    a, b = FakeSocket(), FakeSocket()
    await hub.subscribe(a, "p")
    await hub.subscribe(b, "q")
    since = EPOCH_MS + 3_600_000
    hub.resync(["p", "unknown"], since_ms=since)
    assert [orjson.loads(payload_of(x)) for x in a.received] == [
        {"type": "resync", "post_id": "p", "after": str(lowest_id_at(since - 5_000))}
    ]
    # A comment created on a host whose clock is 4 s behind ours is still after `after`.
    later = SnowflakeGenerator(1, lambda: since - 4_000).next_id()
    assert int(orjson.loads(payload_of(a.received[0]))["after"]) < later
    assert b.received == []


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frame_lengths_follow_rfc6455(size: int):
    payload = b"x" * size
    frame = text_frame(payload)
    assert payload_of(frame) == payload
    n = frame[1]
    length = n if n < 126 else int.from_bytes(frame[2:4] if n == 126 else frame[2:10], "big")
    assert length == size


class BrokenTransport:
    """A transport whose write raises: the batcher must carry on with the other sockets."""

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.written: list[bytes] = []
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("transport is broken")
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


class NoWebSocket:
    async def close(self, *, code: int, message: bytes) -> bool:
        raise ConnectionResetError("gone")


async def test_a_failing_socket_write_does_not_stall_the_others():
    batcher = WriteBatcher()
    transports = [BrokenTransport(broken=i == 0) for i in range(3)]
    conns = [Conn(NoWebSocket(), t, batcher, 1 << 20) for t in transports]
    frame = text_frame(b'{"type":"pong"}')
    for conn in conns:
        conn.offer(frame)
    for _ in range(10):  # the batcher runs on the next loop turn
        await asyncio.sleep(0)
    assert [t.written for t in transports[1:]] == [[frame], [frame]]
    assert conns[0].closing
    await conns[0].wait_closed()
    assert transports[0].aborted
    for conn in conns[1:]:  # and they keep working afterwards
        conn.offer(frame)
    for _ in range(10):
        await asyncio.sleep(0)
    assert [len(t.written) for t in transports[1:]] == [2, 2]
