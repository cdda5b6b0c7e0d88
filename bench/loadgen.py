"""A load generator process: `python -m bench.loadgen --role subscribers|poster`.

The orchestrator (run.py via procs.py) drives it with one JSON command per line on stdin and
reads one JSON reply per line on stdout; logs go to stderr. The process exits at end of input
(so it cannot outlive an orchestrator that died), on `{"cmd": "exit"}`, or after `--max-seconds`.

Subscribers commands: `open` (sockets and their posts), `begin` (reset the tally from a start
time), `count` (deliveries so far), `end` (the tally), `status`, `reopen` (replace sockets the
server closed), `close`.
Poster commands: `connect` (n connections), `rate` (open loop), `closed` (closed loop), `close`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from typing import Any

import orjson

from bench.leanhttp import Poster
from bench.leanws import SocketPool

# Upper bounds on how long any one command may wait, whatever the orchestrator asked.
MAX_COMMAND_SECONDS = 300.0


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Subscribers:
    def __init__(self) -> None:
        self.pool = SocketPool()
        self.dialect: Any = "lc"
        self.port = 0

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        pool = self.pool
        if name == "open":
            self.dialect, self.port = cmd["dialect"], int(cmd["port"])
            return await pool.open(
                self.dialect,
                self.port,
                cmd["subscriptions"],
                int(cmd.get("concurrency", 256)),
                min(float(cmd.get("within", 60)), MAX_COMMAND_SECONDS),
            )
        if name == "begin":
            pool.tally.reset(int(cmd["since_ns"]))
            return {}
        if name == "count":
            return {"deliveries": pool.tally.deliveries}
        if name == "end":
            t = pool.tally
            out = {
                "deliveries": t.deliveries,
                "stale": t.stale,
                "reads": t.reads,
                "samples": t.samples,
                "first_ns": t.first_ns,
                "last_ns": t.last_ns,
                "hist": t.histogram().pairs(),
                "max_us": t.max_us,
                "read_hist": t.read_histogram().pairs(),
                "read_max_us": t.read_max_us,
            }
            t.reset(t.since_ns)
            return out
        if name == "status":
            return pool.status()
        if name == "reopen":
            replaced = await pool.reopen_closed(self.dialect, self.port, 60.0)
            return {"replaced": replaced, **pool.status()}
        if name == "close":
            await pool.close_all(float(cmd.get("within", 5)))
            return {}
        raise ValueError(f"unknown command {name!r}")


class PosterRole:
    def __init__(self) -> None:
        self.poster: Poster | None = None

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "connect":
            if self.poster is None or self.poster.port != int(cmd["port"]):
                self.poster = Poster(int(cmd["port"]), int(cmd.get("pad", 80)))
            await self.poster.open(int(cmd["connections"]))
            return {"connections": len(self.poster.conns)}
        poster = self.poster
        if poster is None:
            raise ValueError("connect first")
        if name == "rate":
            duration = min(float(cmd["duration"]), MAX_COMMAND_SECONDS)
            return await poster.run_rate(list(cmd["posts"]), float(cmd["rate"]), duration)
        if name == "closed":
            await poster.open(int(cmd["connections"]))
            duration = min(float(cmd["duration"]), MAX_COMMAND_SECONDS)
            return await poster.run_closed([str(post) for post in cmd["posts"]], duration)
        if name == "close":
            poster.close()
            return {}
        raise ValueError(f"unknown command {name!r}")


async def serve(role: str, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    handler = Subscribers() if role == "subscribers" else PosterRole()
    out = sys.stdout.buffer
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                line = await reader.readline()
        except TimeoutError:
            break
        if not line:
            break  # the orchestrator is gone
        cmd = orjson.loads(line)
        if cmd.get("cmd") == "exit":
            break
        try:
            reply: dict[str, Any] = {"result": await handler.handle(cmd)}
        except Exception as e:  # reported to the orchestrator, which fails the scenario
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(orjson.dumps(reply) + b"\n")
        out.flush()
    if isinstance(handler, Subscribers):
        await handler.pool.close_all(0.5)
    elif handler.poster is not None:
        handler.poster.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--role", choices=("subscribers", "poster"), required=True)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop  # noqa: PLC0415 (optional, but the leaner loop)

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.role, args.max_seconds))


if __name__ == "__main__":
    main()
