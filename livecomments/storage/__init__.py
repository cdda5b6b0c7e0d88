"""Where a comment is kept: the durable log in front (log.py, on the write-ahead queue of
queue.py), the database behind it (sqlite.py or postgres.py, behind base.py's `CommentStore`),
and the instance-id leases kept in that database (lease.py)."""

from __future__ import annotations

from livecomments.storage.base import LeasingStore
from livecomments.urls import store_scheme


def open_store(url: str) -> LeasingStore:
    """The store for `url`: `sqlite:///path` or `postgresql://...` (urls.store_scheme)."""
    if store_scheme(url) == "sqlite":
        from livecomments.storage.sqlite import SQLiteStore  # noqa: PLC0415 (one backend per run)

        return SQLiteStore(url)
    from livecomments.storage.postgres import PostgresStore  # noqa: PLC0415

    return PostgresStore(url)
