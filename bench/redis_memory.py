"""`python -m bench.redis_memory`: what a post's stream history costs in Redis.

Appends 1, 100, 1,000 and 2,000 comments (100-character messages, realistic ids) to the streams
of four posts on a private redis-server (never the shared one), through the real broker and its
APPEND script, and records `MEMORY USAGE` of each post's three keys (position, stream, index) in
bench/results/redis-memory.json, from which `make bench` writes BENCHMARKS.md's "Redis memory per
post of history".
"""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

import redis

from bench.report import REDIS_MEMORY, redis_memory_section
from livecomments.config import HistorySettings, RedisSettings
from livecomments.live.redis import streams
from livecomments.live.redis.broker import RedisBroker
from livecomments.model.comment import Comment
from livecomments.model.stream import COMMENT, Entry, Publication
from tests.support.redis_servers import RedisServer

COUNTS = (1, 100, 1000, 2000)
FIRST_ID = 383391481420840960  # an id of late 2026: as wide as real ones


class _Nobody:
    def on_publication(self, publication: Publication) -> None:
        pass

    def on_stream_gap(self, post_ids: Iterable[str]) -> None:
        pass

    def local_posts(self) -> Collection[str]:
        return ()


async def measure(url: str) -> list[tuple[int, int, list[int]]]:
    broker = RedisBroker(RedisSettings(urls=[url]), HistorySettings())
    await broker.start(_Nobody())
    client = redis.Redis.from_url(url)
    rows = []
    try:
        for n in COUNTS:
            post = f"memory-{n}"
            for start in range(0, n, 500):
                ids = range(FIRST_ID + start, FIRST_ID + min(n, start + 500))
                await broker.append(
                    [
                        Entry(
                            i,
                            post,
                            COMMENT,
                            Comment(i, post, "user-12345", "x" * 100, None, None, 1).encode(),
                        )
                        for i in ids
                    ]
                )
            sizes = [int(client.memory_usage(k, samples=0) or 0) for k in streams.keys(post)]
            rows.append((n, sum(sizes), sizes))
    finally:
        client.close()
        await broker.stop()
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), "memory").start()
        try:
            version = subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, check=True
            ).stdout.split()[2]
            rows = asyncio.run(measure(server.url))
        finally:
            server.stop()
    data = {
        "measured": datetime.date.today().isoformat(),
        "redis": version.removeprefix("v="),
        "rows": [{"comments": n, "bytes": total, "keys": sizes} for n, total, sizes in rows],
    }
    REDIS_MEMORY.write_text(json.dumps(data, indent=1) + "\n")
    print(redis_memory_section(REDIS_MEMORY))


if __name__ == "__main__":
    main()
