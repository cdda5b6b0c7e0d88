"""The peer baseline: what a Python team would otherwise build, with python-socketio.

`python -m bench.peer_socketio --port P`: `socketio.AsyncServer(async_mode="aiohttp")` with its
default settings, attached to an aiohttp app; a room per post; `POST /v1/comments` takes the same
JSON body as livecomments, gives the comment an id, `await sio.emit("comment", C, room=post)`
and answers 201 `{"comment": C}`, so the same load generator drives both servers.

Clients connect with Engine.IO v4 over WebSocket, connect the default namespace and send
`join` events (acknowledged) for the posts they watch.

Not like for like, in the peer's favour: it stores nothing (no fsync before the 201), and does
no validation beyond what the benchmark needs. Like for like: the same event loop (uvloop when
installed, as livecomments uses), the same listen backlog (1024), no access log.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web


def create_app() -> web.Application:
    sio = socketio.AsyncServer(async_mode="aiohttp")
    app = web.Application()
    sio.attach(app)
    ids = itertools.count(1)

    async def join(sid: str, post_id: Any) -> str:
        """A client watches a post: it joins the post's room; the return value is the ack."""
        await sio.enter_room(sid, str(post_id))
        return "ok"

    sio.on("join", join)

    async def post_comment(request: web.Request) -> web.Response:
        fields = await request.json()
        if not isinstance(fields, dict) or not all(
            isinstance(fields.get(k), str) and fields[k] for k in ("post_id", "uid", "message")
        ):
            return web.json_response({"error": {"code": "invalid"}}, status=400)
        comment = {
            "id": str(next(ids)),
            "post_id": fields["post_id"],
            "uid": fields["uid"],
            "message": fields["message"],
            "parent_id": None,
            "reply_to": None,
            "created_at": int(time.time() * 1000),
        }
        await sio.emit("comment", comment, room=comment["post_id"])
        return web.json_response({"comment": comment}, status=201)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/v1/comments", post_comment)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(
        create_app(), access_log=None, handle_signals=False, shutdown_timeout=5.0
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_socketio")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 (optional)
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
