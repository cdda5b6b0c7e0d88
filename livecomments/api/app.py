"""The service as one aiohttp app: a thin factory that wires the rooms together.

Follow one comment through them in order: api/rest.py (checked, given an id) -> storage/log.py
(durable in the write-ahead queue, then 201; flushed into the database later) -> live/hub.py
(fanned out to this instance's sockets, live/conn.py) -> live/redis/ (to every other instance,
whose hub fans it out to its own sockets).

Each long-lived resource is its own cleanup context, started in this order and stopped in the
reverse one: the durable log (queue, store, flusher), the instance id (leased in the store), the
hub (with its bridge), the heartbeat. Every error leaves as `{"error": {"code", "message"}}`
(api/errors.py), unknown routes included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from livecomments import metrics
from livecomments.api import ops, rest, ws
from livecomments.api.dedupe import RecentRequests
from livecomments.api.errors import error_middleware
from livecomments.api.keys import (
    BATCHER,
    CONNS,
    HUB,
    IDS,
    LEASE,
    LIFECYCLE,
    LOG,
    RECENT,
    SETTINGS,
)
from livecomments.api.lifecycle import Lifecycle
from livecomments.config import Settings
from livecomments.live.bridge import Bridge, open_bridge
from livecomments.live.conn import Conn, WriteBatcher
from livecomments.live.heartbeat import Heartbeat
from livecomments.live.hub import Hub
from livecomments.storage.lease import run_instance_ids
from livecomments.storage.log import run_durable_log
from livecomments.urls import redact_url

log = logging.getLogger(__name__)


def create_app(settings: Settings, bridge: Bridge | None = None) -> web.Application:
    """The whole service; `bridge` replaces the one `redis.urls` asks for (tests)."""
    app = web.Application(
        client_max_size=settings.limits.body_max_bytes, middlewares=[error_middleware]
    )
    app[SETTINGS] = settings
    app[RECENT] = RecentRequests(settings.limits.retry_window_bytes)
    app[CONNS] = set()
    app[BATCHER] = WriteBatcher()
    app[LIFECYCLE] = Lifecycle(settings.server.shutdown_timeout)
    app[HUB] = Hub(bridge or open_bridge(settings.redis), settings.limits.posts_per_instance)
    app.cleanup_ctx.append(durable_log_ctx)
    app.cleanup_ctx.append(instance_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(heartbeat_ctx)
    app.on_shutdown.append(begin_stop)
    app.router.add_get("/", rest.index)
    app.router.add_get("/favicon.ico", rest.favicon)
    app.router.add_post("/v1/comments", rest.post_comment_json)
    app.router.add_post("/v1/comment", rest.post_comment_form)
    app.router.add_get("/v1/comments", rest.list_comments)
    app.router.add_get("/v1/ws", ws.websocket)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    return app


def runner_options(settings: Settings) -> dict[str, Any]:
    """What the server around the app must be told (cli.serve passes these to AppRunner).

    `keepalive_timeout` is aiohttp's one timer from a connection's start, or its previous
    response, to a complete request head: it closes a slow sender (slowloris) and an idle
    keep-alive connection alike. Bodies are decompressed by api/body.py, not by aiohttp."""
    return {"keepalive_timeout": settings.http.idle_timeout, "auto_decompress": False}


async def apply_reload(app: web.Application, settings: Settings) -> None:
    """SIGHUP: take the keys that can change at runtime (today: the Redis ring)."""
    await app[HUB].reconfigure(settings.redis)
    log.info("reload: applied redis.urls = %s", [redact_url(u) for u in settings.redis.urls])


# -- the resources, one context each ------------------------------------------------------------


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
    """The hub and its bridge to the other instances (live/hub.py, live/redis/)."""
    hub = app[HUB]
    conns = app[CONNS]
    metrics.bind(metrics.WS_CONNECTIONS_OPEN, lambda: len(conns))
    metrics.bind(metrics.POSTS_FOLLOWED, lambda: hub.post_count)
    await hub.start()
    try:
        yield
    finally:
        await hub.stop()


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


async def begin_stop(app: web.Application) -> None:
    """SIGTERM: refuse new sockets, close the open ones, start the shutdown clock."""
    conns: set[Conn] = app[CONNS]
    app[LIFECYCLE].begin_stop(conns)
