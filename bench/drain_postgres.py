"""`python -m bench.drain_postgres`: how fast a backlog drains into PostgreSQL after an outage.

What it does, on a private PostgreSQL cluster (tests/support/pg_cluster.py; never the shared one):

1. stops the database, then accepts `--comments` comments into a real `WriteAheadQueue` (each
   fsync'd, as a POST would), while the real flusher (`store.Comments`) fails and backs off;
2. starts the database and times until the queue is empty: the flusher moves the backlog in
   batches of `--batch` through `PostgresStore.insert_many` and deletes each batch from the
   queue file, exactly the service's path;
3. prints the drain rate (comments/s, from the first committed batch to an empty queue), the
   queue's bytes per comment (what `queue.max_bytes` counts, and what the file takes on disk),
   the memory a queued comment costs, and how long an outage the default limit rides out.

The service's own process is not involved (no HTTP): this measures the queue -> store path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

from livecomments.config import QueueSettings
from livecomments.model.comment import Comment
from livecomments.model.ids import SnowflakeGenerator, wall_clock_ms
from livecomments.storage.log import DurableLog as Comments
from livecomments.storage.postgres import PostgresStore
from livecomments.storage.queue import QUEUE_FILE, WriteAheadQueue
from tests.support.pg_cluster import PgCluster

RATES = (10, 100, 1000)  # comments per second, for the outage table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.drain_postgres", description=__doc__)
    p.add_argument("--comments", type=int, default=100_000, help="backlog size (100000)")
    p.add_argument(
        "--batch",
        type=int,
        default=QueueSettings().flush_batch,
        help=f"comments per flush, as queue.flush_batch ({QueueSettings().flush_batch})",
    )
    p.add_argument("--message-chars", type=int, default=100, help="message length (100)")
    p.add_argument("--posts", type=int, default=1000, help="posts the comments spread over")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def make_comments(n: int, message_chars: int, posts: int, seed: int) -> list[Comment]:
    rng = random.Random(seed)
    ids = SnowflakeGenerator(1)
    alphabet = string.ascii_letters + string.digits + " "
    return [
        Comment(
            ids.next_id(),
            f"post-{rng.randrange(posts)}",
            f"user-{rng.randrange(100_000)}",
            "".join(rng.choices(alphabet, k=message_chars)),
            None,
            None,
            wall_clock_ms(),
        )
        for _ in range(n)
    ]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob(QUEUE_FILE + "*"))


async def enqueue_all(queue: WriteAheadQueue, comments: list[Comment]) -> float:
    """Enqueue like concurrent POSTs (group commits of up to 4096); returns seconds taken."""
    started = time.perf_counter()
    step = 4096
    for i in range(0, len(comments), step):
        await asyncio.gather(*(queue.enqueue(c) for c in comments[i : i + step]))
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> int:
    rss_before = rss_bytes()  # before the comments exist: the queue keeps these very objects
    comments = make_comments(args.comments, args.message_chars, args.posts, args.seed)
    work = Path(tempfile.mkdtemp(prefix="livecomments-drain-"))
    cluster = PgCluster().init()
    try:
        cluster.start()
        url = cluster.create_database()
        cluster.stop("fast")

        queue = WriteAheadQueue(work / "queue", QueueSettings().max_bytes)
        await queue.open()
        store = PostgresStore(url, connect_timeout=2)
        path = Comments(queue, store, args.batch, retry_max=0.2)

        async def opening_flusher() -> None:  # as app._opening_flusher
            await path.open_store_until_ready()
            await path.flush_worker()

        flusher = asyncio.create_task(opening_flusher())
        enqueue_s = await enqueue_all(queue, comments)
        rss_after = rss_bytes()
        payload_bytes = queue.pending_bytes
        disk_bytes = file_bytes(work / "queue")
        assert queue.depth == len(comments), "the database was down: nothing should have flushed"

        cluster.start()
        back = time.perf_counter()
        first_batch: float | None = None
        # Flushed, not dequeued: the queue is an outbox (issue 10), and keeps each comment
        # until its stream has it too; nothing appends here (no broker), only the flush counts.
        while path.flushed < len(comments):
            if first_batch is None and path.flushed:
                first_batch = time.perf_counter()
            await asyncio.sleep(0.005)
        drained = time.perf_counter()
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await queue.close()
        await store.close()
        stored = await count_rows(url)
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)

    n = len(comments)
    assert stored == n, f"{stored} of {n} stored"
    drain_s = drained - (first_batch or back)
    per_comment = payload_bytes / n
    default_max = QueueSettings().max_bytes
    print(f"backlog: {n} comments, {args.message_chars}-char messages, batch {args.batch}")
    print(f"enqueue (fsync'd, group commits): {n / enqueue_s:,.0f} comments/s")
    print(f"drain into PostgreSQL: {n / drain_s:,.0f} comments/s ({drain_s:.2f} s)")
    print(f"  database back -> all flushed: {drained - back:.2f} s (includes the backoff wait)")
    print(f"queue bytes per comment (counted by queue.max_bytes): {per_comment:.0f}")
    print(f"queue file on disk per comment: {disk_bytes / n:.0f}")
    memory = (rss_after - rss_before) / n
    print(f"process memory per queued comment (RSS growth, approx.): {memory:.0f}")
    capacity = default_max / per_comment
    print(f"default queue.max_bytes = {default_max >> 20} MiB holds {capacity:,.0f} comments:")
    for rate in RATES:
        print(f"  at {rate:>4} comments/s: {format_duration(capacity / rate)} of outage")
    sizes = {}
    for chars in (20, 100, 280, 1000, 2000):
        sizes[chars] = len(make_comments(1, chars, args.posts, args.seed)[0].encode())
        print(f"  ({chars}-char message: {sizes[chars]} bytes per comment)")
    result = {
        "comments": n,
        "batch": args.batch,
        "message_chars": args.message_chars,
        "posts": args.posts,
        "enqueue_per_s": round(n / enqueue_s),
        "drain_per_s": round(n / drain_s),
        "drain_s": round(drain_s, 3),
        "queue_bytes_per_comment": round(per_comment),
        "queue_file_bytes_per_comment": round(disk_bytes / n),
        "rss_bytes_per_comment": round(memory),
        "bytes_per_comment_by_message_chars": sizes,
    }
    # One machine-readable line for the harness (bench/scenarios.py, scenario `drain`).
    print("drain-result " + json.dumps(result))
    return 0


async def count_rows(url: str) -> int:
    import asyncpg  # noqa: PLC0415 (only to check the result)

    con = await asyncpg.connect(url, timeout=10)
    try:
        return int(await con.fetchval("SELECT count(*) FROM comments"))
    finally:
        await con.close()


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if shutil.which("pg_ctl") is None and not Path("/usr/lib/postgresql").is_dir():
        print("drain_postgres: PostgreSQL server binaries (initdb, pg_ctl) not found")
        return 1
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
