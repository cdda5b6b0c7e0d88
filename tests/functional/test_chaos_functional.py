"""The promise, counted under chaos: three instances, two Redis servers, one PostgreSQL; viewers
that run the documented client (tests/support/viewer.py) and reconnect to any instance; writers
that retry on another instance. During the load, overlapping: a drain, a kill -9, a Redis server
killed and restarted empty, `CLIENT KILL TYPE pubsub`, a Redis server stopped (SIGSTOP) for a few
seconds. At the end every viewer shows every acknowledged comment of its posts exactly once, and
within each epoch it applied consecutive offsets.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.support.pg_cluster import pg_cluster, pg_url
from tests.support.redis_servers import RedisServer, RedisServers, redis_servers
from tests.support.server import ServerProcess
from tests.support.viewer import Viewer, settle
from tests.support.wait import wait_for

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest

POSTS = [f"chaos-{i}" for i in range(6)]
VIEWERS = 18
WRITERS = 6
RATE = 150  # comments per second, all writers together
LOAD_SECONDS = 24.0
SETTLE_SECONDS = 60.0


@dataclass
class Acked:
    """What writers were told: comment id -> post, for every 201."""

    ids: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    refused: int = 0

    def by_post(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {p: set() for p in POSTS}
        for comment_id, post_id in self.ids.items():
            out[post_id].add(comment_id)
        return out


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path / "redis") as servers:
        yield servers


def instance_env(urls: list[str], store_url: str) -> dict[str, str]:
    return {
        "LIVECOMMENTS_REDIS_URLS": ",".join(urls),
        "LIVECOMMENTS_REDIS_PROBE_INTERVAL": "1.0",
        "LIVECOMMENTS_REDIS_TIMEOUT": "1.0",
        "LIVECOMMENTS_STORE_URL": store_url,
        "LIVECOMMENTS_SERVER_DRAIN_SECONDS": "2",
        "LIVECOMMENTS_SERVER_SHUTDOWN_TIMEOUT": "5",
        "LIVECOMMENTS_WEBSOCKET_HEARTBEAT": "3",
        "LIVECOMMENTS_LOG_LEVEL": "WARNING",
    }


async def writer(
    http: aiohttp.ClientSession,
    instances: list[ServerProcess],
    acked: Acked,
    stop: asyncio.Event,
    *,
    rng: random.Random,
    n: int,
) -> None:
    """Post at its share of RATE; a failed POST is retried on another instance with the same
    client_msg_id (the retry window is per instance, so that may make a second comment: only
    201s count as acknowledged)."""
    interval = WRITERS / RATE
    for i in itertools.count():
        if stop.is_set():
            return
        started = time.monotonic()
        post_id = rng.choice(POSTS)
        body = {
            "post_id": post_id,
            "uid": f"w{n}",
            "message": f"w{n}-{i}",
            "client_msg_id": f"w{n}-{i}",
        }
        for attempt in range(10):
            server = instances[(n + i + attempt) % len(instances)]
            acked.attempts += 1
            try:
                async with http.post(f"{server.url}/v1/comments", json=body) as r:
                    if r.status == 201:
                        acked.ids[(await r.json())["comment"]["id"]] = post_id
                        break
                    acked.refused += 1
            except (aiohttp.ClientError, TimeoutError):
                acked.refused += 1
            await asyncio.sleep(0.05 * (attempt + 1))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def ready(http: aiohttp.ClientSession, server: ServerProcess) -> bool:
    """Serving, and owing nothing: every queued comment stored and in its stream."""
    try:
        async with http.get(f"{server.url}/readyz") as r:
            body = await r.json()
    except (aiohttp.ClientError, TimeoutError):
        return False
    store, broker = body["store"], body["broker"]
    return bool(
        r.status == 200
        and store["queue_depth"] == 0
        and broker["status"] == "ok"
        and body["hub"]["filling"] == 0
    )


async def faults(
    instances: list[ServerProcess], redis_a: RedisServer, redis_b: RedisServer, log: list[str]
) -> None:
    """The schedule, overlapping on purpose; every step bounded."""

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t - (time.monotonic() - began)))

    began = time.monotonic()
    await at(3)
    log.append("client kill pubsub on A")
    redis_a.command("CLIENT", "KILL", "TYPE", "pubsub")
    await at(5)
    log.append("SIGSTOP B")
    redis_b.pause()
    await at(6)
    log.append("drain instance 0 (SIGTERM)")
    drained = instances[0]
    drained.signal(signal.SIGTERM)
    await at(8)
    log.append("SIGCONT B")
    redis_b.resume()
    await at(9)
    log.append("kill -9 instance 1")
    instances[1].kill()
    assert drained.proc is not None
    await asyncio.to_thread(drained.proc.wait, 30)
    log.append("restart instance 0")
    await asyncio.to_thread(drained.start, 30)
    await at(12)
    log.append("restart instance 1")
    await asyncio.to_thread(instances[1].start, 30)
    await at(14)
    log.append("kill -9 Redis A")
    redis_a.kill()
    await at(16)
    log.append("restart Redis A, empty")
    await asyncio.to_thread(redis_a.restart)
    await at(18)
    log.append("client kill pubsub on B")
    redis_b.command("CLIENT", "KILL", "TYPE", "pubsub")


@pytest.mark.fault
async def test_every_viewer_gets_every_acknowledged_comment_once_in_order_under_chaos(
    redis: RedisServers, pg_url: str, tmp_path: Path
):
    rng = random.Random(20261127)
    redis_a, redis_b = redis.start(2)
    env = instance_env([redis_a.url, redis_b.url], pg_url)
    instances = [
        ServerProcess(tmp_path / f"node{i}", env=env, name=f"node{i}").start() for i in range(3)
    ]
    acked = Acked()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        viewers: list[Viewer] = []
        try:
            viewers = [
                Viewer(http, [s.url for s in instances], rng.sample(POSTS, 3), rng=rng).start()
                for _ in range(VIEWERS)
            ]
            for viewer in viewers:
                await viewer.wait_positioned(15)
            stop = asyncio.Event()
            log: list[str] = []
            writers = [
                asyncio.create_task(writer(http, instances, acked, stop, rng=rng, n=n))
                for n in range(WRITERS)
            ]
            await faults(instances, redis_a, redis_b, log)
            await asyncio.sleep(max(0.0, LOAD_SECONDS - 18))
            stop.set()
            await asyncio.gather(*writers)

            for server in instances:
                await wait_for(lambda s=server: ready(http, s), 45, f"{server.name} drained")
            await settle(viewers, acked.by_post(), SETTLE_SECONDS)

            report = []
            for viewer in viewers:
                assert viewer.duplicates == [], viewer.name
                assert viewer.redelivered == [], viewer.name
                assert viewer.offset_violations == [], viewer.name
                reloads = sum(len(viewer.reloads(p)) for p in viewer.post_ids)
                report.append((reloads, len(viewer.connections)))
            reappended = sum(len(v.reappended) for v in viewers)
            print(
                f"chaos: {len(acked.ids)} acknowledged of {acked.attempts} attempts "
                f"({acked.refused} refused or failed); faults: {log}; "
                f"reloads per viewer {[r for r, _ in report]}; "
                f"connections per viewer {[c for _, c in report]}; "
                f"comments applied again in a later epoch (shown once) {reappended}"
            )
            # The run must have been a real load, not a trickle; on a loaded 2-core machine the
            # writers reach 45-90% of RATE, so the floor is a quarter.
            assert len(acked.ids) > RATE * LOAD_SECONDS * 0.25
        finally:
            for viewer in viewers:
                await viewer.stop()
            for server in instances:
                server.kill()
