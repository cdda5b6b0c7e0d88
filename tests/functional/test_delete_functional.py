"""DELETE /v1/comments/{id}: a comment taken down is gone for everyone, and stays gone.

What is counted: every viewer of the post gets one `delete` event at the next offset of the
stream (so positions stay gapless); GET on every instance stops listing the comment at once
(before the database has the tombstone) and after a restart; a viewer that recovers across the
deletion never sees the comment; deleting twice is not an error; and every wrong request gets
a clear 4xx.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from livecomments.api.delete import FIND_WAIT
from livecomments.model.ids import EPOCH_MS, INSTANCE_BITS, SEQUENCE_BITS
from tests.support.recording import Socket, listed, post
from tests.support.redis_servers import RedisServer, redis_servers
from tests.support.server import ServerProcess


async def delete(
    http: aiohttp.ClientSession, server: ServerProcess, comment_id: str, **query: str
) -> tuple[int, dict[str, Any]]:
    async with http.delete(f"{server.url}/v1/comments/{comment_id}", params=query) as r:
        assert r.content_type == "application/json", await r.text()
        body: dict[str, Any] = await r.json()
        return r.status, body


async def test_delete_answers_every_wrong_request_with_a_clear_4xx(start_server, http):
    server = start_server()
    kept = await post(http, server, "p", "mine")
    cases: list[tuple[str, dict[str, str], int, str]] = [
        (kept, {"uid": "u"}, 400, "invalid_request"),  # no post_id
        ("abc", {"post_id": "p", "uid": "u"}, 400, "invalid_request"),
        ("0", {"post_id": "p", "uid": "u"}, 400, "invalid_request"),
        ("99999999999999999999", {"post_id": "p", "uid": "u"}, 400, "invalid_request"),
        ("12345", {"post_id": "p", "uid": "u"}, 404, "not_found"),
        (kept, {"post_id": "other", "uid": "u"}, 404, "not_found"),  # the post is part of it
        (kept, {"post_id": "p"}, 403, "forbidden"),  # whose is it?
        (kept, {"post_id": "p", "uid": "someone-else"}, 403, "forbidden"),
    ]
    for comment_id, query, status, code in cases:
        got, body = await delete(http, server, comment_id, **query)
        assert (got, body["error"]["code"]) == (status, code), (comment_id, query, body)
    assert await listed(http, server, "p") == [kept], "a refused delete took something down"
    # A made-up id cannot be on its way from another instance: no waiting for it (a client
    # guessing ids must not cost a second of lookups each).
    started = time.monotonic()
    assert (await delete(http, server, "12345", post_id="p", uid="u"))[0] == 404
    assert time.monotonic() - started < FIND_WAIT
    # Nor can an id from the future (its timestamp is the client's to choose), whatever
    # instance its bits name.
    future_ms = int(time.time() * 1000) + 3_600_000 - EPOCH_MS
    from_the_future = (future_ms << (INSTANCE_BITS + SEQUENCE_BITS)) | (1023 << SEQUENCE_BITS)
    started = time.monotonic()
    assert (await delete(http, server, str(from_the_future), post_id="p", uid="u"))[0] == 404
    assert time.monotonic() - started < FIND_WAIT


async def test_a_deleted_comment_is_gone_live_in_pages_and_after_a_restart(
    start_server, http, tmp_path: Path
):
    server = start_server("one", data_dir=tmp_path / "one")
    viewer = await Socket.open(http, server, "post_id=p")
    await viewer.wait(lambda: viewer.of("subscribed"), "subscribed")
    ids = [await post(http, server, "p", f"m{i}") for i in range(3)]
    await viewer.wait(lambda: len(viewer.comments()) == 3, "three comments")

    status, body = await delete(http, server, ids[1], post_id="p", uid="u")
    assert status == 200, body
    assert body == {"deleted": {"id": ids[1], "post_id": "p"}}
    await viewer.wait(lambda: viewer.of("delete"), "the delete event")
    assert viewer.of("delete") == [{"type": "delete", "post_id": "p", "offset": 4, "id": ids[1]}]
    assert await listed(http, server, "p") == [ids[0], ids[2]]
    assert (await delete(http, server, ids[1], post_id="p", uid="u"))[0] == 200  # idempotent
    later = await post(http, server, "p", "later")  # anything announced before it is in
    await viewer.wait(lambda: len(viewer.comments()) == 4, "the later comment")
    assert viewer.comments()[-1] == (5, later)
    assert len(viewer.of("delete")) == 1, "a repeated delete was announced again"
    await viewer.close()

    server.stop()
    server = start_server("one", data_dir=tmp_path / "one", port=server.port)
    assert await listed(http, server, "p") == [ids[0], ids[2], later]
    assert (await delete(http, server, ids[1], post_id="p", uid="u"))[0] == 200


@pytest.fixture
def redis(tmp_path: Path):
    with redis_servers(tmp_path / "redis") as servers:
        yield servers.start(1)[0]


async def test_a_delete_on_one_instance_reaches_the_viewers_of_every_other(
    start_server, http, redis: RedisServer
):
    """Each instance has its own database here: A's never gets B's tombstone, which is how a
    shared database looks until B has flushed it (a race the test could only hope to hit).
    A must not list the comment all the same: the stream's deletions say it is gone."""
    a, b = (
        start_server(
            name,
            env={"LIVECOMMENTS_REDIS_URLS": redis.url, "LIVECOMMENTS_SERVER_INSTANCE_ID": n},
        )
        for name, n in (("a", "1"), ("b", "2"))
    )
    on_a = await Socket.open(http, a, "post_id=p")
    on_b = await Socket.open(http, b, "post_id=p")
    for s in (on_a, on_b):
        await s.wait(lambda s=s: s.of("subscribed"), "subscribed")
    epoch = on_b.of("subscribed")[0]["epoch"]
    first = await post(http, a, "p", "stays")
    doomed = await post(http, a, "p", "taken down")
    # Deleted through the other instance, which may not have it in the database yet.
    status, body = await delete(http, b, doomed, post_id="p", uid="u")
    assert status == 200, body
    last = await post(http, b, "p", "after")
    for s in (on_a, on_b):
        await s.wait(lambda s=s: len(s.comments()) == 3 and s.of("delete"), "all of it")
        assert s.comments() == [(1, first), (2, doomed), (4, last)]
        assert [(e["offset"], e["id"]) for e in s.of("delete")] == [(3, doomed)]
    for server in (a, b):
        assert await listed(http, server, "p") == [first, last]

    # A viewer that was away since offset 0 recovers across the deletion: the comment is not
    # shown; its offset and the deletion's stay accounted for.
    back = await Socket.open(http, a, f"post_id=p&epoch={epoch}&offset=0")
    await back.wait(lambda: back.of("subscribed"), "subscribed")
    assert back.of("subscribed")[0]["recovered"] is True
    await back.wait(lambda: len(back.comments()) == 2, "the replay")
    assert back.comments() == [(1, first), (4, last)]
    assert [(e["offset"], e["id"]) for e in back.of("delete")] == [(2, doomed), (3, doomed)]
    for s in (on_a, on_b, back):
        await s.close()
