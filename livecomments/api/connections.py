"""`limits.max_connections` over every TCP connection this process holds.

WebSockets, requests in flight, idle keep-alive connections, and connections that have not
finished sending a request yet: a slow sender (slowloris) holds a file descriptor and a buffer
as surely as a WebSocket does, so it counts as one. Past the limit a new connection is closed at
once, before anything of it is read (answering it would be the cost being refused), and counted
in `livecomments_connections_refused_total`; `livecomments_connections` shows how many are open.
`http.idle_timeout` reaps the ones that send nothing.

aiohttp has no limit of its own; `guard_connections` wraps its server's public per-connection
hook, the one place this service reaches into the server around the app.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from livecomments import metrics


def guard_connections(server: web.Server, max_connections: int) -> None:
    """Close every connection beyond `max_connections` as it is made."""
    made = server.connection_made

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > max_connections:
            metrics.CONNECTIONS_REFUSED.inc()
            handler.force_close()
            transport.close()

    server.connection_made = connection_made  # type: ignore[method-assign]
    metrics.bind(metrics.CONNECTIONS_OPEN, lambda: len(server.connections))
