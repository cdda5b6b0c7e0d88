"""The hub with fake sockets and a scripted broker: in-order delivery, gaps filled from the
history, resets, recovery on subscribe, and the per-post transitions, races driven by gates."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from livecomments.config import HistorySettings
from livecomments.live.broker import (
    BrokerUnavailable,
    History,
    MemoryBroker,
    ReconnectCallback,
    StreamListener,
)
from livecomments.live.conn import Conn, WriteBatcher, text_frame
from livecomments.live.hub import Hub, TooManyPosts
from livecomments.model.comment import Comment
from livecomments.model.stream import COMMENT, Entry, Position, Publication


class FakeSocket:
    def __init__(self, accept: bool = True) -> None:
        self.received: list[bytes] = []
        self.accept = accept

    def offer(self, frame: bytes) -> bool:
        if self.accept:
            self.received.append(frame)
        return self.accept

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(payload_of(f)) for f in self.received]

    def offsets(self) -> list[int | None]:
        """Every comment offset received, in order (a `comments` event gives several)."""
        out: list[int | None] = []
        for event in self.events():
            if event["type"] == "comment":
                out.append(event["offset"])
            elif event["type"] == "comments":
                out += range(event["offset"], event["offset"] + len(event["comments"]))
        return out


class ScriptedBroker:
    """A broker the test drives: it keeps streams like the real ones, but publishes only what
    the test hands to the hub, and its subscribe and history wait on gates."""

    def __init__(self) -> None:
        self.epoch = "e1"
        self.streams: dict[str, list[Publication]] = {}
        self.trimmed_below: dict[str, int] = {}  # the history holds offsets >= this
        self.calls: list[tuple[str, str]] = []
        self.following: set[str] = set()
        self.sub_gate = asyncio.Event()
        self.unsub_gate = asyncio.Event()
        self.history_gate = asyncio.Event()
        for gate in (self.sub_gate, self.unsub_gate, self.history_gate):
            gate.set()
        self.fail_subscribe: type[Exception] | None = None
        self.down = False
        self.listener: StreamListener | None = None

    def publish(self, post_id: str, message: str) -> Publication:
        """Append a comment to the stream (not delivered: the test decides)."""
        stream = self.streams.setdefault(post_id, [])
        offset = len(stream) + 1
        body = Comment(offset, post_id, "u", message, None, None, 1).encode()
        publication = Publication(post_id, self.epoch, offset, COMMENT, body)
        stream.append(publication)
        return publication

    def restart_empty(self, post_id: str) -> None:
        self.epoch = "e2"
        self.streams[post_id] = []

    async def start(self, listener: StreamListener) -> None:
        self.listener = listener

    async def stop(self) -> None:
        pass

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

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        return [None for _ in entries]

    async def history(self, post_id: str, since: Position | None = None, limit: int = 0) -> History:
        self.calls.append(("history", post_id))
        await self.history_gate.wait()
        if self.down:
            raise BrokerUnavailable("down")
        stream = self.streams.get(post_id, [])
        position = Position(self.epoch, len(stream))
        if since is None or since.epoch != self.epoch:
            return History(position, complete=since is None)
        held = [p for p in stream if p.offset > since.offset]
        low = self.trimmed_below.get(post_id, 1)
        if held and held[0].offset < low:
            return History(position, [], complete=False)
        return History(position, held)

    async def position(self, post_id: str) -> Position:
        return Position(self.epoch, len(self.streams.get(post_id, [])))

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        return []

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"status": "ok"}


def payload_of(frame: bytes) -> bytes:
    """Strip the WebSocket header the hub put in front of the event."""
    assert frame[0] == 0x81, "not a final text frame"
    n = frame[1]
    start = 2 if n < 126 else 4 if n == 126 else 10
    return frame[start:]


async def started_hub(broker: ScriptedBroker | None = None, **kw: Any) -> tuple[Hub, Any]:
    broker = broker or ScriptedBroker()
    hub = Hub(broker, **kw)
    await hub.start()
    return hub, broker


async def settle() -> None:
    """Let spawned fills run to their next await (none of them waits on anything real)."""
    for _ in range(20):
        await asyncio.sleep(0)


# -- fan-out -------------------------------------------------------------------------------------


async def test_a_publication_is_encoded_once_and_offered_as_the_same_bytes_to_everyone():
    hub, broker = await started_hub()
    socks = [FakeSocket() for _ in range(50)]
    for s in socks:
        await hub.subscribe(s, "p", None)
    other = FakeSocket()
    await hub.subscribe(other, "q", None)
    hub.on_publication(broker.publish("p", "hi"))
    frames = {id(s.received[-1]) for s in socks}
    assert len(frames) == 1, "each socket got its own copy: encoded more than once"
    event = orjson.loads(payload_of(socks[0].received[-1]))
    assert (event["type"], event["post_id"], event["offset"]) == ("comment", "p", 1)
    assert event["comment"]["message"] == "hi"
    assert [e["type"] for e in other.events()] == ["subscribed"]


async def test_a_refusing_socket_does_not_stop_the_others():
    hub, broker = await started_hub()
    slow, fine = FakeSocket(accept=False), FakeSocket()
    await hub.subscribe(slow, "p", None)
    await hub.subscribe(fine, "p", None)
    for i in range(3):
        hub.on_publication(broker.publish("p", f"m{i}"))
    assert fine.offsets() == [1, 2, 3]


# -- order, gaps and resets ----------------------------------------------------------------------


async def test_publications_are_delivered_in_order_once():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    first, second = broker.publish("p", "a"), broker.publish("p", "b")
    hub.on_publication(first)
    hub.on_publication(first)  # a repeat
    hub.on_publication(second)
    assert s.offsets() == [1, 2]


async def test_a_gap_is_filled_from_the_history_before_what_came_early():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    pubs = [broker.publish("p", f"m{i}") for i in range(5)]
    hub.on_publication(pubs[0])
    hub.on_publication(pubs[3])  # 2 and 3 were lost on the way
    hub.on_publication(pubs[4])
    assert s.offsets() == [1]  # nothing jumps ahead
    await settle()
    assert s.offsets() == [1, 2, 3, 4, 5]


async def test_a_gap_the_history_no_longer_holds_ends_in_reset():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    pubs = [broker.publish("p", f"m{i}") for i in range(6)]
    hub.on_publication(pubs[0])
    broker.trimmed_below["p"] = 4  # 2 and 3 are gone from the history
    hub.on_publication(pubs[5])
    await settle()
    resets = [e for e in s.events() if e["type"] == "reset"]
    assert resets == [{"type": "reset", "post_id": "p", "epoch": "e1", "offset": 6}]
    hub.on_publication(broker.publish("p", "after"))
    assert s.offsets()[-1] == 7


async def test_a_new_epoch_ends_in_reset_and_the_stream_goes_on_in_it():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    hub.on_publication(broker.publish("p", "old"))
    broker.restart_empty("p")  # Redis restarted empty
    hub.on_publication(broker.publish("p", "new"))
    await settle()
    events = s.events()
    assert {"type": "reset", "post_id": "p", "epoch": "e2", "offset": 1} in events
    assert s.offsets() == [1]  # the new epoch's first was part of the reload, not delivered


async def test_a_reported_gap_is_checked_against_the_stream():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    for i in range(3):
        broker.publish("p", f"lost {i}")  # published while a Pub/Sub session was down
    hub.on_stream_gap(["p", "not-followed"])
    await settle()
    assert s.offsets() == [1, 2, 3]


# -- recovery on subscribe -----------------------------------------------------------------------


async def test_a_viewer_with_a_position_is_replayed_what_it_missed_then_joins_live():
    hub, broker = await started_hub()
    watcher = FakeSocket()
    await hub.subscribe(watcher, "p", None)
    for i in range(5):
        hub.on_publication(broker.publish("p", f"m{i}"))
    back = FakeSocket()
    broker.history_gate.clear()  # the history read is slow...
    joining = asyncio.create_task(hub.subscribe(back, "p", Position("e1", 2)))
    await settle()
    hub.on_publication(broker.publish("p", "during"))  # ...and the stream goes on meanwhile
    broker.history_gate.set()
    await asyncio.wait_for(joining, 5)
    hub.on_publication(broker.publish("p", "after"))
    events = back.events()
    assert events[0] == {
        "type": "subscribed",
        "post_id": "p",
        "epoch": "e1",
        "offset": 6,
        "recovered": True,
    }
    assert back.offsets() == [3, 4, 5, 6, 7]  # nothing missed, nothing twice


async def test_a_viewer_joining_during_the_posts_first_fill_still_recovers():
    """The first viewer of a post on this node is waiting for the post's position (its first
    fill); a second one, back from another node with a position, joins meanwhile: it must be
    replayed what it missed, not told to reload for nothing."""
    hub, broker = await started_hub()
    for i in range(5):
        broker.publish("p", f"m{i}")
    broker.history_gate.clear()  # the first fill is slow
    first = asyncio.create_task(hub.subscribe(FakeSocket(), "p", None))
    await settle()
    back = FakeSocket()
    joining = asyncio.create_task(hub.subscribe(back, "p", Position("e1", 3)))
    await settle()
    broker.history_gate.set()
    await asyncio.wait_for(asyncio.gather(first, joining), 5)
    assert back.events()[0]["recovered"] is True, back.events()
    assert back.offsets() == [4, 5]
    assert [e["type"] for e in back.events()].count("reset") == 0


async def test_a_position_of_another_epoch_or_beyond_the_history_is_not_recovered():
    hub, broker = await started_hub()
    await hub.subscribe(FakeSocket(), "p", None)
    for i in range(5):
        hub.on_publication(broker.publish("p", f"m{i}"))
    broker.trimmed_below["p"] = 4
    for since in (Position("old", 2), Position("e1", 1)):
        s = FakeSocket()
        await hub.subscribe(s, "p", since)
        now = len(broker.streams["p"])
        assert s.events() == [
            {"type": "subscribed", "post_id": "p", "epoch": "e1", "offset": now, "recovered": False}
        ]
        hub.on_publication(broker.publish("p", "next"))
        assert s.offsets() == [now + 1]


async def test_resubscribing_with_a_position_recovers_on_the_same_socket():
    hub, broker = await started_hub()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    hub.on_publication(broker.publish("p", "m1"))
    s.accept = False  # frames 2 and 3 never reach the client
    hub.on_publication(broker.publish("p", "m2"))
    hub.on_publication(broker.publish("p", "m3"))
    s.accept = True
    await hub.subscribe(s, "p", Position("e1", 1))  # the client saw a gap and asks again
    assert s.offsets() == [1, 2, 3]
    assert hub.subscribers("p") == 1


# -- the broker being down ---------------------------------------------------------------------


async def test_a_broker_that_is_down_keeps_the_viewer_and_gives_it_a_position_later():
    broker = ScriptedBroker()
    broker.fail_subscribe = BrokerUnavailable
    broker.down = True
    hub, _ = await started_hub(broker)
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    assert s.events() == [
        {"type": "subscribed", "post_id": "p", "epoch": None, "offset": None, "recovered": False}
    ]
    assert "p" in hub.local_posts()  # the broker follows it from here when it is back
    body = Comment(9, "p", "u", "while down", None, None, 1).encode()
    hub.deliver_unsequenced("p", body)
    assert s.events()[-1]["offset"] is None
    broker.down = False
    broker.publish("p", "x")
    hub.on_stream_gap(["p"])
    await settle()
    assert s.events()[-1] == {"type": "reset", "post_id": "p", "epoch": "e1", "offset": 1}


# -- per-post transitions ------------------------------------------------------------------------


async def test_the_broker_follows_a_post_only_while_it_has_local_viewers():
    hub, broker = await started_hub()
    a, b = FakeSocket(), FakeSocket()
    await hub.subscribe(a, "p", None)
    await hub.subscribe(b, "p", None)
    assert [c for c in broker.calls if c[0] != "history"] == [("subscribe", "p")]
    await hub.unsubscribe(a, "p")
    assert "p" in broker.following
    await hub.unsubscribe(b, "p")
    assert broker.calls[-1] == ("unsubscribe", "p")
    assert hub.post_count == 0 and not broker.following


async def test_a_failed_broker_subscribe_is_rolled_back():
    broker = ScriptedBroker()
    broker.fail_subscribe = RuntimeError
    hub, _ = await started_hub(broker)
    with pytest.raises(RuntimeError):
        await hub.subscribe(FakeSocket(), "p", None)
    assert hub.post_count == 0 and not hub.local_posts()
    broker.fail_subscribe = None
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    hub.on_publication(broker.publish("p", "x"))
    assert s.offsets() == [1]


async def test_subscribe_while_the_last_unsubscribe_is_in_flight_keeps_the_post_followed():
    hub, broker = await started_hub()
    first, second = FakeSocket(), FakeSocket()
    await hub.subscribe(first, "p", None)
    broker.unsub_gate.clear()
    leaving = asyncio.create_task(hub.unsubscribe(first, "p"))
    for _ in range(100):  # the task reaches the broker within a few loop turns
        if ("unsubscribe", "p") in broker.calls:
            break
        await asyncio.sleep(0)
    assert ("unsubscribe", "p") in broker.calls
    joining = asyncio.create_task(hub.subscribe(second, "p", None))
    await asyncio.sleep(0)
    assert not joining.done(), "joined on the fast path while the broker was unsubscribing"
    broker.unsub_gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, joining), 5)
    assert "p" in broker.following, "a local viewer but the broker stopped following"


async def test_unsubscribe_while_the_first_subscribe_is_in_flight():
    hub, broker = await started_hub()
    a, b = FakeSocket(), FakeSocket()
    broker.sub_gate.clear()
    sub_a = asyncio.create_task(hub.subscribe(a, "p", None))
    sub_b = asyncio.create_task(hub.subscribe(b, "p", None))
    await asyncio.sleep(0)
    broker.sub_gate.set()
    await asyncio.wait_for(asyncio.gather(sub_a, sub_b), 5)
    assert [c for c in broker.calls if c[0] == "subscribe"] == [("subscribe", "p")]
    await hub.unsubscribe(a, "p")
    assert "p" in broker.following
    hub.on_publication(broker.publish("p", "x"))
    assert b.offsets() == [1] and a.offsets() == []


async def test_post_limit_per_instance():
    hub, _ = await started_hub(max_posts=2)
    s = FakeSocket()
    await hub.subscribe(s, "a", None)
    await hub.subscribe(s, "b", None)
    with pytest.raises(TooManyPosts):
        await hub.subscribe(s, "c", None)
    await hub.subscribe(FakeSocket(), "a", None)  # an already-followed post is still fine


# -- the memory broker under the hub ---------------------------------------------------------


async def test_the_memory_broker_numbers_streams_and_recovers_what_its_history_holds():
    broker = MemoryBroker(HistorySettings(size=3))
    hub = Hub(broker)
    await hub.start()
    s = FakeSocket()
    await hub.subscribe(s, "p", None)
    epoch = s.events()[0]["epoch"]
    entries: list[Entry] = []
    for i in range(1, 6):
        entries = [Entry(i, "p", COMMENT, Comment(i, "p", "u", f"m{i}", None, None, 1).encode())]
        assert (await broker.append(entries))[0] == Position(epoch, i)
    assert (await broker.append(entries))[0] == Position(epoch, 5)  # the same id: its offset
    assert s.offsets() == [1, 2, 3, 4, 5]
    back = FakeSocket()
    await hub.subscribe(back, "p", Position(epoch, 2))  # 3..5 are held (size 3)
    assert back.events()[0]["recovered"] is True and back.offsets() == [3, 4, 5]
    lost = FakeSocket()
    await hub.subscribe(lost, "p", Position(epoch, 1))  # 2 is gone
    assert lost.events()[0]["recovered"] is False


# -- frames and the batcher ----------------------------------------------------------------------


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
    conns = [Conn(NoWebSocket(), t, batcher, 1 << 20) for t in transports]  # type: ignore[arg-type]
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
