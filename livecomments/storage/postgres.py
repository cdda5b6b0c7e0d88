"""The PostgreSQL store, for deployments that outgrow one SQLite file.

`store.url = "postgresql://user:password@host:5432/dbname"` (or `postgres://`) selects it; every
other connection option of a libpq URL that asyncpg understands (sslmode, ...) works as usual.

What it guarantees, and how:

* `insert_many` is one statement: the batch's columns travel as arrays, are turned back into rows
  by `unnest()`, and go in with `ON CONFLICT (post_id, id) DO NOTHING`. So a batch is atomic,
  costs one round trip whatever its size, and is idempotent: a replay after a crash, or a batch
  with a comment twice in it, leaves the stored comment as it was.
* The primary key is `(post_id, id)`, not `id`: a comment never changes post, so it identifies a
  comment just as well, and it is then the one index of the table. `page` walks it forwards or
  backwards (no sort, however long the post), each insert updates one index instead of two, and
  the planner has no index on `id` alone to be tempted by: walking that one backwards and
  filtering by post looks cheap to it, and reads the whole table for a post with no recent
  comments.
* Nothing here waits without a deadline. Connecting gives up after `connect_timeout`, every
  statement after `command_timeout`, taking a pooled connection after `command_timeout` too. A
  database that is down or hung therefore raises promptly, and `DurableLog` (log.py) turns that into
  "keep it queued, retry" for the flusher and `StoreUnavailable` (503) for readers.
* The pool survives the server restarting: asyncpg drops a connection it finds closed and opens a
  fresh one when it is next acquired. The pool keeps no minimum of open connections, so during an
  outage nothing in it reconnects in the background; the flusher's backoff is the one retry loop.
  A statement that finds its connection closed by a restart the pool had not noticed yet is
  retried once on a fresh connection (`_STALE`), so that restart costs a client no 503.
* A batch is acknowledged (and deleted from the write-ahead queue) only once PostgreSQL has
  committed it durably: sessions run with `synchronous_commit = on` whatever the server's default,
  because with `off` a crash of the database loses the last commits after we have let go of them.
  A URL that sets `?synchronous_commit=...` itself (e.g. `remote_apply`) is left as it asks.
* Schema versions are rows of `schema_migrations`. `open()` applies the pending ones in one
  transaction that first takes `pg_advisory_xact_lock(MIGRATION_LOCK_ID)`: two instances starting
  at once (or `livecomments migrate` beside a running one) apply each migration once, the second
  waits and then finds nothing to do. DDL is transactional in PostgreSQL, so a failed migration
  leaves no half-built schema behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.storage.base import COLUMNS, PageQuery, different_from_stored, page_sql

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds to open a connection (TCP + TLS + authentication) before giving up.
CONNECT_TIMEOUT = 5.0
# Seconds any one statement (or waiting for a free pooled connection) may take.
COMMAND_TIMEOUT = 10.0
# Connections per process: the flusher uses one, GET requests the rest.
POOL_MAX_SIZE = 8
# Seconds an idle pooled connection is kept before it is closed.
POOL_IDLE_LIFETIME = 60.0
# Key of the advisory lock that serialises migrations. A fixed number, not a hash of a name:
# every instance and every version of the code must agree on it. It is b"lcmigrat" as an int.
MIGRATION_LOCK_ID = int.from_bytes(b"lcmigrat", "big")

# Append only: version N is MIGRATIONS[N - 1]. Each runs inside the migration transaction.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS comments (
        id bigint NOT NULL,
        post_id text NOT NULL,
        uid text NOT NULL,
        message text NOT NULL,
        parent_id text,
        reply_to text,
        created_at bigint NOT NULL,
        CONSTRAINT comments_pkey PRIMARY KEY (post_id, id)
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS instance_leases (
        instance_id integer PRIMARY KEY,
        holder text NOT NULL,
        expires_at bigint NOT NULL
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS deletions (
        post_id text NOT NULL,
        id bigint NOT NULL,
        deleted_at bigint NOT NULL,
        deleted_by text NOT NULL,
        CONSTRAINT deletions_pkey PRIMARY KEY (post_id, id)
    );
    """,
]

# The database's clock in Unix ms: every instance sharing the database reads the same one.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
TAKE_LEASE_SQL = f"""
    INSERT INTO instance_leases (instance_id, holder, expires_at) VALUES ($1, $2, {NOW_MS} + $3)
    ON CONFLICT (instance_id) DO UPDATE
    SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
    WHERE instance_leases.expires_at < {NOW_MS} OR instance_leases.holder = EXCLUDED.holder
    RETURNING instance_id
"""


INSERT_SQL = f"""
    INSERT INTO comments ({COLUMNS})
    SELECT * FROM unnest(
        $1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[]
    )
    ON CONFLICT (post_id, id) DO NOTHING
    RETURNING id
"""
DELETE_SQL = """
    INSERT INTO deletions (post_id, id, deleted_at, deleted_by)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[])
    ON CONFLICT (post_id, id) DO NOTHING
"""
GET_SQL = f"""
    SELECT {COLUMNS}, EXISTS (
        SELECT 1 FROM deletions d WHERE d.post_id = c.post_id AND d.id = c.id
    )
    FROM comments c WHERE post_id = $1 AND id = $2
"""
STORED_SQL = f"""
    SELECT {COLUMNS} FROM comments
    WHERE (post_id, id) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))
"""

# "This connection is gone", not "this statement failed": asyncpg raises it when the server closed
# a pooled connection (a restart) before the pool noticed. Retried once on a fresh connection;
# both operations are idempotent, so a statement that did commit before the loss is harmless.
# A refused connect or a timeout is not retried: the server is down or hung, and a second wait
# would only double the time the caller waits to hear so.
_STALE = asyncpg.ConnectionDoesNotExistError


def sql_param(n: int) -> str:
    """PostgreSQL's placeholder: numbered."""
    return f"${n}"


class PostgresStore:
    """`CommentStore` on a PostgreSQL database, through an asyncpg pool."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"expected postgresql://..., got {url!r}")
        self._url = url
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None

    async def open(self) -> None:
        """Create the pool and apply pending migrations; on failure, leave nothing open."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=0,
                max_size=POOL_MAX_SIZE,
                max_inactive_connection_lifetime=POOL_IDLE_LIFETIME,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings=_server_settings(self._url),
            )
        try:
            version = await self._run(migrate)
        except BaseException:
            await self.close()
            raise
        log.info("postgres: schema at version %d", version)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # close() is polite (it waits for connections in use and says goodbye to the
            # server); against a hung server that could wait forever, so it gets a deadline.
            async with asyncio.timeout(self._connect_timeout):
                await pool.close()
        except TimeoutError:
            log.warning("postgres: pool did not close in time; connections terminated")
            pool.terminate()

    async def insert_many(self, comments: list[Comment]) -> list[Comment]:
        if not comments:
            return []
        columns = _columns(comments)
        rows: list[Any] = await self._run(lambda con: con.fetch(INSERT_SQL, *columns))
        if len(rows) == len(comments):
            return []
        # Replays (harmless), or ids another comment of the same post already has.
        keys = ([c.post_id for c in comments], [c.id for c in comments])
        stored: list[Any] = await self._run(lambda con: con.fetch(STORED_SQL, *keys))
        return different_from_stored(comments, [Comment(*row) for row in stored])

    async def delete_many(self, deletions: list[Deletion]) -> None:
        if not deletions:
            return
        columns = (
            [d.post_id for d in deletions],
            [d.target for d in deletions],
            [d.deleted_at for d in deletions],
            [d.by for d in deletions],
        )
        await self._run(lambda con: con.execute(DELETE_SQL, *columns))

    async def get(self, post_id: str, comment_id: int) -> tuple[Comment, bool] | None:
        row: Any = await self._run(lambda con: con.fetchrow(GET_SQL, post_id, comment_id))
        if row is None:
            return None
        return Comment(*list(row)[:-1]), bool(row[-1])

    async def deleted_among(self, post_id: str, ids: list[int]) -> set[int]:
        sql = "SELECT id FROM deletions WHERE post_id = $1 AND id = ANY($2::bigint[])"
        rows: list[Any] = await self._run(lambda con: con.fetch(sql, post_id, ids))
        return {int(r[0]) for r in rows}

    # -- instance-id leases (lease.LeaseStore), on the database's clock -----------------------

    async def read_leases(self) -> tuple[int, dict[int, int]]:
        sql = f"SELECT {NOW_MS} AS now, instance_id, expires_at FROM instance_leases"
        rows: list[Any] = await self._run(lambda con: con.fetch(sql))
        now = (
            rows[0]["now"]
            if rows
            else await self._run(lambda con: con.fetchval(f"SELECT {NOW_MS}"))
        )
        return int(now), {int(r["instance_id"]): int(r["expires_at"]) for r in rows}

    async def take_lease(self, instance_id: int, holder: str, ttl_ms: int) -> bool:
        taken = await self._run(
            lambda con: con.fetchval(TAKE_LEASE_SQL, instance_id, holder, ttl_ms)
        )
        return taken is not None

    async def release_lease(self, instance_id: int, holder: str) -> None:
        await self._run(
            lambda con: con.execute(
                "DELETE FROM instance_leases WHERE instance_id = $1 AND holder = $2",
                instance_id,
                holder,
            )
        )

    async def page(self, query: PageQuery) -> list[Comment]:
        sql, args = page_sql(query, COLUMNS, sql_param)
        rows: list[Any] = await self._run(lambda con: con.fetch(sql, *args))
        comments = [Comment(*row) for row in rows]
        if query.after is None:
            comments.reverse()
        return comments

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """`work(connection)` on a pooled connection; once more on a fresh one if it was stale."""
        try:
            async with self._connection() as con:
                return await work(con)
        except _STALE as e:
            log.info("postgres: pooled connection was closed (%s); retrying on a new one", e)
        async with self._connection() as con:
            return await work(con)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            raise RuntimeError("store is closed")
        async with pool.acquire(timeout=self._command_timeout) as con:
            yield con


def _server_settings(url: str) -> dict[str, str]:
    """Session settings sent at connect; being connection-time values, RESET ALL keeps them."""
    settings = {"application_name": "livecomments", "synchronous_commit": "on"}
    # asyncpg sends unknown URL parameters as settings too, and ours would override them.
    for name in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query):
        settings.pop(name, None)
    return settings


def _columns(comments: list[Comment]) -> tuple[list[Any], ...]:
    """The batch as one list per column, in `COLUMNS` order, for `unnest()`."""
    return (
        [c.id for c in comments],
        [c.post_id for c in comments],
        [c.uid for c in comments],
        [c.message for c in comments],
        [c.parent_id for c in comments],
        [c.reply_to for c in comments],
        [c.created_at for c in comments],
    )


async def migrate(con: Any) -> int:
    """Bring the schema to the latest version; return it. Safe to repeat and to race.

    A schema that is already current costs no DDL, so a role with only SELECT and INSERT on the
    tables can open the store once a role that may create them has migrated.
    """
    async with con.transaction():
        # Held to the end of this transaction: a racing migrator waits here, then sees our rows.
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        applied: set[int] = set()
        if await con.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            rows = await con.fetch("SELECT version FROM schema_migrations")
            applied = {int(row["version"]) for row in rows}
        newest = max(applied, default=0)
        if newest > len(MIGRATIONS):
            # A newer release migrated this database; it must stay readable by this one
            # (migrations only add), so this is worth a line in the log, not a refusal.
            log.warning(
                "postgres: schema is at version %d, this release knows %d", newest, len(MIGRATIONS)
            )
        pending = [v for v in range(1, len(MIGRATIONS) + 1) if v not in applied]
        if pending:
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version in pending:
            await con.execute(MIGRATIONS[version - 1])
            await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("postgres: applied migration %d", version)
        return max(newest, len(MIGRATIONS))
