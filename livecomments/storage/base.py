"""What every comment database offers, and the SQL both of ours share.

`CommentStore` is the seam between the durable log (log.py) and a database: SQLite (sqlite.py)
or PostgreSQL (postgres.py), picked by `open_store` (storage/__init__.py) from the URL's scheme.
Holding the instance-id leases (lease.py) is a separate ability, `LeaseStore`; both of our stores
have it, hence `LeasingStore`.

Guarantees a store must keep (tests/contract/test_store_contract.py holds both to them):
* `insert_many` is one transaction and idempotent by comment id: a replay leaves a stored comment
  as it was, and an id stored with other content is reported, never dropped in silence.
* `page` walks the (post_id, id) index, never sorts, and returns at most `limit + 1` comments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.model.stream import Entry, Position


class StoreUnavailable(Exception):
    """The database did not answer; the caller should say so (503), not guess."""


@dataclass(frozen=True, slots=True)
class PageQuery:
    """One page of a post's comments. At most one of `before` / `after` is set.

    No cursor: the newest `limit`. `before`: the newest `limit` older than it.
    `after`: the oldest `limit` newer than it (catch-up). Pages are always ascending by id.
    """

    post_id: str
    limit: int
    before: int | None = None
    after: int | None = None


class CommentStore(Protocol):
    """A database of comments. Implementations: sqlite_store.SQLiteStore, postgres_store."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations (idempotent)."""

    async def close(self) -> None: ...

    async def insert_many(self, comments: list[Comment]) -> list[Comment]:
        """Store all of `comments` in one transaction; ids already stored are left as they are.

        Returns the comments whose id was already stored with other content (an id collision:
        two instances minted one id); a replay of the same comment is not one."""

    async def delete_many(self, deletions: list[Deletion]) -> None:
        """Record these deletions (tombstones), in one transaction, idempotently. A tombstone
        may come before its comment (another instance has not flushed it yet): the comment is
        then stored but never listed."""

    async def get(self, post_id: str, comment_id: int) -> tuple[Comment, bool] | None:
        """The comment and whether it is deleted; None if the database does not have it."""

    async def deleted_among(self, post_id: str, ids: list[int]) -> set[int]:
        """Which of these comment ids of the post have a tombstone."""

    async def page(self, query: PageQuery) -> list[Comment]:
        """Up to `query.limit + 1` comments of the page's window, ascending by id.

        The extra one tells the caller there is more; `window()` below picks the side.
        """


class LeaseStore(Protocol):
    """The store's lease table (both stores implement it)."""

    async def read_leases(self) -> tuple[int, dict[int, int]]:
        """The store's clock (Unix ms) and every lease row: instance id -> expiry (Unix ms)."""

    async def take_lease(self, instance_id: int, holder: str, ttl_ms: int) -> bool:
        """Atomically take or extend the lease on `instance_id` if it is free, lapsed or already
        `holder`'s; False if another holder's lease is live."""

    async def release_lease(self, instance_id: int, holder: str) -> None:
        """Drop the lease if it is still `holder`'s."""


class Streams(Protocol):
    """Where the outbox appends comments and GET finds recent ones: the live side's broker
    (live/broker.py), seen from storage. Failures are `ConnectionError`s."""

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        """Per entry its stream position, None if its shard cannot be reached now."""

    async def position(self, post_id: str) -> Position:
        """Where the post's stream is now."""

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        """Comment JSON the post's stream history holds: the oldest `limit` after `after`, or
        the newest `limit` (before `before`, if given)."""

    async def taken_down(self, post_id: str) -> set[int]:
        """Ids of the post's comments whose deletion the stream history holds."""


class LeasingStore(CommentStore, LeaseStore, Protocol):
    """A store that also holds the instance-id leases (both backends are)."""


def window(comments: list[Comment], query: PageQuery) -> tuple[list[Comment], bool]:
    """Cut ascending `comments` (already filtered by the cursor) to the page, and say if more."""
    has_more = len(comments) > query.limit
    if not has_more:
        return comments, False
    if query.after is not None:
        return comments[: query.limit], True
    return comments[-query.limit :], True


def different_from_stored(batch: list[Comment], stored: list[Comment]) -> list[Comment]:
    """The comments of `batch` whose id is stored with other content (collisions)."""
    by_id = {c.id: c for c in stored}
    return [c for c in batch if c.id in by_id and by_id[c.id] != c]


# The comments table's columns, in the order of Comment's fields (both backends).
COLUMNS = "id, post_id, uid, message, parent_id, reply_to, created_at"


def page_sql(
    query: PageQuery, columns: str, param: Callable[[int], str]
) -> tuple[str, tuple[object, ...]]:
    """The page's window as SQL, walked along the (post_id, id) index: no sort step.

    `param(n)` spells the n-th placeholder in the backend's dialect (`?` or `$n`).
    Ascending for `after`, descending otherwise: the caller reverses those."""
    select = (
        f"SELECT {columns} FROM comments c WHERE post_id = {param(1)} AND NOT EXISTS "
        "(SELECT 1 FROM deletions d WHERE d.post_id = c.post_id AND d.id = c.id)"
    )
    n = query.limit + 1
    if query.after is not None:
        sql = f"{select} AND id > {param(2)} ORDER BY id ASC LIMIT {param(3)}"
        return sql, (query.post_id, query.after, n)
    if query.before is not None:
        sql = f"{select} AND id < {param(2)} ORDER BY id DESC LIMIT {param(3)}"
        return sql, (query.post_id, query.before, n)
    return f"{select} ORDER BY id DESC LIMIT {param(2)}", (query.post_id, n)
