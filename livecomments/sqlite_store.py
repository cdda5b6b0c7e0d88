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

from livecomments.comment import Comment
from livecomments.store import COLUMNS, PageQuery, page_sql

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
]


def sql_param(_: int) -> str:
    """SQLite's placeholder (positional)."""
    return "?"


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db` is relative to the working directory, `sqlite:////abs` absolute."""
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ValueError(f"expected sqlite:///path, got {url!r}")
    return url[len("sqlite:///") :]


class SQLiteStore:
    def __init__(self, url: str) -> None:
        self._path = sqlite_path(url)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

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

    async def insert_many(self, comments: list[Comment]) -> None:
        db = self._writer
        if db is None:
            raise RuntimeError("store is closed")
        rows = [
            (c.id, c.post_id, c.uid, c.message, c.parent_id, c.reply_to, c.created_at)
            for c in comments
        ]
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.executemany(
                f"INSERT OR IGNORE INTO comments ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

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
