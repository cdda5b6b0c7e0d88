"""The `CommentStore` contract, run against every backend: SQLite and a real PostgreSQL.

A store must: insert batches atomically and idempotently by comment id; page a post newest
first, before or after a cursor, ascending, with one extra row that tells there is more; keep
posts apart; migrate on open, safely twice and from two openers at once; and serve its pages
from an index, without a sort. The backend-specific checks (schema version, query plans) sit at
the bottom, one per backend.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.storage import open_store
from livecomments.storage import postgres as postgres_store
from livecomments.storage import sqlite as sqlite_store
from livecomments.storage.base import COLUMNS, CommentStore, PageQuery, page_sql, window
from livecomments.storage.postgres import PostgresStore
from livecomments.urls import sqlite_path
from tests.support.pg_cluster import PgCluster, pg_cluster, pg_url
from tests.support.server import REPO

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest

BACKENDS = ["sqlite", "postgresql"]
MAX_ID = (1 << 63) - 1


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/comments.db"
    url: str = request.getfixturevalue("pg_url")  # the cluster starts only if asked for
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CommentStore]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


def comment(i: int, post: str = "p1", message: str | None = None) -> Comment:
    return Comment(i, post, f"u{i % 3}", message or f"m{i}", None, None, 1_700_000_000_000 + i)


async def page(
    s: CommentStore,
    post: str = "p1",
    limit: int = 3,
    before: int | None = None,
    after: int | None = None,
) -> tuple[list[int], bool]:
    query = PageQuery(post, limit, before, after)
    comments, more = window(await s.page(query), query)
    return [c.id for c in comments], more


# -- inserts --------------------------------------------------------------------------------


async def test_insert_then_page_returns_every_field(store: CommentStore):
    full = Comment(
        MAX_ID, "p1", "alice", "héllo 👋\n'quoted' \"x\"", "c-1", "bob", 1_700_000_000_123
    )
    await store.insert_many([comment(1), full])
    assert await store.page(PageQuery("p1", 10)) == [comment(1), full]


async def test_reinsert_is_idempotent_and_keeps_the_first_version(store: CommentStore):
    batch = [comment(i) for i in range(1, 6)]
    assert await store.insert_many(batch) == []
    assert await store.insert_many(batch) == []  # a replay after a crash is no collision
    changed = comment(3, message="changed")
    assert await store.insert_many([changed, comment(6), comment(6)]) == [changed]
    stored = await store.page(PageQuery("p1", 100))
    assert [c.id for c in stored] == [1, 2, 3, 4, 5, 6]
    assert stored[2].message == "m3"


async def test_an_id_already_stored_with_other_content_is_reported(store: CommentStore):
    """Two instances minting one id: the second comment cannot be kept under it, and the
    store says so instead of dropping it in silence."""
    await store.insert_many([comment(10), comment(11)])
    other = Comment(10, "p1", "mallory", "another comment", None, None, 1_700_000_000_999)
    assert await store.insert_many([comment(11), other, comment(12)]) == [other]
    assert [c.uid for c in await store.page(PageQuery("p1", 10))] == ["u1", "u2", "u0"]


async def test_empty_batch_is_a_no_op(store: CommentStore):
    await store.insert_many([])
    assert await store.page(PageQuery("p1", 10)) == []


async def test_large_batch_is_stored_whole(store: CommentStore):
    batch = [comment(i, post=f"p{i % 7}") for i in range(1, 5001)]
    await store.insert_many(batch)
    total = 0
    for post in range(7):
        ids, more = await page(store, f"p{post}", limit=1000)
        assert not more
        total += len(ids)
    assert total == 5000


# -- pages ----------------------------------------------------------------------------------


async def test_pages_newest_before_after_and_has_more(store: CommentStore):
    await store.insert_many([comment(i) for i in range(1, 11)])
    assert await page(store) == ([8, 9, 10], True)
    assert await page(store, before=8) == ([5, 6, 7], True)
    assert await page(store, before=4) == ([1, 2, 3], False)
    assert await page(store, before=1) == ([], False)
    assert await page(store, after=2) == ([3, 4, 5], True)
    assert await page(store, after=7) == ([8, 9, 10], False)
    assert await page(store, after=10) == ([], False)
    assert await page(store, limit=10) == (list(range(1, 11)), False)
    assert await page(store, limit=9) == (list(range(2, 11)), True)
    assert await page(store, limit=1, before=MAX_ID) == ([10], True)


async def test_page_returns_at_most_limit_plus_one_ascending(store: CommentStore):
    await store.insert_many([comment(i) for i in range(1, 11)])
    for query in (PageQuery("p1", 3), PageQuery("p1", 3, before=9), PageQuery("p1", 3, after=2)):
        ids = [c.id for c in await store.page(query)]
        assert len(ids) == 4
        assert ids == sorted(ids)


async def test_posts_are_kept_apart(store: CommentStore):
    await store.insert_many([comment(i, post="a" if i % 2 else "b") for i in range(1, 21)])
    assert await page(store, "a", limit=100) == (list(range(1, 21, 2)), False)
    assert await page(store, "b", limit=3, before=10) == ([4, 6, 8], True)
    assert await page(store, "b", limit=3, after=17) == ([18, 20], False)
    assert await page(store, "nobody-posted-here") == ([], False)


# -- deletions ------------------------------------------------------------------------------


def deletion(target: int, post: str = "p1", by: str = "u0") -> Deletion:
    return Deletion(1_000_000 + target, post, target, 1_700_000_100_000, by)


async def test_a_deleted_comment_leaves_every_page_but_stays_readable(store: CommentStore):
    await store.insert_many([comment(i) for i in range(1, 11)])
    await store.delete_many([deletion(9), deletion(5)])
    assert await page(store) == ([7, 8, 10], True)
    assert await page(store, before=8) == ([4, 6, 7], True)
    assert await page(store, after=3) == ([4, 6, 7], True)
    assert await page(store, limit=100) == ([1, 2, 3, 4, 6, 7, 8, 10], False)
    assert await store.get("p1", 9) == (comment(9), True)
    assert await store.get("p1", 8) == (comment(8), False)
    assert await store.get("p1", 99) is None
    assert await store.get("p2", 8) is None  # the post is part of the key


async def test_deleting_twice_or_before_the_comment_arrives(store: CommentStore):
    """A tombstone may be stored before its comment (another instance has not flushed it
    yet): the comment, when it comes, is stored and never listed."""
    await store.delete_many([deletion(3)])
    await store.delete_many([deletion(3), deletion(3, by="moderator:m")])
    assert await store.deleted_among("p1", [1, 2, 3]) == {3}
    assert await store.insert_many([comment(i) for i in range(1, 5)]) == []
    assert await page(store, limit=10) == ([1, 2, 4], False)
    assert await store.get("p1", 3) == (comment(3), True)


async def test_deleted_among_keeps_posts_apart_and_takes_many_ids(store: CommentStore):
    await store.delete_many([deletion(i) for i in range(0, 3000, 3)])
    await store.delete_many([deletion(1, post="p2")])
    found = await store.deleted_among("p1", list(range(3000)))
    assert found == set(range(0, 3000, 3))
    assert await store.deleted_among("p2", [0, 1, 2]) == {1}
    assert await store.deleted_among("p1", []) == set()


# -- migrations -----------------------------------------------------------------------------


async def test_migrations_run_twice(store_url: str):
    for _ in range(2):
        s = open_store(store_url)
        await s.open()
        await s.insert_many([comment(1)])
        await s.close()
    assert await schema_versions(store_url) == [1, 2, 3]


# Four stores opened at once, in one fresh process, on each of several new databases: the race
# is between connections, so one process shows it as well as four, and far more often. The
# child leaves by os._exit: a store whose open() failed may have leaked a connection whose
# thread would otherwise keep it (and so this test) from ever finishing.
RACE_OPENERS = """
import asyncio, os, sys
from livecomments.storage import open_store

async def race(url):
    stores = [open_store(url) for _ in range(4)]
    results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
    for s in stores:
        await s.close()
    return [r for r in results if isinstance(r, BaseException)]

async def main(urls):
    for url in urls:
        errors = await race(url)
        if errors:
            print(f"{url}: {errors[0]!r}", flush=True)
            return 1
    return 0

os._exit(asyncio.run(main(sys.argv[1:])))
"""


async def test_migrations_race_from_concurrent_openers(
    request: pytest.FixtureRequest, store_url: str, tmp_path: Path
):
    if store_url.startswith("sqlite"):
        urls = [f"sqlite:///{tmp_path}/race-{i}.db" for i in range(50)]
    else:
        urls = [store_url, request.getfixturevalue("pg_cluster").create_database()]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", RACE_OPENERS, *urls],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for url in urls:
        assert await schema_versions(url) == [1, 2, 3]


async def schema_versions(url: str) -> list[int]:
    """Which schema versions the database records as applied."""
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
        return list(range(1, version + 1))
    con = await asyncpg.connect(url, timeout=10)
    try:
        rows = await con.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await con.close()
    return [row["version"] for row in rows]


# -- pages come from the index, without a sort ----------------------------------------------

# A post of 1,000 comments among 400 short ones. Paging it must not read the whole post and sort
# it, nor walk the table by id and filter by post: the (post_id, id) index does neither. (In
# PostgreSQL that index is the primary key.)
PLAN_ROWS = [comment(i, post="p3" if i % 20 == 0 else f"q{i % 400}") for i in range(1, 20_001)]
QUERIES = [
    PageQuery("p3", 50),
    PageQuery("p3", 50, before=10_000),
    PageQuery("p3", 50, after=10_000),
]


@pytest.mark.parametrize("query", QUERIES, ids=["newest", "before", "after"])
def test_sqlite_pages_use_the_index_without_a_sort(tmp_path: Path, query: PageQuery):
    url = f"sqlite:///{tmp_path}/comments.db"

    async def fill() -> None:
        s = sqlite_store.SQLiteStore(url)
        await s.open()
        await s.insert_many(PLAN_ROWS)
        await s.close()

    asyncio.run(fill())
    sql, args = page_sql(query, COLUMNS, sqlite_store.sql_param)
    with sqlite3.connect(sqlite_path(url)) as db:
        db.execute("ANALYZE")
        plan = " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    assert "USING INDEX comments_post_id_id" in plan or "USING COVERING INDEX" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize("query", QUERIES, ids=["newest", "before", "after"])
async def test_postgres_pages_use_the_index_without_a_sort(pg_url: str, query: PageQuery):
    s = PostgresStore(pg_url)
    await s.open()
    await s.insert_many(PLAN_ROWS)
    await s.close()
    sql, args = page_sql(query, COLUMNS, postgres_store.sql_param)
    con = await asyncpg.connect(pg_url, timeout=10)
    try:
        await con.execute("ANALYZE comments")
        # With 20,000 rows a sequential scan may still look cheap; forbid it so that the plan
        # shows which index the query can walk (it must be one, and no Sort node after it).
        await con.execute("SET enable_seqscan = off")
        rows = await con.fetch(f"EXPLAIN {sql}", *args)
    finally:
        await con.close()
    plan = "\n".join(row[0] for row in rows)
    assert "Index Scan" in plan and "comments_pkey" in plan, plan
    assert "Index Cond: (post_id" in plan or "Index Cond: ((post_id" in plan, plan
    assert "Sort" not in plan, plan


# -- PostgreSQL: a database that is down or hung raises promptly ----------------------------


async def test_postgres_open_gives_up_on_a_server_that_never_answers():
    # A listening socket that accepts and never says a word: a hung or blackholed database.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        s = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await s.open()
        assert time.monotonic() - started < 3


async def test_postgres_statement_times_out_behind_a_lock(pg_url: str):
    s = PostgresStore(pg_url, command_timeout=0.5)
    await s.open()
    blocker = await asyncpg.connect(pg_url, timeout=10)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE comments IN ACCESS EXCLUSIVE MODE")
            for attempt in (
                lambda: s.page(PageQuery("p1", 10)),
                lambda: s.insert_many([comment(1)]),
            ):
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await attempt()
                assert time.monotonic() - started < 3
        await s.insert_many([comment(1)])  # the lock is gone: the pool still works
        assert await page(s) == ([1], False)
    finally:
        await blocker.close()
        await s.close()


@pytest.mark.fault
async def test_postgres_pool_survives_a_server_restart(pg_cluster: PgCluster, pg_url: str):
    s = PostgresStore(pg_url, connect_timeout=1, command_timeout=2)
    await s.open()
    try:
        await s.insert_many([comment(1)])
        for mode in ("fast", "immediate"):
            pg_cluster.stop(mode)
            with pytest.raises(OSError):  # down: refused at once, not a hang
                await s.page(PageQuery("p1", 10))
            pg_cluster.start()
            # The pooled connections died with the old server; the store must not need
            # reopening, and the first statement after the restart must succeed.
            await s.insert_many([comment(2 if mode == "fast" else 3)])
            assert (await page(s, limit=10))[0][-1] == (2 if mode == "fast" else 3)
    finally:
        pg_cluster.ensure_started()
        await s.close()


async def test_postgres_store_runs_with_a_role_that_cannot_create_tables(
    pg_cluster: PgCluster, pg_url: str
):
    owner = PostgresStore(pg_url)
    await owner.open()  # migrations need a role that may create tables; serving does not
    await owner.close()
    role = f"writer_{pg_url.rsplit('/', 1)[1]}"
    con = await asyncpg.connect(pg_url, timeout=10)
    try:
        await con.execute(f"CREATE ROLE {role} LOGIN")
        await con.execute(f"GRANT SELECT, INSERT ON comments TO {role}")
        await con.execute(f"GRANT SELECT, INSERT ON deletions TO {role}")
        await con.execute(f"GRANT SELECT ON schema_migrations TO {role}")
    finally:
        await con.close()
    s = PostgresStore(pg_url.replace("postgres@", f"{role}@"))
    await s.open()
    try:
        await s.insert_many([comment(1), comment(2), comment(3)])
        await s.delete_many([deletion(2)])
        assert await page(s) == ([1, 3], False)
    finally:
        await s.close()


def test_postgres_url_is_required():
    with pytest.raises(ValueError):
        PostgresStore("sqlite:///x.db")
