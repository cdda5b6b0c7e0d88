"""How this node opens and closes its Redis clients: the same choices on every connection.

redis-py choices, deliberate: `protocol=2` (RESP2) on every connection: Pub/Sub replies are plain
arrays, and redis-py's RESP3 push path builds a debug log string for every message.
`socket_timeout` and `socket_connect_timeout` are None (redis-py 8 defaults to 5 s): the Pub/Sub
read must block indefinitely on a quiet channel (the probe, not a socket timeout, decides it is
dead), and every other operation is bounded by our own `asyncio.timeout(redis.timeout)`, which a
reload changes at once. Retries are off (`Retry(NoBackoff(), 0)`): a retry we do not see would
hide a failure the outbox must see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Command connections per shard, at most: appends, history reads and every concurrent GET's
# window share them (a burst of GETs waits for one, within `redis.timeout`, instead of opening a
# socket each: Redis's maxclients is shared by every instance).
COMMAND_CONNECTIONS = 64


def command_client(url: str, name: str) -> Redis:
    """A shard's command client: a bounded, blocking pool (its waits are bounded by our own
    timeouts around every operation). Its `aclose()` closes the pool too."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=COMMAND_CONNECTIONS, timeout=None, **connection_kwargs(name)
    )
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def connection_kwargs(name: str) -> dict[str, Any]:
    """See the module docstring: RESP2, no socket timeouts (ours apply), no hidden retries."""
    return {
        "protocol": 2,
        "socket_timeout": None,
        "socket_connect_timeout": None,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": name,
    }


async def close_fully(close: Callable[[], Awaitable[object]]) -> None:
    """Run `close` (a client's or a pool's `aclose`) to its end even if this task is cancelled
    meanwhile (then re-raise).

    A cancel that lands while redis-py closes its pool stops it before it closed the sockets,
    and they stay open until the garbage collector finds them: seen when a ring change cancelled
    a sweep that was closing its connection after an error or its timeout."""
    closing = asyncio.ensure_future(close())
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            if closing.cancelled():
                raise
            cancelled = True
        except Exception:
            break  # the close's own error: nothing more it can close
    if cancelled:
        raise asyncio.CancelledError
