"""One Redis server (a shard) as this node sees it: the streams it keeps and what it publishes.

A `RedisShard` talks to its server over the Pub/Sub session (pubsub.py: the posts followed
there, the reader, the liveness probe) and a bounded pool of command connections for the scripts
(streams.py): APPEND (the outbox's comments, pipelined), HISTORY and RECENT. Each is preceded,
in one pipeline, by sweep.py's DROP_STALE for a post that a ring change moved here, until that
change is swept (`stale_after`: the guard against continuing a position from the post's earlier
stay here). What the session hears is unpacked here (envelope.py) and handed to the hub in
stream order; a session that comes back after a loss reports its posts' gap, and tells whoever
asked (`on_reconnect`: the outbox re-checks what it had appended).

Words: a *shard* is one Redis server; a *node* is one livecomments process.

Its connections are made as client.py says (RESP2, our timeouts, no hidden retries).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.connection import ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from livecomments import metrics
from livecomments.config import HistorySettings, RedisSettings
from livecomments.live.broker import (
    Entry,
    History,
    Position,
    Publication,
    ReconnectCallback,
    StreamListener,
)
from livecomments.live.redis import envelope, streams, sweep
from livecomments.live.redis.client import close_fully, command_client, connection_kwargs
from livecomments.live.redis.pubsub import CHANNEL_PREFIX, PubSubSession, ShardUnavailable
from livecomments.urls import redact_url

log = logging.getLogger(__name__)

# APPENDs per pipelined round trip.
APPEND_BATCH = 512


class RedisShard:
    def __init__(
        self,
        url: str,
        settings: RedisSettings,
        history: HistorySettings,
        node_id: str,
        *,
        owns: Callable[[str], bool],
        stale_after: Callable[[str], int | None],
    ) -> None:
        self.url = url
        self.name = redact_url(url)
        self.settings = settings
        self._history = history
        self._listener: StreamListener | None = None
        self._on_reconnect: list[ReconnectCallback] = []
        self._pool = ConnectionPool.from_url(
            url, **connection_kwargs(f"livecomments:{node_id}:sub")
        )
        self._client = command_client(url, f"livecomments:{node_id}:cmd")
        self._append = self._client.register_script(streams.APPEND)
        self._read_history = self._client.register_script(streams.HISTORY)
        self._read_recent = self._client.register_script(streams.RECENT)
        self._drop_stale = self._client.register_script(sweep.DROP_STALE)
        self._stale_after = stale_after
        self.pubsub = PubSubSession(
            self.name,
            settings,
            node_id,
            self._pool,
            self._client,
            owns=owns,
            on_message=self._on_message,
            on_gap=self._on_gap,
        )
        self._task: asyncio.Task[None] | None = None
        self.appended = 0
        self.last_error: str | None = None

    def start(self, listener: StreamListener, on_reconnect: list[ReconnectCallback]) -> None:
        self._listener = listener
        self._on_reconnect = on_reconnect
        self._task = asyncio.create_task(
            self.pubsub.worker(listener), name=f"redis-pubsub-worker {self.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.pubsub.fail_waiters(ShardUnavailable(f"redis {self.name}: stopped"))
        # A reload cancelled at shutdown must not leave these sockets open (client.py).
        await close_fully(self._client.aclose)
        await close_fully(self._pool.aclose)

    def configure(self, settings: RedisSettings) -> None:
        """A reload: probe_interval and timeout apply from their next use."""
        self.settings = settings
        self.pubsub.settings = settings

    # -- what the session hears ----------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        post_id = channel[len(CHANNEL_PREFIX) :].decode()
        publication = envelope.unpack(post_id, data)
        if publication is None:
            metrics.REDIS_DISCARDED.inc()
            log.warning("redis %s: dropped a malformed message on %r", self.name, channel[:100])
            return
        metrics.REDIS_RECEIVED.inc()
        assert self._listener is not None
        try:
            self._listener.on_publication(publication)
        except Exception:
            # A bug downstream must not stop every other post's traffic: log it and go on.
            log.exception("redis %s: delivering to post %s failed", self.name, post_id)

    def _on_gap(self, post_ids: Iterable[str]) -> None:
        """The session is back (or a late subscribe came through): the hub checks these posts
        against their streams, and the outbox re-checks what it had appended here."""
        if self._listener is not None:
            self._listener.on_stream_gap(post_ids)
        for callback in self._on_reconnect:
            callback()

    # -- the streams ---------------------------------------------------------------------------

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        """APPEND each entry (pipelined); all None if the shard does not answer in time."""
        results: list[Position | None] = []
        for i in range(0, len(entries), APPEND_BATCH):
            batch = entries[i : i + APPEND_BATCH]
            try:
                results += await self._append_batch(batch)
            except (RedisError, OSError, TimeoutError) as e:
                self.last_error = f"append: {type(e).__name__}: {e}"
                return results + [None] * (len(entries) - len(results))
        return results

    async def _append_batch(self, batch: Sequence[Entry]) -> list[Position | None]:
        started = time.perf_counter()
        history = self._history
        async with asyncio.timeout(self.settings.timeout):
            async with self._client.pipeline(transaction=False) as pipe:
                at: list[int] = []  # where each APPEND's reply is: after its DROP_STALE, if any
                queued = 0
                for entry in batch:
                    queued += await self._guard(entry.post_id, pipe)
                    at.append(queued)
                    queued += 1
                    await self._append(
                        keys=streams.keys(entry.post_id),
                        args=[
                            CHANNEL_PREFIX + entry.post_id,
                            streams.padded(entry.comment_id),
                            entry.kind,
                            entry.body,
                            secrets.token_hex(envelope.EPOCH_LEN // 2),
                            history.size,
                            int(history.ttl * 1000),
                            int(history.meta_ttl * 1000),
                        ],
                        client=pipe,
                    )
                replies = await pipe.execute()
        if len(replies) > len(at):
            replies = [replies[j] for j in at]
        metrics.REDIS_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        self.appended += len(batch)
        metrics.REDIS_PUBLISHED.inc(len(batch))
        return [Position(epoch.decode(), int(offset)) for epoch, offset, _ in replies]

    async def _guard(self, post_id: str, pipe: Pipeline) -> bool:
        """Queue DROP_STALE for the post if a pending ring change moved it here."""
        max_age = self._stale_after(post_id)
        if max_age is not None:
            await self._drop_stale(keys=streams.keys(post_id), args=[max_age], client=pipe)
        return max_age is not None

    async def _guarded(
        self, post_id: str, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """`script`'s reply, after DROP_STALE if the post needs it (in one pipeline: a pipeline
        with scripts costs redis-py a SCRIPT EXISTS round trip, so only then)."""
        max_age = self._stale_after(post_id)
        if max_age is None:
            return await script(keys=keys, args=args)
        async with self._client.pipeline(transaction=False) as pipe:
            await self._drop_stale(keys=streams.keys(post_id), args=[max_age], client=pipe)
            await script(keys=keys, args=args, client=pipe)
            return (await pipe.execute())[-1]

    async def history(self, post_id: str, since: Position | None, limit: int) -> History:
        args = [
            -1 if since is None else since.offset,
            limit or self._history.size,
            secrets.token_hex(envelope.EPOCH_LEN // 2),
            int(self._history.meta_ttl * 1000),
        ]
        try:
            async with asyncio.timeout(self.settings.timeout):
                reply = await self._guarded(
                    post_id, self._read_history, streams.keys(post_id), args
                )
        except (RedisError, OSError, TimeoutError) as e:
            raise ShardUnavailable(f"redis {self.name}: history: {e}") from e
        epoch, offset, complete, entries = reply[0].decode(), int(reply[1]), reply[2], reply[3]
        position = Position(epoch, offset)
        if since is None or since.epoch != epoch:
            return History(position, complete=since is None)
        publications = [_publication(post_id, epoch, entry) for entry in entries]
        return History(position, publications, bool(complete))

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        low = "-" if after is None else "(" + streams.padded(after) + ";"
        high = "+" if before is None else "(" + streams.padded(before)
        newest = "0" if after is not None else "1"
        _, s, i, _ = streams.keys(post_id)
        try:
            async with asyncio.timeout(self.settings.timeout):
                bodies: list[bytes] = await self._guarded(
                    post_id, self._read_recent, [i, s], [low, high, limit, newest]
                )
        except (RedisError, OSError, TimeoutError) as e:
            raise ShardUnavailable(f"redis {self.name}: recent: {e}") from e
        return bodies

    async def taken_down(self, post_id: str) -> set[int]:
        x = streams.keys(post_id)[3]
        try:
            async with asyncio.timeout(self.settings.timeout):
                ids = await self._client.zrange(x, 0, -1)
        except (RedisError, OSError, TimeoutError) as e:
            raise ShardUnavailable(f"redis {self.name}: taken down: {e}") from e
        return {int(i) for i in ids if isinstance(i, bytes | str)}

    # -- status --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.pubsub.connected

    def status(self) -> dict[str, object]:
        probe_age = None
        if self.pubsub.last_probe_ok is not None:
            probe_age = round(time.monotonic() - self.pubsub.last_probe_ok, 3)
        return {
            "url": self.name,
            "state": self.pubsub.state,
            "connected": self.pubsub.connected,
            "channels": len(self.pubsub.post_channels()),
            "last_error": self.pubsub.last_error or self.last_error,
            "reconnects": self.pubsub.reconnects,
            "probe_failures": self.pubsub.probe_failures,
            "appended": self.appended,
            "last_probe_age": probe_age,
        }


def _publication(post_id: str, epoch: str, entry: list[Any]) -> Publication:
    """One XRANGE entry, `[b"<offset>-0", [b"k", kind, b"d", body]]`, as a publication."""
    entry_id, fields = entry
    offset = int(entry_id.split(b"-", 1)[0])
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return Publication(post_id, epoch, offset, values[b"k"], values[b"d"])
