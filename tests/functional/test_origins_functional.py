"""`http.allowed_origins` against a real server: which pages' browsers may use the API.

Counted: a WebSocket from a foreign page is refused (403) and one from an allowed or the same
origin is not; preflights are 204 for allowed origins and 403 for others (404 off the routes,
never 405); a cross-site form or text/plain POST, and a DELETE, write nothing; answers carry
Access-Control-Allow-Origin only for allowed origins.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.recording import Socket, listed, post
from tests.support.server import ServerProcess

GOOD = "https://good.example"
EVIL = "https://evil.example"


def same_origin(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


async def refused_upgrade(http: aiohttp.ClientSession, server: ServerProcess, origin: str) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{server.ws_url}?post_id=p", headers={"Origin": origin})
    return refused.value.status


async def test_a_websocket_from_a_foreign_page_is_refused(start_server, http):
    server = start_server(env={"LIVECOMMENTS_HTTP_ALLOWED_ORIGINS": GOOD})
    assert await refused_upgrade(http, server, EVIL) == 403
    assert await refused_upgrade(http, server, "null") == 403  # a sandboxed or file:// page
    for origin in (GOOD, same_origin(server)):
        sock = await Socket.open(http, server, "post_id=p", headers={"Origin": origin})
        await sock.wait(lambda s=sock: s.of("subscribed"), f"subscribed from {origin}")
        await sock.close()
    sock = await Socket.open(http, server, "post_id=p")  # no Origin: not a browser
    await sock.wait(lambda: sock.of("subscribed"), "subscribed without an Origin")
    await sock.close()


async def test_same_origin_only_by_default_and_any_with_a_star(start_server, http):
    default = start_server("default")
    assert await refused_upgrade(http, default, GOOD) == 403
    sock = await Socket.open(http, default, "post_id=p", headers={"Origin": same_origin(default)})
    await sock.wait(lambda: sock.of("subscribed"), "subscribed from the same origin")
    await sock.close()
    anyone = start_server("anyone", env={"LIVECOMMENTS_HTTP_ALLOWED_ORIGINS": "*"})
    sock = await Socket.open(http, anyone, "post_id=p", headers={"Origin": EVIL})
    await sock.wait(lambda: sock.of("subscribed"), "subscribed from any origin")
    await sock.close()


async def test_preflights_are_answered_for_allowed_origins_only(start_server, http):
    server = start_server(env={"LIVECOMMENTS_HTTP_ALLOWED_ORIGINS": GOOD})
    asks = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    async with http.options(f"{server.url}/v1/comments", headers={"Origin": GOOD, **asks}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == GOOD
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "Origin" in r.headers["Vary"]
    async with http.options(f"{server.url}/v1/comments/123", headers={"Origin": GOOD, **asks}) as r:
        assert r.status == 204 and "DELETE" in r.headers["Access-Control-Allow-Methods"]
    async with http.options(f"{server.url}/v1/comments", headers={"Origin": EVIL, **asks}) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in r.headers
    async with http.options(f"{server.url}/nowhere", headers={"Origin": GOOD, **asks}) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with http.options(f"{server.url}/v1/comments") as r:  # not a preflight
        assert r.status == 204 and "POST" in r.headers["Allow"]


async def test_cross_site_writes_from_a_foreign_page_write_nothing(start_server, http):
    server = start_server(env={"LIVECOMMENTS_HTTP_ALLOWED_ORIGINS": GOOD})
    kept = await post(http, server, "p", "kept")
    evil = {"Origin": EVIL}
    form = {"post_id": "p", "uid": "victim", "message": "from a form"}
    async with http.post(f"{server.url}/v1/comment", data=form, headers=evil) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (403, "origin_not_allowed")
    text = '{"post_id": "p", "uid": "victim", "message": "text/plain"}'
    async with http.post(
        f"{server.url}/v1/comments", data=text, headers={**evil, "Content-Type": "text/plain"}
    ) as r:
        assert r.status == 403
    async with http.delete(
        f"{server.url}/v1/comments/{kept}", params={"post_id": "p", "uid": "u"}, headers=evil
    ) as r:
        assert r.status == 403
    assert await listed(http, server, "p") == [kept], "a cross-site request wrote"

    async with http.get(f"{server.url}/v1/comments", params={"post_id": "p"}, headers=evil) as r:
        assert r.status == 200  # read, but the browser keeps it from the page:
        assert "Access-Control-Allow-Origin" not in r.headers
    body = {"post_id": "p", "uid": "u", "message": "from a good page"}
    async with http.post(f"{server.url}/v1/comments", json=body, headers={"Origin": GOOD}) as r:
        assert r.status == 201
        assert r.headers["Access-Control-Allow-Origin"] == GOOD
        assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    async with http.post(f"{server.url}/v1/comments", json={}, headers={"Origin": GOOD}) as r:
        assert r.status == 400  # errors carry it too, so the page can read why
        assert r.headers["Access-Control-Allow-Origin"] == GOOD
