"""The embedded default store: one SQLite file, WAL mode, a writer and a reader connection.

`synchronous=FULL` because the flusher deletes a comment from the write-ahead queue as soon as
this store has committed it: a commit that a power cut could undo would lose it.
Schema versions are tracked with `PRAGMA user_version`; each migration runs in its own
transaction, so running them twice or from two processes at once is safe.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiosqlite

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.model.ids import wall_clock_ms
from livecomments.storage.base import COLUMNS, PageQuery, different_from_stored, page_sql
from livecomments.urls import sqlite_path

# Seconds to wait for another connection that holds the file's locks.
BUSY_TIMEOUT = 5.0

# Append only: each entry moves the schema from version N to N+1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS comments (
        id INTEGER PRIMARY KEY,
        post_id TEXT NOT NULL,
        uid TEXT NOT NULL,
        message TEXT NOT NULL,
        parent_id TEXT,
        reply_to TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS comments_post_id_id ON comments (post_id, id);
    """,
    """
    CREATE TABLE IF NOT EXISTS instance_leases (
        instance_id INTEGER PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS deletions (
        post_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        deleted_at INTEGER NOT NULL,
        deleted_by TEXT NOT NULL,
        PRIMARY KEY (post_id, id)
    ) WITHOUT ROWID;
    """,
]

# Take a lease that is free, lapsed (expires_at before ?4) or already ours; leave it otherwise.
TAKE_LEASE_SQL = """
    INSERT INTO instance_leases (instance_id, holder, expires_at) VALUES (?1, ?2, ?3)
    ON CONFLICT (instance_id) DO UPDATE
    SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE instance_leases.expires_at < ?4 OR instance_leases.holder = excluded.holder
"""
# Ids per SELECT ... IN (...) when comparing a batch with what is stored (SQLite's limit is 32766).
IN_CHUNK = 500


def sql_param(_: int) -> str:
    """SQLite's placeholder (positional)."""
    return "?"


class SQLiteStore:
    def __init__(self, url: str) -> None:
        self._path = sqlite_path(url)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # The writer connection is shared by the flusher and the instance lease: one write
        # transaction at a time, or a lease statement would land inside a batch's transaction.
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await migrate(self._writer)
            self._reader = await self._connect()
        except BaseException:
            await self.close()  # an open connection's thread would keep the process alive
            raise

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            await _use_wal(db)
            await db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None

    async def insert_many(self, comments: list[Comment]) -> list[Comment]:
        db = self._writer
        if db is None:
            raise RuntimeError("store is closed")
        rows = [
            (c.id, c.post_id, c.uid, c.message, c.parent_id, c.reply_to, c.created_at)
            for c in comments
        ]
        async with self._write_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                cursor = await db.executemany(
                    f"INSERT OR IGNORE INTO comments ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                # Fewer rows than comments: replays (harmless) or ids another comment has.
                collisions = []
                if cursor.rowcount < len(rows):
                    collisions = different_from_stored(comments, await self._stored(db, comments))
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return collisions

    async def delete_many(self, deletions: list[Deletion]) -> None:
        db = self._writer
        if db is None:
            raise RuntimeError("store is closed")
        rows = [(d.post_id, d.target, d.deleted_at, d.by) for d in deletions]
        async with self._write_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(
                    "INSERT OR IGNORE INTO deletions (post_id, id, deleted_at, deleted_by)"
                    " VALUES (?, ?, ?, ?)",
                    rows,
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    async def get(self, post_id: str, comment_id: int) -> tuple[Comment, bool] | None:
        db = self._reader
        if db is None:
            raise RuntimeError("store is closed")
        sql = (
            f"SELECT {COLUMNS}, EXISTS (SELECT 1 FROM deletions d WHERE d.post_id = c.post_id"
            " AND d.id = c.id) FROM comments c WHERE post_id = ? AND id = ?"
        )
        async with db.execute(sql, (post_id, comment_id)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return Comment(*row[:-1]), bool(row[-1])

    async def deleted_among(self, post_id: str, ids: list[int]) -> set[int]:
        db = self._reader
        if db is None:
            raise RuntimeError("store is closed")
        found: set[int] = set()
        for i in range(0, len(ids), IN_CHUNK):
            chunk = ids[i : i + IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT id FROM deletions WHERE post_id = ? AND id IN ({marks})"
            async with db.execute(sql, (post_id, *chunk)) as cursor:
                found.update(int(row[0]) for row in await cursor.fetchall())
        return found

    @staticmethod
    async def _stored(db: aiosqlite.Connection, comments: list[Comment]) -> list[Comment]:
        ids = [c.id for c in comments]
        stored: list[Comment] = []
        for i in range(0, len(ids), IN_CHUNK):
            chunk = ids[i : i + IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT {COLUMNS} FROM comments WHERE id IN ({marks})"
            async with db.execute(sql, chunk) as cursor:
                stored.extend(Comment(*row) for row in await cursor.fetchall())
        return stored

    # -- instance-id leases (lease.LeaseStore): instances on one host share this file ----------

    async def read_leases(self) -> tuple[int, dict[int, int]]:
        db = self._reader
        if db is None:
            raise RuntimeError("store is closed")
        async with db.execute("SELECT instance_id, expires_at FROM instance_leases") as cursor:
            rows = await cursor.fetchall()
        return wall_clock_ms(), {int(r[0]): int(r[1]) for r in rows}

    async def take_lease(self, instance_id: int, holder: str, ttl_ms: int) -> bool:
        db = self._writer
        if db is None:
            raise RuntimeError("store is closed")
        now = wall_clock_ms()  # one host, one clock: every instance sharing this file
        async with self._write_lock:
            cursor = await db.execute(TAKE_LEASE_SQL, (instance_id, holder, now + ttl_ms, now))
            return cursor.rowcount == 1

    async def release_lease(self, instance_id: int, holder: str) -> None:
        db = self._writer
        if db is None:
            return
        async with self._write_lock:
            await db.execute(
                "DELETE FROM instance_leases WHERE instance_id = ? AND holder = ?",
                (instance_id, holder),
            )

    async def page(self, query: PageQuery) -> list[Comment]:
        db = self._reader
        if db is None:
            raise RuntimeError("store is closed")
        sql, args = page_sql(query, COLUMNS, sql_param)
        async with db.execute(sql, args) as cursor:
            rows = await cursor.fetchall()
        comments = [Comment(*row) for row in rows]
        if query.after is None:
            comments.reverse()
        return comments


async def _use_wal(db: aiosqlite.Connection) -> None:
    """Switch the file to WAL. A new file's switch takes an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy wait, to a second connection switching the
    same file at that moment (two instances starting together): retry until BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.01)


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the schema to the latest version; return it. Safe to repeat and to race."""
    for version, script in enumerate(MIGRATIONS, start=1):
        await db.execute("BEGIN IMMEDIATE")  # takes the write lock: a racing migrator waits
        try:
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            if row is not None and row[0] >= version:
                await db.execute("ROLLBACK")
                continue
            for statement in filter(str.strip, script.split(";")):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {version}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
