"""`auth.mode = "jwt"` against a real server: who may post as whom, read what, delete what.

Counted: a spoofed uid writes nothing (REST); a refused credential is a 401 with its code and a
WWW-Authenticate challenge; a token's scope holds on POST and on subscribe; `auth.read = "token"`
closes GET and the WebSocket to the anonymous (a socket that never authenticates is closed with
4401); a socket whose token expires is closed with 4401 unless it refreshed; client_msg_id
cannot be squatted across authors; deletes follow the author/window/moderator/server-key rules.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import jwt
import pytest

from tests.support.recording import Socket, listed, post
from tests.support.server import ServerProcess
from tests.support.tokens import SERVER_KEY, bearer, jwt_env, mint
from tests.support.wait import wait_for

DEADLINE = 10.0


async def post_as(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    headers: dict[str, str] | None,
    **body: Any,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    body.setdefault("post_id", "p")
    body.setdefault("message", "hello")
    async with http.post(f"{server.url}/v1/comments", json=body, headers=headers) as r:
        return r.status, await r.json(), r


def code(body: dict[str, Any]) -> str:
    return str(body["error"]["code"])


async def test_the_author_is_the_tokens_subject_and_nothing_else(start_server, http):
    server = start_server(env=jwt_env())
    alice = bearer(mint("alice"))
    refused: list[tuple[dict[str, str] | None, dict[str, Any], int, str]] = [
        (None, {"uid": "alice"}, 401, "unauthenticated"),
        (bearer("not.a.token"), {}, 401, "invalid_token"),
        (bearer(mint("alice", ttl=-120)), {}, 401, "token_expired"),
        (
            bearer(mint("alice", secret="another-secret-of-at-least-32-bytes!!")),
            {},
            401,
            "invalid_token",
        ),
        (
            bearer(jwt.encode({"sub": "alice", "exp": time.time() + 60}, None, "none")),
            {},
            401,
            "invalid_token",
        ),
        (bearer(mint("auth0|123")), {}, 401, "invalid_token"),  # not a valid uid
        (
            {"Authorization": "Key wrong-key-of-at-least-32-bytes-0000"},
            {"uid": "x"},
            401,
            "invalid_token",
        ),
        (alice, {"uid": "bob"}, 403, "forbidden"),  # the spoof
        ({"Authorization": f"Key {SERVER_KEY}"}, {}, 400, "invalid_request"),  # for whom?
    ]
    for headers, body, status, expected in refused:
        got, answer, response = await post_as(http, server, headers, **body)
        assert (got, code(answer)) == (status, expected), (headers, body, answer)
        if status == 401:
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await listed(http, server, "p") == [], "a refused POST wrote something"

    got, answer, _ = await post_as(http, server, alice)
    assert (got, answer["comment"]["uid"]) == (201, "alice")
    got, answer, _ = await post_as(http, server, alice, uid="alice")
    assert (got, answer["comment"]["uid"]) == (201, "alice")
    got, answer, _ = await post_as(
        http, server, {"Authorization": f"Key {SERVER_KEY}"}, uid="carol"
    )
    assert (got, answer["comment"]["uid"]) == (201, "carol")  # the backend posts for its user
    assert len(await listed(http, server, "p")) == 3  # reading stays public (auth.read)


async def test_client_msg_id_belongs_to_its_author(start_server, http):
    server = start_server(env=jwt_env())
    alice, mallory = bearer(mint("alice")), bearer(mint("mallory"))
    _, first, _ = await post_as(http, server, alice, client_msg_id="m-1", message="mine")
    _, squat, _ = await post_as(http, server, mallory, client_msg_id="m-1", message="squat")
    assert squat["comment"]["id"] != first["comment"]["id"]
    assert squat["comment"]["uid"] == "mallory"
    _, retry, _ = await post_as(http, server, alice, client_msg_id="m-1", message="mine")
    assert retry == first, "alice's retry was not answered with her own comment"


async def test_a_tokens_scope_holds_on_post_and_subscribe(start_server, http):
    server = start_server(env=jwt_env(LIVECOMMENTS_AUTH_READ="token"))
    token = mint("alice", posts=["news-*", "faq"])
    assert (await post_as(http, server, bearer(token), post_id="news-1"))[0] == 201
    got, answer, _ = await post_as(http, server, bearer(token), post_id="private")
    assert (got, code(answer)) == (403, "forbidden")

    sock = await Socket.open(http, server, f"token={token}")
    await sock.send(type="subscribe", post_id="private")
    await sock.send(type="subscribe", post_id="faq")
    await sock.wait(lambda: sock.of("subscribed"), "subscribed to faq")
    assert [e["code"] for e in sock.of("error")] == ["forbidden"]
    assert [e["post_id"] for e in sock.of("subscribed")] == ["faq"]
    async with http.get(
        f"{server.url}/v1/comments", params={"post_id": "private"}, headers=bearer(token)
    ) as r:
        assert (r.status, code(await r.json())) == (403, "forbidden")
    # Refused at the upgrade: the URL's post is outside the scope.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{server.ws_url}?post_id=private&token={token}")
    assert refused.value.status == 403
    await sock.close()


async def test_reading_needs_a_token_when_read_is_token(start_server, http):
    server = start_server(env=jwt_env(LIVECOMMENTS_AUTH_READ="token"))
    token = mint("alice")
    async with http.get(f"{server.url}/v1/comments", params={"post_id": "p"}) as r:
        assert (r.status, code(await r.json())) == (401, "unauthenticated")
    assert await listed(http, server, "p", headers=bearer(token)) == []
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{server.ws_url}?token=garbage")
    assert refused.value.status == 401

    # The first frame authenticates; the URL's subscribe waits for it.
    sock = await Socket.open(http, server, "post_id=p")
    await sock.send(type="subscribe", post_id="q")
    await sock.wait(lambda: sock.of("error"), "the unauthenticated error")
    assert sock.of("error")[0]["code"] == "unauthenticated" and not sock.of("subscribed")
    await sock.send(type="auth", token=token)
    await sock.wait(lambda: sock.of("subscribed"), "the deferred subscribe")
    authenticated = sock.of("authenticated")[0]
    assert (authenticated["sub"], authenticated["moderator"]) == ("alice", False)
    assert [e["post_id"] for e in sock.of("subscribed")] == ["p"]
    comment_id = await post(http, server, "p", "live", headers=bearer(token))
    await sock.wait(sock.comments, "the live comment")
    assert sock.comments() == [(1, comment_id)]

    # A socket that never authenticates is closed, and so is one whose auth frame is refused.
    silent = await Socket.open(http, server, "post_id=p")
    wrong = await Socket.open(http, server, "post_id=p")
    await wrong.send(type="auth", token="garbage")
    assert await wrong.closed() == 4401
    assert [e["code"] for e in wrong.of("error")] == ["invalid_token"]
    assert await silent.closed() == 4401
    assert [e["code"] for e in silent.of("error")] == ["unauthenticated"]
    await sock.close()


async def test_an_expired_token_closes_its_socket_unless_it_was_refreshed(start_server, http):
    server = start_server(env=jwt_env(LIVECOMMENTS_AUTH_LEEWAY="0"))
    expiring = await Socket.open(http, server, "post_id=p")
    refreshed = await Socket.open(http, server, "post_id=p")
    short = mint("alice", ttl=2)
    for sock in (expiring, refreshed):
        await sock.send(type="auth", token=short)
        await sock.wait(lambda s=sock: s.of("authenticated"), "authenticated")
    await refreshed.send(type="refresh", token=mint("bob", ttl=60))  # another subject: no
    await refreshed.send(type="refresh", token=mint("alice", ttl=60))
    await refreshed.wait(lambda: len(refreshed.of("authenticated")) == 2, "the refresh")
    assert [e["code"] for e in refreshed.of("error")] == ["forbidden"]

    assert await expiring.closed() == 4401
    assert expiring.of("error")[-1]["code"] == "token_expired"
    assert time.time() >= jwt.decode(short, options={"verify_signature": False})["exp"]
    comment_id = await post(http, server, "p", "after", headers=bearer(mint("alice")))
    await refreshed.wait(refreshed.comments, "a comment after the first token's end")
    assert refreshed.comments() == [(1, comment_id)] and not refreshed.ws.closed
    await refreshed.close()


async def delete(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    comment_id: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    async with http.delete(
        f"{server.url}/v1/comments/{comment_id}", params={"post_id": "p"}, headers=headers
    ) as r:
        body = await r.json()
        return r.status, body["error"]["code"] if "error" in body else "deleted"


async def test_who_may_delete(start_server, http):
    server = start_server(env=jwt_env(LIVECOMMENTS_AUTH_DELETE_WINDOW="1"))
    alice, bob = bearer(mint("alice")), bearer(mint("bob"))
    moderator = bearer(mint("mod", roles=["moderator"]))
    server_key = {"Authorization": f"Key {SERVER_KEY}"}
    ids = [await post(http, server, "p", f"m{i}", headers=alice) for i in range(4)]
    assert await delete(http, server, ids[0]) == (401, "unauthenticated")
    assert await delete(http, server, ids[0], bob) == (403, "forbidden")
    assert await delete(http, server, ids[0], alice) == (200, "deleted")  # her own, in time
    # The window is time itself: wait (bounded) until it has passed for the others.
    posted = time.time()
    await wait_for(lambda: time.time() > posted + 1.2, DEADLINE, "the delete window to pass")
    assert await delete(http, server, ids[1], alice) == (403, "delete_window_passed")
    assert await delete(http, server, ids[1], moderator) == (200, "deleted")
    assert await delete(http, server, ids[2], server_key) == (200, "deleted")
    assert await listed(http, server, "p") == [ids[3]]
