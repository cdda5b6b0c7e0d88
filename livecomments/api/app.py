"""The service as one aiohttp app: a thin factory that wires the rooms together.

Follow one comment through them in order: api/origins.py (may this page call us at all) ->
api/rest.py (who is asking, checked, rate-limited, given an id) -> storage/log.py (durable in
the write-ahead queue, then 201; flushed into the database later) -> storage/publisher.py
(appended to its post's stream) -> live/broker.py or live/redis/ (the stream's shard gives it
its offset and publishes it to every node following the post) -> live/hub.py (on each node, in
stream order, to the post's sockets, live/conn.py).

Each long-lived resource is its own cleanup context, started in this order and stopped in the
reverse one: trust (the token verifier, the rate buckets), the durable log (queue, store,
flusher), the instance id (leased in the store), the hub (with its broker), the outbox
publisher, the heartbeat. Every error leaves as `{"error": {"code", "message"}}`
(api/errors.py), unknown routes included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from livecomments import metrics
from livecomments.api import delete, openapi, ops, rest, ws
from livecomments.api.auth import Authenticator
from livecomments.api.dedupe import RecentRequests
from livecomments.api.errors import error_middleware
from livecomments.api.keys import (
    ADDRESSES,
    AUTH,
    BATCHER,
    COMMENT_BUCKETS,
    CONNS,
    HUB,
    IDS,
    LEASE,
    LIFECYCLE,
    LOG,
    PUBLISHER,
    RECENT,
    SETTINGS,
    SOCKET_LIMITS,
)
from livecomments.api.lifecycle import Lifecycle
from livecomments.api.origins import OriginPolicy, origin_middleware
from livecomments.api.peer import ClientAddresses
from livecomments.api.ratelimit import comment_buckets
from livecomments.api.socketlimits import ConnectionLimits
from livecomments.config import Settings
from livecomments.live.broker import Broker, open_broker
from livecomments.live.conn import Conn, WriteBatcher
from livecomments.live.heartbeat import Heartbeat
from livecomments.live.hub import Hub
from livecomments.storage.lease import run_instance_ids
from livecomments.storage.log import run_durable_log
from livecomments.storage.publisher import StreamPublisher
from livecomments.storage.queue import WriteAheadQueue
from livecomments.urls import redact_url

log = logging.getLogger(__name__)

# Bytes of a request line beyond its query string ("POST /v1/comment?" and " HTTP/1.1").
REQUEST_LINE_OVERHEAD = 1024
# Bytes of one header line: `Authorization: Bearer ` and the longest token auth.py reads.
MAX_HEADER_BYTES = 16 * 1024


def create_app(settings: Settings, broker: Broker | None = None) -> web.Application:
    """The whole service; `broker` replaces the one `redis.urls` asks for (tests)."""
    app = web.Application(
        client_max_size=settings.limits.body_max_bytes,
        middlewares=[
            origin_middleware(OriginPolicy(settings.http.allowed_origins)),
            error_middleware,
        ],
    )
    app[SETTINGS] = settings
    app[ADDRESSES] = ClientAddresses(settings.http.trusted_proxies)
    app[SOCKET_LIMITS] = ConnectionLimits.from_settings(settings.limits)
    app[RECENT] = RecentRequests(settings.limits.retry_window_bytes)
    app[CONNS] = set()
    app[BATCHER] = WriteBatcher()
    app[LIFECYCLE] = Lifecycle(settings.server.shutdown_timeout, settings.server.drain_seconds)
    app[HUB] = Hub(
        broker or open_broker(settings.redis, settings.history),
        settings.limits.posts_per_instance,
        settings.history.size,
    )
    app.cleanup_ctx.append(trust_ctx)
    app.cleanup_ctx.append(durable_log_ctx)
    app.cleanup_ctx.append(instance_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(outbox_ctx)
    app.cleanup_ctx.append(heartbeat_ctx)
    app.on_shutdown.append(begin_stop)
    app.router.add_get("/", rest.index)
    app.router.add_get("/favicon.ico", rest.favicon)
    app.router.add_post("/v1/comments", rest.post_comment_json)
    app.router.add_post("/v1/comment", rest.post_comment_form)
    app.router.add_get("/v1/comments", rest.list_comments)
    app.router.add_delete("/v1/comments/{id}", delete.delete_comment)
    app.router.add_get("/v1/ws", ws.websocket)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/openapi.json", openapi.spec)
    return app


def runner_options(settings: Settings) -> dict[str, Any]:
    """What the server around the app must be told (cli.serve passes these to AppRunner).

    `keepalive_timeout` is aiohttp's one timer from a connection's start, or its previous
    response, to a complete request head: it closes a slow sender (slowloris) and an idle
    keep-alive connection alike. Bodies are decompressed by api/body.py, not by aiohttp.

    A request line may be as long as the largest body: `POST /v1/comment?...` carries a whole
    comment in its query string (aiohttp's default, 8190 bytes, refused a valid message with a
    plain-text 400). A header line may hold the longest token auth.py takes."""
    return {
        "keepalive_timeout": settings.http.idle_timeout,
        "auto_decompress": False,
        "max_line_size": settings.limits.body_max_bytes + REQUEST_LINE_OVERHEAD,
        "max_field_size": MAX_HEADER_BYTES,
    }


async def apply_reload(app: web.Application, settings: Settings) -> None:
    """SIGHUP: take the keys that can change at runtime (today: the Redis ring)."""
    await app[HUB].reconfigure(settings.redis)
    log.info("reload: applied redis.urls = %s", [redact_url(u) for u in settings.redis.urls])


# -- the resources, one context each ------------------------------------------------------------


async def trust_ctx(app: web.Application) -> AsyncIterator[None]:
    """Who is asking and how often: the token verifier (its JWKS fetcher, if any) and the
    comment rate buckets (in Redis when there is one)."""
    settings = app[SETTINGS]
    auth = Authenticator(settings.auth)
    buckets = comment_buckets(settings.limits, settings.redis)
    await auth.start()
    app[AUTH], app[COMMENT_BUCKETS] = auth, buckets
    try:
        yield
    finally:
        await buckets.close()
        await auth.close()


async def durable_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """The write-ahead queue, the store behind it and the flusher (storage/log.py)."""
    lifecycle = app[LIFECYCLE]
    async with run_durable_log(app[SETTINGS], lambda: lifecycle.stop_deadline) as durable:
        app[LOG] = durable
        yield


async def instance_ctx(app: web.Application) -> AsyncIterator[None]:
    """This instance's id, leased in the store (storage/lease.py), and the generator using it."""
    durable = app[LOG]
    async with run_instance_ids(
        durable.lease_store,
        durable.queue,
        durable.store_open,
        durable.wait_store_open,
        app[SETTINGS].server.instance_id,
    ) as (ids, lease):
        app[IDS], app[LEASE] = ids, lease
        yield


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub and its broker, the keeper of the posts' streams (live/hub.py, live/broker.py)."""
    hub = app[HUB]
    conns = app[CONNS]
    metrics.bind(metrics.WS_CONNECTIONS_OPEN, lambda: len(conns))
    metrics.bind(metrics.POSTS_FOLLOWED, lambda: hub.post_count)
    await hub.start()
    try:
        yield
    finally:
        await hub.stop()


async def outbox_ctx(app: web.Application) -> AsyncIterator[None]:
    """The outbox's publisher: queued comments into their streams (storage/publisher.py). On
    the way out it gets what is left of the stop deadline to append what it still owes."""
    durable, hub = app[LOG], app[HUB]
    publisher = StreamPublisher(durable.queue, hub.broker, hub.deliver_unsequenced)
    durable.streams = hub.broker
    app[PUBLISHER] = publisher
    metrics.bind(metrics.OUTBOX_UNAPPENDED, durable.queue.rows.unappended_count)
    checks: set[asyncio.Task[None]] = set()

    def reconnected() -> None:
        publisher.unpark()
        task = asyncio.get_running_loop().create_task(publisher.verify_appended())
        checks.add(task)
        task.add_done_callback(checks.discard)

    hub.broker.on_reconnect(reconnected)
    await publisher.verify_appended()
    worker = asyncio.create_task(publisher.worker(), name="outbox-publish-worker")
    try:
        yield
    finally:
        await _until_appended(durable.queue, app[LIFECYCLE].stop_deadline)
        for task in (worker, *checks):
            task.cancel()
        await asyncio.gather(worker, *checks, return_exceptions=True)


async def _until_appended(queue: WriteAheadQueue, deadline: float | None) -> None:
    """Wait (until the stop deadline) for every queued comment to be in its stream."""
    loop = asyncio.get_running_loop()
    left = 0.0 if deadline is None else deadline - loop.time()
    try:
        async with asyncio.timeout(max(0.0, left)):
            await queue.rows.all_appended.wait()
    except TimeoutError:
        pass
    if queue.rows.unappended_count():
        log.warning(
            "shutdown: %d comments wait for their stream until the next start",
            queue.rows.unappended_count(),
        )


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """Pings quiet sockets and cuts dead ones (live/heartbeat.py)."""
    conns: set[Conn] = app[CONNS]
    heartbeat = Heartbeat(conns, app[SETTINGS].websocket.heartbeat)
    worker = asyncio.create_task(heartbeat.worker(), name="heartbeat-worker")
    try:
        yield
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def drain(app: web.Application) -> None:
    """Hand this node's viewers to the others (api/lifecycle.py); it keeps taking POSTs."""
    conns: set[Conn] = app[CONNS]
    await app[LIFECYCLE].drain(conns)


async def begin_stop(app: web.Application) -> None:
    """SIGTERM: refuse new sockets, close the open ones, start the shutdown clock."""
    conns: set[Conn] = app[CONNS]
    app[LIFECYCLE].begin_stop(conns)
