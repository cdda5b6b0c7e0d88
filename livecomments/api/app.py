"""The HTTP and WebSocket API. Where a comment starts its way:

    POST /v1/comments -> _create_comment(): checked into a Draft, given a snowflake id (ids.py)
      -> Comments.accept() (store.py): fsync'd in the write-ahead queue (queue.py); only then 201
      -> Hub.publish() (hub.py): encoded once, offered to each local socket's outbox (conn.py)
         and handed to the bridge (bridge.py) for other instances
      -> later, Comments.flush_worker() moves it from the queue into SQLite / PostgreSQL.

Every error leaves as `{"error": {"code", "message"}}` (errors.py), unknown routes included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from livecomments.api.body import read_body, read_form
from livecomments.api.dedupe import RecentRequests
from livecomments.api.errors import ApiError, invalid
from livecomments.config import Settings
from livecomments.live.bridge import Bridge, MemoryBridge
from livecomments.live.conn import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_UNSUPPORTED_DATA,
    Conn,
    Heartbeat,
    WriteBatcher,
    pong_frame,
    text_frame,
)
from livecomments.live.hub import Hub, TooManyPosts
from livecomments.live.redis.ring import node_key
from livecomments.metrics import Metrics
from livecomments.model.comment import check_key, draft_from
from livecomments.model.ids import SnowflakeGenerator, wall_clock_ms
from livecomments.storage.lease import InstanceLease
from livecomments.storage.log import Comments, PageQuery, StoreUnavailable, open_store
from livecomments.storage.queue import QueueFull, QueueWriteFailed, WriteAheadQueue

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
COMMENTS = web.AppKey("comments", Comments)
HUB = web.AppKey("hub", Hub)
IDS = web.AppKey("ids", SnowflakeGenerator)
LEASE = web.AppKey("lease", InstanceLease)
RECENT = web.AppKey("recent", RecentRequests)
CONNS = web.AppKey[set[Conn]]("conns")
STATE = web.AppKey[dict[str, Any]]("state")
BATCHER = web.AppKey("batcher", WriteBatcher)

# Seconds a client should wait before retrying a POST refused because the queue is full.
RETRY_AFTER_QUEUE_FULL = 5
# ... and one refused because the queue cannot write (disk full); it retries every second.
RETRY_AFTER_QUEUE_UNAVAILABLE = 2
MAX_SNOWFLAKE = (1 << 63) - 1


def create_app(settings: Settings, bridge: Bridge | None = None) -> web.Application:
    """The whole service as one aiohttp app; resources start and stop with it (cleanup_ctx)."""
    app = web.Application(
        client_max_size=settings.limits.body_max_bytes, middlewares=[error_middleware]
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[RECENT] = RecentRequests(settings.limits.retry_window_bytes)
    app[CONNS] = set()
    app[BATCHER] = WriteBatcher()
    app[STATE] = {"shutting_down": False}
    app[HUB] = Hub(
        bridge or make_bridge(settings, app[METRICS]),
        app[METRICS],
        max_posts=settings.limits.posts_per_instance,
    )
    app.cleanup_ctx.append(comments_ctx)
    app.cleanup_ctx.append(instance_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(heartbeat_ctx)
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_post("/v1/comments", post_comment_json)
    app.router.add_post("/v1/comment", post_comment_form)
    app.router.add_get("/v1/comments", list_comments)
    app.router.add_get("/v1/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def make_bridge(settings: Settings, metrics: Metrics) -> Bridge:
    """In-memory for one instance; Redis, sharded by ring.py, when `redis.urls` lists servers."""
    if not settings.redis.urls:
        return MemoryBridge()
    from livecomments.live.redis.bridge import RedisBridge  # noqa: PLC0415 (only with Redis on)

    return RedisBridge(settings.redis, metrics)


async def apply_reload(app: web.Application, settings: Settings) -> None:
    """SIGHUP: take the keys that can change at runtime (today: the Redis ring)."""
    await app[HUB].reconfigure(settings.redis)
    log.info("reload: applied redis.urls = %s", [node_key(u) for u in settings.redis.urls])


# -- lifecycle ----------------------------------------------------------------------------------


async def comments_ctx(app: web.Application) -> AsyncIterator[None]:
    """Queue and store up, unflushed comments replayed, flusher running; on exit, flush and stop."""
    settings = app[SETTINGS]
    queue = WriteAheadQueue(settings.queue.dir, settings.queue.max_bytes)
    await queue.open()
    store = open_store(settings.store.url)
    comments = Comments(queue, store, settings.queue.flush_batch, settings.queue.retry_max)
    # If the database is down, start anyway: the queue takes comments and the flusher keeps
    # trying to open the store.
    await comments.try_open_store()
    app[COMMENTS] = comments
    _register_gauges(app[METRICS], comments, app)
    flusher = asyncio.create_task(_opening_flusher(comments), name="flush-worker")
    log.info(
        "store: %s, queue: %s (%d unflushed)", _safe(settings), settings.queue.dir, queue.depth
    )
    try:
        yield
    finally:
        # server.shutdown_timeout bounds the whole stop: the wait for open requests (AppRunner)
        # came first, so the flush gets what is left of it.
        deadline = app[STATE].get("shutdown_deadline")
        loop = asyncio.get_running_loop()
        left = settings.server.shutdown_timeout if deadline is None else deadline - loop.time()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await queue.wait_empty()
        except TimeoutError:
            log.warning("shutdown: %d comments stay queued for the next start", queue.depth)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await queue.close()
        await store.close()


async def instance_ctx(app: web.Application) -> AsyncIterator[None]:
    """Settle this instance's id, leased in the store so no other live instance sharing it has
    the same one (lease.py), and the id generator that embeds it."""
    comments = app[COMMENTS]
    ids = SnowflakeGenerator(None)
    ids.seed(comments.queue.last_id)

    async def use(instance_id: int) -> None:
        ids.assign(instance_id)
        await comments.queue.remember_instance_id(instance_id)

    lease = InstanceLease(
        comments.lease_store,
        app[SETTINGS].server.instance_id,
        comments.queue.remembered_instance_id,
        on_claimed=use,
    )
    instance_id = await lease.acquire(comments.store_open)
    try:
        if instance_id is not None:
            await use(instance_id)
        app[IDS], app[LEASE] = ids, lease
        renewer = asyncio.create_task(
            lease.renew_worker(comments.wait_store_open), name="lease-renew-worker"
        )
        try:
            yield
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
    finally:
        await lease.release()


async def _opening_flusher(comments: Comments) -> None:
    """Opens the store if start-up could not, then flushes; both retry until cancelled."""
    await comments.open_store_until_ready()
    await comments.flush_worker()


def _safe(settings: Settings) -> str:
    """The store URL without its password, for logs."""
    url = settings.store.url
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _register_gauges(m: Metrics, comments: Comments, app: web.Application) -> None:
    m.gauge(
        "queue_depth", "Comments durable but not yet in the store.", lambda: comments.queue.depth
    )
    m.gauge("queue_bytes", "Bytes of unflushed comments.", lambda: comments.queue.pending_bytes)
    m.gauge(
        "queue_oldest_age_seconds",
        "Age of the oldest unflushed comment.",
        comments.queue.oldest_age_seconds,
    )
    m.counter_from("flushed_total", "Comments moved into the store.", lambda: comments.flushed)
    m.counter_from("flush_errors_total", "Failed flush attempts.", lambda: comments.flush_errors)
    m.counter_from(
        "id_collisions_total",
        "Acknowledged comments the store could not keep: their id was another comment's.",
        lambda: comments.id_collisions,
    )
    m.gauge("store_up", "1 when the last store operation succeeded.", lambda: comments.store_ok)
    m.gauge("ws_connections", "Open WebSocket connections.", lambda: len(app[CONNS]))
    m.gauge("posts_followed", "Posts with local subscribers.", lambda: app[HUB].post_count)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[HUB].start()
    try:
        yield
    finally:
        await app[HUB].stop()


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """Pings quiet sockets and cuts dead ones (conn.Heartbeat) for the life of the app."""
    conns: set[Conn] = app[CONNS]
    heartbeat = Heartbeat(conns, app[SETTINGS].websocket.heartbeat)
    worker = asyncio.create_task(heartbeat.worker(), name="heartbeat-worker")
    try:
        yield
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def close_sockets(app: web.Application) -> None:
    """Shutdown: refuse new sockets and tell every open one we are going away."""
    app[STATE]["shutting_down"] = True
    timeout = app[SETTINGS].server.shutdown_timeout
    app[STATE]["shutdown_deadline"] = asyncio.get_running_loop().time() + timeout
    conns: set[Conn] = app[CONNS]
    for conn in list(conns):
        conn.close_soon(CLOSE_GOING_AWAY, b"server shutting down")


# -- errors -------------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers, dumps=_dumps)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            e.status, "http_error"
        )
        body = {"error": {"code": code, "message": e.reason}}
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return web.json_response(body, status=e.status, headers=headers, dumps=_dumps)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # A bug, not bad input: log it with the traceback, answer in the API's error shape.
        log.exception("unhandled error in %s %s", request.method, request.path)
        body = {"error": {"code": "internal_error", "message": "internal server error"}}
        return web.json_response(body, status=500, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


# -- REST ---------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    page = resources.files("livecomments").joinpath("static/index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def favicon(request: web.Request) -> web.Response:
    """An SVG served at the path browsers ask for on their own (a 404 in every console before)."""
    icon = resources.files("livecomments").joinpath("static/favicon.svg").read_bytes()
    return web.Response(
        body=icon, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )


def runner_options(settings: Settings) -> dict[str, Any]:
    """What the server around the app must be told (cli.serve passes these to AppRunner).

    `keepalive_timeout` is aiohttp's one timer from a connection's start, or its previous
    response, to a complete request head: it closes a slow sender (slowloris) and an idle
    keep-alive connection alike. Bodies are decompressed by body.py, not by aiohttp."""
    return {
        "keepalive_timeout": settings.http.idle_timeout,
        "auto_decompress": False,
    }


async def post_comment_json(request: web.Request) -> web.Response:
    """`POST /v1/comments` with a JSON object body."""
    settings = request.app[SETTINGS]
    body = await read_body(request, settings.limits.body_max_bytes, settings.http.body_timeout)
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("body", "must be a JSON object") from None
    if not isinstance(fields, dict):
        raise invalid("body", "must be a JSON object")
    return await _create_comment(request, fields)


async def post_comment_form(request: web.Request) -> web.Response:
    """`POST /v1/comment?uid=..&post_id=..&message=..`: the design's original form.

    Fields come from the query string or a form body; the body wins where both have one.
    """
    settings = request.app[SETTINGS]
    fields: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        fields.update(
            await read_form(request, settings.limits.body_max_bytes, settings.http.body_timeout)
        )
    return await _create_comment(request, fields)


async def _create_comment(request: web.Request, fields: Mapping[str, Any]) -> web.Response:
    app = request.app
    limits = app[SETTINGS].limits
    draft = draft_from(fields, limits.id_max_chars, limits.message_max_chars)
    client_msg_id = check_key(
        "client_msg_id", fields.get("client_msg_id"), limits.id_max_chars, required=False
    )
    if _lease_conflict(app):
        raise ApiError(
            503,
            "instance_id_conflict",
            "this instance's id is held by another instance; retry (on another instance)",
            {"Retry-After": "5"},
        )
    if app[IDS].instance_id is None:
        raise ApiError(
            503,
            "instance_id_pending",
            "this instance has no comment id range yet: its database is unreachable; retry "
            "(on another instance)",
            {"Retry-After": "5"},
        )
    key = (draft.uid, client_msg_id) if client_msg_id else None
    if key is not None:
        earlier = app[RECENT].claim(key, draft)
        if earlier is not None:
            return _created(await earlier)  # the first attempt's comment, or its ApiError
    comment = draft.to_comment(app[IDS].next_id(), wall_clock_ms())
    try:
        comment_json = await app[COMMENTS].accept(comment)
    except BaseException as e:
        error = _refusal(e if isinstance(e, QueueFull) else QueueWriteFailed(str(e) or "failed"))
        if key is not None:  # a retry must not wait on this attempt for ever
            app[RECENT].forget(key, error)
        if not isinstance(e, QueueFull | QueueWriteFailed):
            raise
        app[METRICS].inc("comments_rejected_total")
        raise error from e
    if key is not None:
        app[RECENT].settle(key, comment_json)
    app[METRICS].inc("comments_accepted_total")
    app[HUB].publish(comment.post_id, comment_json)
    return _created(comment_json)


def _lease_conflict(app: web.Application) -> bool:
    return app[LEASE].conflict


def _created(comment_json: bytes) -> web.Response:
    """201 `{"comment": C}` around C as the queue encoded it (no second encode)."""
    return web.Response(
        body=b'{"comment":' + comment_json + b"}", status=201, content_type="application/json"
    )


def _refusal(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(
            503,
            "queue_full",
            "too many comments are waiting for the database; retry later",
            {"Retry-After": str(RETRY_AFTER_QUEUE_FULL)},
        )
    return ApiError(
        503,
        "queue_unavailable",
        f"the comment could not be made durable: {e}",
        {"Retry-After": str(RETRY_AFTER_QUEUE_UNAVAILABLE)},
    )


async def list_comments(request: web.Request) -> web.Response:
    """`GET /v1/comments?post_id=P[&limit=N][&before=ID | &after=ID]`."""
    query = parse_page_query(request.query, request.app[SETTINGS])
    try:
        comments, has_more = await request.app[COMMENTS].page(query)
    except StoreUnavailable as e:
        raise ApiError(
            503,
            "store_unavailable",
            f"the comment database is not answering: {e}",
            {"Retry-After": "2"},
        ) from e
    return _json({"comments": [c.to_wire() for c in comments], "has_more": has_more})


def parse_page_query(q: Mapping[str, str], settings: Settings) -> PageQuery:
    limits = settings.limits
    post_id = check_key("post_id", q.get("post_id"), limits.id_max_chars)
    assert post_id is not None
    limit = limits.page_default
    if "limit" in q:
        limit = _parse_int("limit", q["limit"], 1, limits.page_max)
    before = _parse_int("before", q["before"], 0, MAX_SNOWFLAKE) if "before" in q else None
    after = _parse_int("after", q["after"], 0, MAX_SNOWFLAKE) if "after" in q else None
    if before is not None and after is not None:
        raise invalid("before", "cannot be combined with after")
    return PageQuery(post_id, limit, before, after)


def _parse_int(name: str, text: str, low: int, high: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise invalid(name, "must be a whole number")
    value = int(text)
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
    return value


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while this instance can take comments; the body says what is degraded."""
    app = request.app
    store = app[COMMENTS].status()
    hub = app[HUB].status()
    bridge = app[HUB].bridge_status()
    queue_full = app[COMMENTS].queue.refusing
    not_ready = []
    if app[STATE]["shutting_down"]:
        not_ready.append("shutting_down")
    if queue_full:
        not_ready.append("queue_full")
    if app[COMMENTS].queue.write_error is not None:
        not_ready.append("queue_unwritable")
    if _lease_conflict(app):
        not_ready.append("instance_id_conflict")
    if app[IDS].instance_id is None:
        not_ready.append("instance_id_pending")
    degraded = store["status"] != "ok" or bridge.get("status") != "ok"
    status = "unavailable" if not_ready else ("degraded" if degraded else "ok")
    body = {
        "status": status,
        "not_ready": not_ready,
        "store": store,
        "hub": hub,
        "bridge": bridge,
        "connections": len(app[CONNS]),
    }
    return _json(body, status=503 if not_ready else 200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain")


# -- WebSocket ----------------------------------------------------------------------------------


async def websocket(request: web.Request) -> web.StreamResponse:
    """`GET /v1/ws[?post_id=P]`: JSON text frames both ways (see README for the events)."""
    app = request.app
    settings = app[SETTINGS]
    if app[STATE]["shutting_down"]:
        raise ApiError(503, "shutting_down", "this instance is shutting down; reconnect elsewhere")
    if len(app[CONNS]) >= settings.limits.max_connections:
        raise ApiError(503, "too_many_connections", "this instance is at its connection limit")
    first_post = None
    if "post_id" in request.query:
        first_post = check_key("post_id", request.query["post_id"], settings.limits.id_max_chars)
    ws = web.WebSocketResponse(
        # Pings are ours (conn.Heartbeat): one worker for every socket, and a pong must reach
        # the read loop to count as a sign of life.
        heartbeat=None,
        autoping=False,
        # The read loop ends on the peer's close and conn.close_soon answers it, after the
        # frames already offered: aiohttp's own answer would go out before them.
        autoclose=False,
        # aiohttp refuses a message of max_msg_size bytes itself (it checks `>=`); ours is the
        # largest one taken, as config.toml says.
        max_msg_size=settings.limits.ws_frame_max_bytes + 1,
        # Never negotiated: conn.py writes one pre-built frame to every socket.
        compress=False,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer left during the handshake
        return ws
    conn = Conn(
        ws,
        transport,
        app[BATCHER],
        settings.websocket.outbox_max_bytes,
        on_slow=lambda: app[METRICS].inc("slow_consumer_closes_total"),
    )
    app[CONNS].add(conn)
    app[METRICS].inc("ws_connections_total")
    try:
        if first_post is not None:
            await _subscribe(app, conn, first_post)
        await _read_loop(app, conn)
    finally:
        app[CONNS].discard(conn)
        await app[HUB].leave(conn, conn.posts)
        conn.close_soon(CLOSE_NORMAL, b"")
        await conn.wait_closed()
        conn.forget_exception()
    return ws


async def _read_loop(app: web.Application, conn: Conn) -> None:
    loop = asyncio.get_running_loop()
    async for msg in conn.ws:
        conn.heard(loop.time())
        if msg.type == WSMsgType.PING:
            conn.offer(pong_frame(msg.data))
        elif msg.type == WSMsgType.TEXT:
            await _on_text(app, conn, msg.data)
        elif msg.type == WSMsgType.BINARY:
            conn.close_soon(CLOSE_UNSUPPORTED_DATA, b"binary frames are not supported")
            return
        if conn.closing:
            return


async def _on_text(app: web.Application, conn: Conn, text: str) -> None:
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _send_error(app, conn, "invalid_json", "frames must be JSON objects")
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return _send_error(app, conn, "invalid_event", 'events are objects with a string "type"')
    kind = event["type"]
    if kind == "ping":
        conn.offer(_PONG)
        return None
    if kind not in ("subscribe", "unsubscribe"):
        return _send_error(app, conn, "unknown_type", f"unknown event type {kind[:64]!r}")
    try:
        post_id = check_key("post_id", event.get("post_id"), app[SETTINGS].limits.id_max_chars)
    except ApiError as e:
        return _send_error(app, conn, e.code, e.message)
    assert post_id is not None
    if kind == "subscribe":
        await _subscribe(app, conn, post_id)
    else:
        conn.posts.discard(post_id)
        await app[HUB].unsubscribe(conn, post_id)
        _send(conn, {"type": "unsubscribed", "post_id": post_id})
    return None


async def _subscribe(app: web.Application, conn: Conn, post_id: str) -> None:
    if post_id not in conn.posts and len(conn.posts) >= app[SETTINGS].limits.posts_per_socket:
        limit = app[SETTINGS].limits.posts_per_socket
        return _send_error(app, conn, "too_many_posts", f"a socket may watch at most {limit} posts")
    try:
        await app[HUB].subscribe(conn, post_id)
    except TooManyPosts as e:
        return _send_error(app, conn, "too_many_posts", str(e))
    except Exception as e:
        log.warning("hub: subscribe %s failed: %s", post_id, e)
        return _send_error(app, conn, "subscribe_failed", "cannot follow this post right now")
    conn.posts.add(post_id)
    _send(conn, {"type": "subscribed", "post_id": post_id})
    return None


def _send_error(app: web.Application, conn: Conn, code: str, message: str) -> None:
    app[METRICS].inc("ws_errors_total")
    _send(conn, {"type": "error", "code": code, "message": message})


_PONG = text_frame(b'{"type":"pong"}')


def _send(conn: Conn, event: dict[str, str]) -> None:
    conn.offer(text_frame(orjson.dumps(event)))
