"""The documented client (tests/support/viewer.py) against a scripted fake server.

The fake is a real aiohttp server in this process (two of them, for reconnects to another node)
whose `/v1/ws` hands each socket to the test, which reads what the viewer sends and writes the
events it wants, in the order it wants; `/v1/comments` pages a list the test fills, and fails
on demand. Every step waits on a queue or a condition with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.server import free_port
from tests.support.viewer import Viewer, settle
from tests.support.wait import wait_for

STEP = 5.0  # seconds any one step may take


def c(n: int, post_id: str = "p") -> dict[str, Any]:
    return {
        "id": str(1000 + n),
        "post_id": post_id,
        "uid": "u",
        "message": f"m{n}",
        "parent_id": None,
        "reply_to": None,
        "created_at": 1700000000000 + n,
    }


def ids(*ns: int) -> set[str]:
    return {str(1000 + n) for n in ns}


class FakeConn:
    def __init__(self, node: FakeNode, ws: web.WebSocketResponse) -> None:
        self.node = node
        self.ws = ws
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def recv(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.received.get(), STEP)

    async def send(self, **event: Any) -> None:
        await self.ws.send_str(json.dumps(event))

    async def comment(self, n: int, offset: int | None, post_id: str = "p") -> None:
        await self.send(type="comment", post_id=post_id, offset=offset, comment=c(n, post_id))

    async def handshake(self, epoch: str | None = "e1", offset: int | None = 0) -> None:
        """Answer the first subscribe: recovered false at (epoch, offset)."""
        msg = await self.recv()
        assert msg == {"type": "subscribe", "post_id": "p"}, msg
        await self.send(type="subscribed", post_id="p", epoch=epoch, offset=offset, recovered=False)


class FakeNode:
    def __init__(self, cluster: FakeCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = web.Application()
        app.router.add_get("/v1/ws", self.ws_handler)
        app.router.add_get("/v1/comments", self.comments_handler)
        self.runner = web.AppRunner(app)

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = FakeConn(self, ws)
        self.cluster.open.add(conn)
        self.cluster.conns.put_nowait(conn)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                conn.received.put_nowait(json.loads(msg.data))
        self.cluster.open.discard(conn)
        return ws

    async def comments_handler(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.cluster.gets.append(query)
        if self.cluster.fail_gets > 0:
            self.cluster.fail_gets -= 1
            return web.json_response(
                {"error": {"code": "store_unavailable", "message": "down"}},
                status=503,
                headers={"Retry-After": "1"},
            )
        everything = sorted(
            self.cluster.comments.get(query["post_id"], []), key=lambda x: int(x["id"])
        )
        if "before" in query:
            everything = [x for x in everything if int(x["id"]) < int(query["before"])]
        limit = int(query.get("limit", 50))
        page = everything[-limit:]
        return web.json_response({"comments": page, "has_more": len(everything) > limit})


class FakeCluster:
    def __init__(self) -> None:
        self.nodes: list[FakeNode] = []
        self.conns: asyncio.Queue[FakeConn] = asyncio.Queue()
        self.open: set[FakeConn] = set()
        self.comments: dict[str, list[dict[str, Any]]] = {}
        self.gets: list[dict[str, str]] = []
        self.fail_gets = 0

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def start(self, count: int) -> None:
        for i in range(count):
            node = FakeNode(self, f"node{i}")
            await node.start()
            self.nodes.append(node)

    async def next_conn(self) -> FakeConn:
        return await asyncio.wait_for(self.conns.get(), STEP)

    async def close(self) -> None:
        for conn in list(self.open):
            await conn.ws.close()
        for node in self.nodes:
            await node.runner.cleanup()


@pytest.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    fake = FakeCluster()
    await fake.start(2)
    yield fake
    await fake.close()


MakeViewer = Callable[..., Viewer]


@pytest.fixture
async def make_viewer(cluster: FakeCluster) -> AsyncIterator[MakeViewer]:
    """Viewers on `cluster` with fast backoffs; each is stopped and checked at the end."""
    viewers: list[Viewer] = []
    async with aiohttp.ClientSession() as session:

        def make(**options: Any) -> Viewer:
            kwargs: dict[str, Any] = {
                "rng": random.Random(7),
                "backoff_base": 0.01,
                "backoff_cap": 0.1,
                "urls": cluster.urls,
                "post_ids": ["p"],
            }
            kwargs.update(options)
            viewer = Viewer(session, **kwargs).start()
            viewers.append(viewer)
            return viewer

        yield make
        for viewer in viewers:
            await viewer.stop()
    for viewer in viewers:
        assert viewer.duplicates == []
        assert viewer.offset_violations == []
        assert not viewer.entries("protocol"), viewer.entries("protocol")


def offsets(viewer: Viewer) -> list[int | None]:
    return [offset for _, offset, _ in viewer.applied("p")]


async def test_recovered_replay_after_a_close(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.comment(1, 1)
    await conn.comment(2, 2)
    await wait_for(lambda: viewer.position("p") == ("e1", 2), STEP, "offset 2")
    await conn.ws.close(code=1001)

    again = await cluster.next_conn()
    assert await again.recv() == {"type": "subscribe", "post_id": "p", "epoch": "e1", "offset": 2}
    await again.send(type="subscribed", post_id="p", epoch="e1", offset=4, recovered=True)
    await again.comment(3, 3)
    await again.comment(4, 4)
    await settle([viewer], {"p": ids(1, 2, 3, 4)}, STEP)

    assert viewer.applied("p") == [("e1", n, str(1000 + n)) for n in (1, 2, 3, 4)]
    assert [r.detail for r in viewer.reloads("p")] == ["not_recovered"]  # none on recovery
    assert len(viewer.connections) == 2
    assert viewer.redelivered == []


async def test_comments_batches_apply_in_order_and_overlaps_are_skipped(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.send(type="comments", post_id="p", offset=1, comments=[c(1), c(2), c(3)])
    await conn.send(type="comments", post_id="p", offset=2, comments=[c(2), c(3), c(4)])
    await settle([viewer], {"p": ids(1, 2, 3, 4)}, STEP)
    assert offsets(viewer) == [1, 2, 3, 4]
    assert len(viewer.entries("ignored")) == 2
    assert viewer.gaps() == []


async def test_a_gap_resubscribes_from_the_last_position(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.comment(1, 1)
    await conn.comment(2, 2)
    await conn.comment(5, 5)  # 3 and 4 were lost
    assert await conn.recv() == {"type": "subscribe", "post_id": "p", "epoch": "e1", "offset": 2}
    await conn.comment(6, 6)  # sent before the server read the subscribe: ignored
    await conn.comment(7, 7)  # likewise, and no second resubscribe
    await conn.send(type="subscribed", post_id="p", epoch="e1", offset=7, recovered=True)
    await conn.send(
        type="comments", post_id="p", offset=3, comments=[c(n) for n in (3, 4, 5, 6, 7)]
    )
    await settle([viewer], {"p": ids(*range(1, 8))}, STEP)

    assert offsets(viewer) == list(range(1, 8))
    assert [g.offset for g in viewer.gaps("p")] == [5]
    assert len(viewer.entries("subscribe")) == 2
    assert conn.received.empty()


async def test_an_event_of_another_epoch_resubscribes(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.send(type="comment", post_id="p", epoch="e2", offset=1, comment=c(1))
    assert await conn.recv() == {"type": "subscribe", "post_id": "p", "epoch": "e1", "offset": 0}
    assert viewer.shown("p") == {}
    cluster.comments["p"] = [c(1)]
    await conn.send(type="subscribed", post_id="p", epoch="e2", offset=1, recovered=False)
    await settle([viewer], {"p": ids(1)}, STEP)
    assert viewer.position("p") == ("e2", 1)


@pytest.mark.parametrize("full_reload", [True, False])
async def test_reset_reloads_every_page_and_continues_from_its_position(
    cluster, make_viewer, full_reload
):
    viewer = make_viewer(full_reload=full_reload)
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await wait_for(lambda: viewer.entries("reloaded"), STEP, "the first (empty) reload")
    cluster.gets.clear()
    cluster.comments["p"] = [c(n) for n in range(1, 451)]

    await conn.send(type="reset", post_id="p", epoch="e2", offset=450)
    await wait_for(lambda: len(viewer.entries("reloaded")) == 2, STEP, "the reset's reload")
    await conn.comment(451, 451)
    if full_reload:
        await settle([viewer], {"p": ids(*range(1, 452))}, STEP)
        assert [g.get("before") for g in cluster.gets] == [None, "1251", "1051"]
    else:  # what a UI does: the newest page only
        await settle([viewer], {"p": ids(*range(251, 452))}, STEP)
        assert len(viewer.shown("p")) == 201
        assert [g.get("before") for g in cluster.gets] == [None]
    assert all(g["limit"] == "200" for g in cluster.gets)
    assert viewer.position("p") == ("e2", 451)
    assert [(r.detail, r.epoch, r.offset) for r in viewer.reloads("p")] == [
        ("not_recovered", "e1", 0),
        ("reset", "e2", 450),
    ]


async def test_a_null_offset_is_shown_and_does_not_advance(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake(None, None)  # the shard is down: no position yet
    await conn.comment(1, None)
    await conn.comment(1, None)  # the same comment again: shown once
    await settle([viewer], {"p": ids(1)}, STEP)
    assert viewer.position("p") is None
    assert viewer.reloads("p") == []  # nothing to reload from until the reset

    cluster.comments["p"] = [c(1), c(2)]
    await conn.send(type="reset", post_id="p", epoch="e1", offset=2)
    await conn.comment(3, None)  # shown, the position stays at 2
    await conn.comment(3, 3)  # the same comment with its offset: applied, not shown twice
    await conn.comment(4, 4)
    await settle([viewer], {"p": ids(1, 2, 3, 4)}, STEP)
    assert viewer.position("p") == ("e1", 4)
    assert offsets(viewer) == [3, 4]
    assert len(viewer.entries("unpositioned")) == 3
    assert viewer.redelivered == []
    assert conn.received.empty()  # no resubscribe


async def test_a_failed_get_is_retried_until_it_succeeds(cluster, make_viewer):
    cluster.comments["p"] = [c(1), c(2), c(3)]
    cluster.fail_gets = 2
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 3)
    await settle([viewer], {"p": ids(1, 2, 3)}, STEP)
    assert len(cluster.gets) == 3
    failures = viewer.entries("get_failed", "p")
    assert len(failures) == 2
    assert all(" 503 " in (f.detail or "") for f in failures)


async def test_reconnect_notice_moves_to_another_node_with_the_position(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.comment(1, 1)
    await conn.comment(2, 2)
    await conn.send(type="reconnect")
    await wait_for(lambda: viewer.entries("drain"), STEP, "the drain notice")
    await conn.ws.close(code=1012)

    again = await cluster.next_conn()
    assert again.node is not conn.node
    assert await again.recv() == {"type": "subscribe", "post_id": "p", "epoch": "e1", "offset": 2}
    await again.send(type="subscribed", post_id="p", epoch="e1", offset=2, recovered=True)
    await again.comment(3, 3)
    await settle([viewer], {"p": ids(1, 2, 3)}, STEP)
    assert viewer.connections == [conn.node.url, again.node.url]
    assert [e.detail for e in viewer.entries("disconnected")] == ["1012"]


async def test_a_drain_without_a_close_is_left_after_the_drain_timeout(cluster, make_viewer):
    viewer = make_viewer(drain_timeout=0.2)
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.send(type="reconnect")  # and never closes
    again = await cluster.next_conn()
    assert again.node is not conn.node
    assert await again.recv() == {"type": "subscribe", "post_id": "p", "epoch": "e1", "offset": 0}
    assert viewer.entries("disconnected")


async def test_an_unanswered_subscribe_drops_the_socket(cluster, make_viewer):
    make_viewer(subscribe_timeout=0.2)
    conn = await cluster.next_conn()
    assert (await conn.recv())["type"] == "subscribe"  # and no answer
    again = await cluster.next_conn()
    assert (await again.recv())["type"] == "subscribe"


async def test_duplicate_offsets_are_ignored_and_redeliveries_counted(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    for n, offset in [(1, 1), (2, 2), (2, 2), (1, 1), (3, 3)]:
        await conn.comment(n, offset)
    await settle([viewer], {"p": ids(1, 2, 3)}, STEP)
    assert offsets(viewer) == [1, 2, 3]  # 3 applied: the duplicates caused no resubscribe
    assert len(viewer.entries("ignored")) == 2
    assert conn.received.empty()

    await conn.comment(2, 4)  # comment 2 again, under a new offset: a server bug, counted
    await wait_for(lambda: viewer.redelivered, STEP, "the redelivery")
    assert [(r.id, r.first, r.again) for r in viewer.redelivered] == [
        ("1002", ("e1", 2), ("e1", 4))
    ]
    assert len(viewer.shown("p")) == 3


async def test_a_delete_removes_the_comment_and_advances(cluster, make_viewer):
    viewer = make_viewer()
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.comment(1, 1)
    await conn.send(type="delete", post_id="p", offset=2, id="1001")
    await wait_for(lambda: viewer.position("p") == ("e1", 2), STEP, "the delete")
    assert viewer.shown("p") == {}
    assert viewer.redelivered == []
    await conn.comment(1, None)  # a late copy of the deleted comment stays deleted
    await conn.comment(2, 3)
    await settle([viewer], {"p": ids(2)}, STEP)
    assert set(viewer.shown("p")) == ids(2)


async def test_settle_names_the_viewer_and_what_it_misses(cluster, make_viewer):
    viewer = make_viewer(name="alice")
    conn = await cluster.next_conn()
    await conn.handshake("e1", 0)
    await conn.comment(1, 1)
    with pytest.raises(AssertionError, match=r"alice p: misses 1 of 2 \(e\.g\. \['1002'\]\)"):
        await settle([viewer], {"p": ids(1, 2)}, 0.3)


async def test_stop_is_prompt_while_no_node_answers():
    async with aiohttp.ClientSession() as session:
        viewer = Viewer(
            session,
            [f"http://127.0.0.1:{free_port()}"],
            ["p"],
            rng=random.Random(1),
            backoff_base=0.01,
            backoff_cap=0.05,
        ).start()
        await wait_for(lambda: len(viewer.entries("connect_failed")) >= 3, STEP, "retries")
        await asyncio.wait_for(viewer.stop(), 1)
