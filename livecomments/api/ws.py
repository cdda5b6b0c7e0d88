"""The WebSocket side of the API: `GET /v1/ws[?post_id=P]`, JSON text frames both ways.

A socket becomes a `Conn` (live/conn.py: its bounded outbox) and joins the hub (live/hub.py)
for each post it subscribes to, with the position it has, if any (`epoch` and `offset`): the hub
answers `subscribed` and replays what it missed, then writes the post's stream to it. This module
only reads: subscribe, unsubscribe, ping. Every event sent is built by live/events.py. Bad input
gets an `error` event and the socket stays open; a binary frame closes it with 1003, a frame over
`limits.ws_frame_max_bytes` with 1009.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, hdrs, web

from livecomments import metrics
from livecomments.api.access import check_read
from livecomments.api.auth import Identity
from livecomments.api.errors import ApiError, invalid, retry_after
from livecomments.api.keys import (
    ADDRESSES,
    AUTH,
    BATCHER,
    CONNS,
    HUB,
    LIFECYCLE,
    SETTINGS,
    SOCKET_LIMITS,
)
from livecomments.api.socket_auth import SocketAuth
from livecomments.api.socketlimits import FrameRate, Refused
from livecomments.live import events
from livecomments.live.conn import (
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    Conn,
    pong_frame,
    text_frame,
)
from livecomments.live.hub import TooManyPosts
from livecomments.model.comment import check_key
from livecomments.model.stream import Position

log = logging.getLogger(__name__)

_PONG = text_frame(events.PONG)
# Characters of an epoch a client may send back (ours are 16).
MAX_EPOCH_CHARS = 64


@dataclass(slots=True)
class _Socket:
    """One socket's state beside its Conn: who it is, its frame budget, and the subscribe of
    its URL while it still owes its auth frame."""

    conn: Conn
    auth: SocketAuth
    frames: FrameRate
    deferred: tuple[str, Position | None] | None = None


async def websocket(request: web.Request) -> web.StreamResponse:
    """Refuse what must be refused before the upgrade (HTTP answers a client can read), then
    serve the socket; its place in the per-address count is held until it ends."""
    app = request.app
    settings = app[SETTINGS]
    if app[LIFECYCLE].refusing_sockets:
        raise ApiError(
            503, "shutting_down", "this instance is draining or stopping; connect to another one"
        )
    if len(app[CONNS]) >= settings.limits.max_connections:
        raise ApiError(503, "too_many_connections", "this instance is at its connection limit")
    admitted = app[SOCKET_LIMITS].admit(app[ADDRESSES].of(request))
    if isinstance(admitted, Refused):
        seconds = math.ceil(admitted.retry_after)
        raise ApiError(
            429,
            "rate_limited",
            f"too many WebSockets from your address ({admitted.limit}); retry in {seconds} s",
            retry_after(seconds),
        )
    try:
        return await _serve(request)
    finally:
        admitted.release()


async def _serve(request: web.Request) -> web.StreamResponse:
    """Upgrade, subscribe to `?post_id=` if given, read until the socket ends, leave the hub."""
    app = request.app
    settings = app[SETTINGS]
    identity = await _upgrade_identity(request)
    first: tuple[str, Position | None] | None = None
    if "post_id" in request.query:
        first = _target(request.query, settings.limits.id_max_chars)
        if identity is not None:
            check_read(settings, identity, first[0])
    ws = web.WebSocketResponse(
        # Pings are ours (live/heartbeat.py): one worker for every socket, and a pong must reach
        # the read loop to count as a sign of life.
        heartbeat=None,
        autoping=False,
        # The read loop ends on the peer's close and conn.close_soon answers it, after the
        # frames already offered: aiohttp's own answer would go out before them.
        autoclose=False,
        # aiohttp refuses a message of max_msg_size bytes itself (it checks `>=`); ours is the
        # largest one taken, as config.toml says.
        max_msg_size=settings.limits.ws_frame_max_bytes + 1,
        # Never negotiated: live/conn.py writes one pre-built frame to every socket.
        compress=False,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer left during the handshake
        return ws
    conn = Conn(ws, transport, app[BATCHER], settings.websocket.outbox_max_bytes)
    required = settings.auth.read == "token"
    sock = _Socket(
        conn,
        SocketAuth(conn, app[AUTH], identity, required=required),
        FrameRate.from_settings(settings.limits),
    )
    app[CONNS].add(conn)
    metrics.WS_CONNECTIONS_ACCEPTED.inc()
    sock.auth.start()
    try:
        if first is not None and sock.auth.pending:
            sock.deferred = first
        elif first is not None:
            await _subscribe(app, sock, *first)
        await _read_loop(app, sock)
    finally:
        sock.auth.stop()
        app[CONNS].discard(conn)
        await app[HUB].leave(conn, conn.posts)
        conn.close_soon(CLOSE_NORMAL, b"")
        await conn.wait_closed()
        conn.forget_exception()
    return ws


async def _upgrade_identity(request: web.Request) -> Identity | None:
    """The credential of the upgrade (`Authorization`, or `?token=`), None if it has none; a
    refused one is a 401 before the upgrade."""
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    token = request.query.get("token")
    if not authorization and not token:
        return None
    return await request.app[AUTH].identify(authorization, token)


async def _read_loop(app: web.Application, sock: _Socket) -> None:
    conn = sock.conn
    loop = asyncio.get_running_loop()
    async for msg in conn.ws:
        conn.heard(loop.time())
        if not sock.frames.allow():
            conn.close_soon(CLOSE_POLICY_VIOLATION, b"too many frames per second")
            return
        if msg.type == WSMsgType.PING:
            conn.offer(pong_frame(msg.data))
        elif msg.type == WSMsgType.TEXT:
            await _on_text(app, sock, msg.data)
        elif msg.type == WSMsgType.BINARY:
            conn.close_soon(CLOSE_UNSUPPORTED_DATA, b"binary frames are not supported")
            return
        if conn.closing:
            return


async def _on_text(app: web.Application, sock: _Socket, text: str) -> None:
    conn = sock.conn
    try:
        event: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _send_error(conn, "invalid_json", "frames must be JSON objects")
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return _send_error(conn, "invalid_event", 'events are objects with a string "type"')
    kind = event["type"]
    if kind == "ping":
        conn.offer(_PONG)
        return None
    if kind in ("auth", "refresh"):
        return await _on_token(app, sock, event.get("token"))
    if kind not in ("subscribe", "unsubscribe"):
        return _send_error(conn, "unknown_type", f"unknown event type {kind[:64]!r}")
    if sock.auth.pending:
        return _send_error(conn, "unauthenticated", 'send {"type":"auth","token":...} first')
    try:
        post_id, since = _target(event, app[SETTINGS].limits.id_max_chars)
    except ApiError as e:
        return _send_error(conn, e.code, e.message)
    if kind == "subscribe":
        await _subscribe(app, sock, post_id, since)
    else:
        conn.posts.discard(post_id)
        await app[HUB].unsubscribe(conn, post_id)
        conn.offer(text_frame(events.unsubscribed(post_id)))
    return None


async def _on_token(app: web.Application, sock: _Socket, token: object) -> None:
    """`auth` / `refresh` (socket_auth.py); then the URL's subscribe, if it waited for it."""
    try:
        await sock.auth.on_token(token)
    except ApiError as e:
        return _send_error(sock.conn, e.code, e.message)
    if sock.deferred is not None and not sock.auth.pending and not sock.conn.closing:
        first, sock.deferred = sock.deferred, None
        await _subscribe(app, sock, *first)
    return None


def _target(fields: Mapping[str, Any], id_max_chars: int) -> tuple[str, Position | None]:
    """The post of a subscribe (event or query string), and the position the client has, if
    it gave one: `epoch` and `offset` together, or neither."""
    post_id = check_key("post_id", fields.get("post_id"), id_max_chars)
    assert post_id is not None
    epoch, offset = fields.get("epoch"), fields.get("offset")
    if epoch is None and offset is None:
        return post_id, None
    if not isinstance(epoch, str) or not 1 <= len(epoch) <= MAX_EPOCH_CHARS:
        raise invalid("epoch", "must be the epoch string a server sent (with offset)")
    if isinstance(offset, str) and offset.isascii() and offset.isdigit() and len(offset) < 19:
        offset = int(offset)  # from a query string
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 62:
        raise invalid("offset", "must be the whole number of the last offset received")
    return post_id, Position(epoch, offset)


async def _subscribe(
    app: web.Application, sock: _Socket, post_id: str, since: Position | None
) -> None:
    conn = sock.conn
    try:
        check_read(app[SETTINGS], sock.auth.identity, post_id)
    except ApiError as e:
        return _send_error(conn, e.code, e.message)
    limit = app[SETTINGS].limits.posts_per_socket
    if post_id not in conn.posts and len(conn.posts) >= limit:
        return _send_error(conn, "too_many_posts", f"a socket may watch at most {limit} posts")
    try:
        await app[HUB].subscribe(conn, post_id, since)  # answers `subscribed` itself
    except TooManyPosts as e:
        return _send_error(conn, "too_many_posts", str(e))
    except Exception as e:
        log.warning("hub: subscribe %s failed: %s", post_id, e)
        return _send_error(conn, "subscribe_failed", "cannot follow this post right now")
    conn.posts.add(post_id)
    return None


def _send_error(conn: Conn, code: str, message: str) -> None:
    metrics.WS_ERRORS.labels(code).inc()
    conn.offer(text_frame(events.error(code, message)))
