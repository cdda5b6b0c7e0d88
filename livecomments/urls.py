"""What the URLs in the settings mean: one place that reads a store URL's scheme and path, and
one way to show any URL without its credentials (logs, /readyz, and the Redis ring's keys)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
REDIS_PREFIXES = ("redis://", "rediss://", "unix://")

StoreScheme = Literal["sqlite", "postgresql"]


def store_scheme(url: str) -> StoreScheme:
    """`sqlite` for `sqlite:///path` (relative) or `sqlite:////path` (absolute), `postgresql`
    for `postgresql://` or `postgres://`; ValueError for anything else."""
    if url.startswith(SQLITE_PREFIX) and url != SQLITE_PREFIX:
        return "sqlite"
    if url.startswith(POSTGRES_PREFIXES):
        return "postgresql"
    raise ValueError(f"expected sqlite:///path or postgresql://..., got {url!r}")


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///` URL: `sqlite:///rel/path.db` -> `rel/path.db`,
    `sqlite:////abs/path.db` -> `/abs/path.db` (config.py has made relative ones absolute)."""
    if store_scheme(url) != "sqlite":
        raise ValueError(f"expected sqlite:///path, got {url!r}")
    return url[len(SQLITE_PREFIX) :]


def redact_url(url: str) -> str:
    """The URL without user name or password: safe to log, and stable when a password changes
    (the Redis ring places servers by it)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
