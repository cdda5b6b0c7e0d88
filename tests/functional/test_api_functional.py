"""The documented API against a real server: REST, paging, WebSocket events and bad input."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.support.raw_ws import RawWebSocket
from tests.support.server import ServerProcess
from tests.support.wire import OP_BINARY, OP_TEXT, WireClient, client_frame


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: these tests use distinct post ids and do not break it."""
    env = {"LIVECOMMENTS_LIMITS_POSTS_PER_SOCKET": "3"}
    s = ServerProcess(tmp_path_factory.mktemp("api"), env=env).start()
    yield s
    assert s.stop() == 0, s.logs()
    assert "Traceback" not in s.logs(), s.logs()


async def post(http: aiohttp.ClientSession, server: ServerProcess, **body: Any) -> dict[str, Any]:
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        assert r.status == 201, await r.text()
        comment: dict[str, Any] = (await r.json())["comment"]
        return comment


async def page(http: aiohttp.ClientSession, server: ServerProcess, **params: Any) -> dict[str, Any]:
    async with http.get(f"{server.url}/v1/comments", params=params) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    assert message
    return message


async def test_comment_shape_and_original_form(server: ServerProcess, http):
    c = await post(
        http, server, post_id="shape", uid="u1", message="hi", parent_id="c9", reply_to="u2"
    )
    assert set(c) == {"id", "post_id", "uid", "message", "parent_id", "reply_to", "created_at"}
    assert c["id"].isdigit() and isinstance(c["created_at"], int)
    assert abs(c["created_at"] - time.time() * 1000) < 60_000
    assert (c["parent_id"], c["reply_to"]) == ("c9", "u2")

    query = {"post_id": "shape", "uid": "u3", "message": "by query", "reply_to": "u1"}
    async with http.post(f"{server.url}/v1/comment", params=query) as r:
        assert r.status == 201
        by_query = (await r.json())["comment"]
    form = {"post_id": "shape", "uid": "u4", "message": "by form"}
    async with http.post(f"{server.url}/v1/comment", data=form) as r:
        assert r.status == 201
        by_form = (await r.json())["comment"]
    assert by_query["reply_to"] == "u1" and by_form["parent_id"] is None
    listed = (await page(http, server, post_id="shape"))["comments"]
    assert [x["id"] for x in listed] == [c["id"], by_query["id"], by_form["id"]]


async def test_paging_newest_before_after(server: ServerProcess, http):
    ids = [
        (await post(http, server, post_id="pg", uid="u", message=f"m{i}"))["id"] for i in range(7)
    ]
    await post(http, server, post_id="other", uid="u", message="elsewhere")
    assert ids == sorted(ids, key=int)

    newest = await page(http, server, post_id="pg", limit=3)
    assert [c["id"] for c in newest["comments"]] == ids[4:]
    assert newest["has_more"] is True
    older = await page(http, server, post_id="pg", limit=3, before=ids[4])
    assert [c["id"] for c in older["comments"]] == ids[1:4]
    oldest = await page(http, server, post_id="pg", limit=3, before=ids[1])
    assert [c["id"] for c in oldest["comments"]] == ids[:1] and oldest["has_more"] is False

    after = await page(http, server, post_id="pg", limit=3, after=ids[0])
    assert [c["id"] for c in after["comments"]] == ids[1:4] and after["has_more"] is True
    tail = await page(http, server, post_id="pg", after=ids[-1])
    assert tail == {"comments": [], "has_more": False}
    everything = await page(http, server, post_id="pg")
    assert [c["id"] for c in everything["comments"]] == ids


async def test_client_msg_id_reused_for_another_comment_is_409(server: ServerProcess, http):
    first = {"post_id": "reuse-a", "uid": "zed", "message": "hello A", "client_msg_id": "1"}
    await post(http, server, **first)
    other = {**first, "post_id": "reuse-b", "message": "different, on B"}
    async with http.post(f"{server.url}/v1/comments", json=other) as r:
        await expect_error(r, 409, "client_msg_id_reused")
    assert (await page(http, server, post_id="reuse-b"))["comments"] == []


async def test_malformed_http_gets_400_and_no_traceback_in_the_log(server: ServerProcess):
    for head in (b"Content-Length: abc\r\n", b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/comments HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert b" 400 " in status, status
        writer.close()
    # The module's fixture also fails if any traceback reached the log.


async def test_retry_with_client_msg_id_returns_the_same_comment(server: ServerProcess, http):
    body = {"post_id": "retry", "uid": "u", "message": "once", "client_msg_id": "abc-1"}
    first, again = await asyncio.gather(post(http, server, **body), post(http, server, **body))
    assert first == again
    other_user = await post(http, server, **{**body, "uid": "v"})
    assert other_user["id"] != first["id"]
    assert len((await page(http, server, post_id="retry"))["comments"]) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"uid": "u", "message": "m"}, "post_id"),
        ({"post_id": "p", "message": "m"}, "uid"),
        ({"post_id": "p", "uid": "u"}, "message"),
        ({"post_id": "p", "uid": "u", "message": "   "}, "message"),
        ({"post_id": "p", "uid": "u", "message": "x" * 2001}, "message"),
        ({"post_id": "p" * 65, "uid": "u", "message": "m"}, "post_id"),
        ({"post_id": "a b", "uid": "u", "message": "m"}, "post_id"),
        ({"post_id": "<script>", "uid": "u", "message": "m"}, "post_id"),
        ({"post_id": 5, "uid": "u", "message": "m"}, "post_id"),
        ({"post_id": "p", "uid": ["u"], "message": "m"}, "uid"),
        ({"post_id": "p", "uid": "u", "message": 7}, "message"),
        ({"post_id": "p", "uid": "u", "message": "m", "parent_id": {}}, "parent_id"),
        ({"post_id": "p", "uid": "u", "message": "m", "client_msg_id": "x y"}, "client_msg_id"),
    ],
)
async def test_invalid_comment_fields_get_400_naming_the_field(server, http, body, field):
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        message = await expect_error(r, 400, "invalid_request")
    assert message.startswith(field)


async def test_message_limit_counts_characters_not_bytes(server: ServerProcess, http):
    await post(http, server, post_id="p", uid="u", message="é" * 2000)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b'"text"', b"{", b"\xff\xfe"])
async def test_body_that_is_not_a_json_object_gets_400(server: ServerProcess, http, raw: bytes):
    async with http.post(f"{server.url}/v1/comments", data=raw) as r:
        await expect_error(r, 400, "invalid_request")


async def test_oversized_body_gets_413(server: ServerProcess, http):
    body = {"post_id": "p", "uid": "u", "message": "x" * 40_000}
    async with http.post(f"{server.url}/v1/comments", json=body) as r:
        await expect_error(r, 413, "body_too_large")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"post_id": "p", "limit": "0"},
        {"post_id": "p", "limit": "201"},
        {"post_id": "p", "limit": "ten"},
        {"post_id": "p", "before": "-1"},
        {"post_id": "p", "after": "1e5"},
        {"post_id": "p", "after": "99999999999999999999999"},
        {"post_id": "p", "before": "5", "after": "3"},
        {"post_id": "bad id"},
    ],
)
async def test_bad_page_queries_get_400(server: ServerProcess, http, params):
    async with http.get(f"{server.url}/v1/comments", params=params) as r:
        await expect_error(r, 400, "invalid_request")


async def test_unknown_routes_and_methods_answer_in_the_error_shape(server: ServerProcess, http):
    async with http.get(f"{server.url}/v2/nothing") as r:
        await expect_error(r, 404, "not_found")
    async with http.delete(f"{server.url}/v1/comments") as r:
        await expect_error(r, 405, "method_not_allowed")


async def test_every_total_is_exported_as_a_counter(server: ServerProcess, http):
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    totals = {name: kind for name, kind in types.items() if name.endswith("_total")}
    assert "livecomments_flushed_total" in totals and "livecomments_flush_errors_total" in totals
    assert set(totals.values()) == {"counter"}, totals


async def test_health_ready_metrics_and_page(server: ServerProcess, http):
    async with http.get(f"{server.url}/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(f"{server.url}/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["status"] == "ok"
        assert body["store"]["queue_depth"] >= 0
    await post(http, server, post_id="p", uid="u", message="m")
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
        accepted = re.search(r"^livecomments_comments_accepted_total (\S+)$", text, re.M)
        assert accepted is not None and float(accepted.group(1)) >= 1
    async with http.get(f"{server.url}/") as r:
        html = await r.text()
        assert r.status == 200 and "textContent" in html and "innerHTML" not in html


# -- WebSocket ----------------------------------------------------------------------------------


def like(event: dict[str, Any], **fields: Any) -> bool:
    """The event has these fields (and may have more: clients ignore what they do not know)."""
    return {k: event.get(k) for k in fields} == fields


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.TEXT, msg
    event: dict[str, Any] = msg.json()
    return event


async def test_socket_events_subscribe_unsubscribe_ping(server: ServerProcess, http):
    async with http.ws_connect(server.ws_url) as ws:
        await ws.send_json({"type": "ping"})
        assert await receive(ws) == {"type": "pong"}
        await ws.send_json({"type": "subscribe", "post_id": "ev-a"})
        assert like(await receive(ws), type="subscribed", post_id="ev-a", recovered=False)
        await ws.send_json({"type": "subscribe", "post_id": "ev-b"})
        assert like(await receive(ws), type="subscribed", post_id="ev-b", recovered=False)
        c = await post(http, server, post_id="ev-b", uid="u", message="to b")
        assert like(await receive(ws), type="comment", post_id="ev-b", offset=1, comment=c)
        await ws.send_json({"type": "unsubscribe", "post_id": "ev-b"})
        assert await receive(ws) == {"type": "unsubscribed", "post_id": "ev-b"}
        await post(http, server, post_id="ev-b", uid="u", message="not seen")
        a = await post(http, server, post_id="ev-a", uid="u", message="to a")
        assert like(await receive(ws), type="comment", post_id="ev-a", offset=1, comment=a)


async def test_posts_per_socket_limit_is_an_error_event(server: ServerProcess, http):
    async with http.ws_connect(server.ws_url) as ws:
        for p in ("a", "b", "c"):
            await ws.send_json({"type": "subscribe", "post_id": p})
            assert (await receive(ws))["type"] == "subscribed"
        await ws.send_json({"type": "subscribe", "post_id": "d"})
        event = await receive(ws)
        assert event["type"] == "error" and event["code"] == "too_many_posts"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_event"),
        ('{"post_id": "p"}', "invalid_event"),
        ('{"type": 5}', "invalid_event"),
        ('{"type": "explode"}', "unknown_type"),
        ('{"type": "subscribe"}', "invalid_request"),
        ('{"type": "subscribe", "post_id": 12}', "invalid_request"),
        ('{"type": "subscribe", "post_id": "has space"}', "invalid_request"),
        ('{"type": "unsubscribe", "post_id": null}', "invalid_request"),
    ],
)
async def test_garbage_frames_get_an_error_event_and_the_socket_stays_usable(
    server: ServerProcess, http, frame: str, code: str
):
    async with http.ws_connect(server.ws_url) as ws:
        await ws.send_str(frame)
        event = await receive(ws)
        assert event["type"] == "error" and event["code"] == code and event["message"]
        await ws.send_json({"type": "ping"})
        assert await receive(ws) == {"type": "pong"}


async def test_binary_frame_closes_with_1003(server: ServerProcess, http):
    async with http.ws_connect(server.ws_url) as ws:
        await ws.send_bytes(b"\x00\x01binary")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1003


async def test_oversized_frame_closes_with_1009_and_server_stays_healthy(server, http):
    async with http.ws_connect(server.ws_url) as ws:
        await ws.send_str('{"type":"ping","pad":"' + "x" * 20_000 + '"}')
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1009
    async with http.get(f"{server.url}/readyz") as r:
        assert r.status == 200


def ping_frame_of(size: int) -> bytes:
    """A `ping` event padded to exactly `size` bytes of JSON text."""
    head, tail = b'{"type":"ping","pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("fragments", [1, 2])
async def test_a_frame_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(
    server: ServerProcess, fragments: int
):
    """limits.ws_frame_max_bytes (16 KiB) is the largest message taken, whole or in pieces."""

    def send_and_read(size: int, then_close: bool) -> tuple[int | None, int]:
        raw = RawWebSocket(server.port, "/v1/ws")
        try:
            payload = ping_frame_of(size)
            if fragments == 1:
                raw.send_frame(0x1, payload)
            else:
                half = len(payload) // 2
                raw.send_frame(0x1, payload[:half], fin=False)
                raw.send_frame(0x0, payload[half:])
            if then_close:
                raw.send_frame(0x8, b"\x03\xe8")  # 1000
            return raw.read_until_closed(timeout=5)
        finally:
            raw.close()

    code, got = await asyncio.to_thread(send_and_read, 16 * 1024, True)
    assert code == 1000 and got > len(b'{"type":"pong"}'), (code, got)  # answered, then closed
    code, _ = await asyncio.to_thread(send_and_read, 16 * 1024 + 1, False)
    assert code == 1009


async def test_a_protocol_ping_gets_a_pong_with_its_payload(server: ServerProcess, http):
    async with http.ws_connect(server.ws_url, autoping=False) as ws:
        await ws.ping(b"are you there")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.PONG and msg.data == b"are you there"


async def test_bad_post_id_on_connect_is_refused_before_upgrade(server: ServerProcess, http):
    async with http.get(f"{server.ws_url}?post_id=no%20spaces") as r:
        await expect_error(r, 400, "invalid_request")


async def test_a_flood_of_garbage_does_not_hurt_other_clients(server: ServerProcess, http):
    async with http.ws_connect(f"{server.ws_url}?post_id=calm") as calm:
        assert (await receive(calm))["type"] == "subscribed"
        async with http.ws_connect(server.ws_url) as noisy:
            for i in range(500):
                await noisy.send_str("}{" if i % 2 else '{"type":"nope"}')
            c = await post(http, server, post_id="calm", uid="u", message="still here")
            assert like(await receive(calm), type="comment", comment=c)


@pytest.mark.parametrize(
    ("fatal", "code"),
    [
        (client_frame(OP_TEXT, b"x" * (16 * 1024 + 1)), 1009),
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),
        (client_frame(0x3, b""), 1002),  # a reserved opcode
        (client_frame(OP_BINARY, b"\x00"), 1003),
    ],
    ids=["too-big", "bad-utf8", "reserved-opcode", "binary"],
)
async def test_answers_read_before_a_fatal_frame_still_arrive_before_the_close(
    server: ServerProcess, fatal: bytes, code: int
):
    """One write: subscribe, ping, then a frame the server must close on. The close may not
    overtake the answers to what came before it (aiohttp closes inside its own read)."""
    ws = await WireClient.open(server.port, "/v1/ws", 5)
    assert isinstance(ws, WireClient)
    subscribe = json.dumps({"type": "subscribe", "post_id": "fatal"}).encode()
    await ws.send(
        client_frame(OP_TEXT, subscribe) + client_frame(OP_TEXT, b'{"type":"ping"}') + fatal
    )
    frames = await ws.read_rest(5)
    texts = [json.loads(f.payload)["type"] for f in frames if f.opcode == OP_TEXT]
    assert texts == ["subscribed", "pong"], frames
    assert frames[-1].close_code == code
    await ws.close()
