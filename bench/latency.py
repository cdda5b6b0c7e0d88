"""`python -m bench.latency [--comments N] [--redis K]`: POST-to-socket latency, one at a time.

The simplest question a user asks: how long from sending a comment to a watcher seeing it, with
nothing else going on. One comment at a time (each waits for the previous one to arrive), after
50 warm-up comments, over loopback:

* `--redis 0` (default): one instance on SQLite; the watcher is on the instance that took the POST.
* `--redis K` (K >= 1): two instances sharing K private redis-server processes; the POST goes to
  the first instance and the watcher sits on the second, so every comment crosses Redis.

Prints p50/p99/max of POST start -> comment frame read, and of POST start -> 201 (the durable
acknowledgement, which includes the queue's fsync). Servers and Redis are private processes on
free ports (tests/support/server.py, tests/support/redis_servers.py), stopped at the end, and not
pinned: for published figures `make bench` runs the same measurement (`latency` scenario) with the
server processes pinned to one core, into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from tests.support.server import ServerProcess

WARM_UP = 50


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms, max {max(samples):.2f} ms"


async def one_at_a_time(
    post_url: str, ws_url: str, n: int, warm_up: int = WARM_UP
) -> tuple[list[float], list[float]]:
    """POST n comments (after `warm_up` more) to `post_url`, each after the previous one arrived
    on a socket of `ws_url` watching the post: (POST start -> frame read, POST start -> 201) in
    ms per comment. Also the harness's `latency` scenario (bench/scenarios.py)."""
    to_socket: list[float] = []
    to_ack: list[float] = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{ws_url}?post_id=latency")
        assert (await ws.receive_json(timeout=10))["type"] == "subscribed"
        for k in range(n + warm_up):
            body = {"post_id": "latency", "uid": "bench", "message": f"m{k}"}
            t0 = time.perf_counter()
            async with http.post(f"{post_url}/v1/comments", json=body) as r:
                assert r.status == 201, await r.text()
                t_ack = time.perf_counter()
            event = await ws.receive_json(timeout=10)
            t_seen = time.perf_counter()
            assert event["type"] == "comment" and event["comment"]["message"] == f"m{k}", event
            if k >= warm_up:
                to_socket.append((t_seen - t0) * 1000)
                to_ack.append((t_ack - t0) * 1000)
        await ws.close()
    return to_socket, to_ack


async def measure(poster: ServerProcess, watcher: ServerProcess, n: int) -> None:
    to_socket, to_ack = await one_at_a_time(poster.url, watcher.ws_url, n)
    print(f"POST -> socket ({n} comments): {percentiles(to_socket)}")
    print(f"POST -> 201 (durable ack):     {percentiles(to_ack)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comments", type=int, default=1000)
    parser.add_argument("--redis", type=int, default=0, help="Redis servers (0: one instance)")
    args = parser.parse_args()
    # The tests' helpers start the private servers; the harness imports this module without them.
    from tests.support.redis_servers import RedisServers  # noqa: PLC0415
    from tests.support.server import ServerProcess  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix="lc-latency-"))
    redis = RedisServers(base / "redis")
    servers: list[ServerProcess] = []
    try:
        env = {"LIVECOMMENTS_LOG_LEVEL": "WARNING"}
        if args.redis:
            env["LIVECOMMENTS_REDIS_URLS"] = ",".join(s.url for s in redis.start(args.redis))
        for i in range(2 if args.redis else 1):
            servers.append(ServerProcess(base / f"i{i}", env=env, name=f"i{i}").start())
        where = "across 2 instances via Redis" if args.redis else "on one instance"
        print(f"loopback, {where}:")
        await measure(servers[0], servers[-1], args.comments)
    finally:
        for server in servers:
            server.stop()
        redis.close()


if __name__ == "__main__":
    asyncio.run(main())
