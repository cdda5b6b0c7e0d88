"""For whoever runs the service: is it alive, will it take comments, and its numbers."""

from __future__ import annotations

from aiohttp import web

from livecomments import metrics as exported
from livecomments.api.errors import json_response
from livecomments.api.keys import CONNS, HUB, IDS, LEASE, LIFECYCLE, LOG, PUBLISHER


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while this instance takes comments and sockets, 503 when it does not (stopping,
    draining, the queue full or unwritable, no instance id); the body says what is not ready
    and what is degraded (the store, the broker and its shards)."""
    app = request.app
    durable = app[LOG]
    store = durable.status()
    broker = app[HUB].broker_status()
    not_ready = []
    if app[LIFECYCLE].stopping:
        not_ready.append("shutting_down")
    elif app[LIFECYCLE].draining:
        not_ready.append("draining")
    if durable.queue.refusing:
        not_ready.append("queue_full")
    if durable.queue.write_error is not None:
        not_ready.append("queue_unwritable")
    if app[LEASE].conflict:
        not_ready.append("instance_id_conflict")
    if app[IDS].instance_id is None:
        not_ready.append("instance_id_pending")
    degraded = store["status"] != "ok" or broker.get("status") != "ok"
    status = "unavailable" if not_ready else ("degraded" if degraded else "ok")
    body = {
        "status": status,
        "not_ready": not_ready,
        "store": store,
        "hub": app[HUB].status(),
        "outbox": app[PUBLISHER].status(),
        "broker": broker,
        "connections": len(app[CONNS]),
    }
    return json_response(body, status=503 if not_ready else 200)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (livecomments/metrics.py lists every series)."""
    return web.Response(body=exported.render(), content_type="text/plain", charset="utf-8")
