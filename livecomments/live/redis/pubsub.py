"""One Pub/Sub session with one Redis server: what this instance hears from it.

* **One connection**, whatever the number of posts or sockets, subscribed to the channel of each
  post with local subscribers that maps to this server, plus this node's probe channel.
  `subscribe()` returns only once Redis confirmed the SUBSCRIBE, or raises `ShardUnavailable`:
  at once while the server is down (between reconnect attempts), after at most `timeout`
  seconds while it is connecting or does not confirm. Requests are batched: while one
  SUBSCRIBE/UNSUBSCRIBE round is in flight, the others only mark the wanted set; the next round
  sends the whole difference as one SUBSCRIBE and one UNSUBSCRIBE (`SUBSCRIBE_BATCH` channels
  per command).
* **A reader** parses every reply and hands each message to `on_message`, which never awaits: the
  reader never waits on a socket. An error in it is logged and the reader goes on.
* **A liveness probe** (probe.py): a connection that is open but deaf is found within
  `probe_interval` and re-established.
* **Recovery.** Any loss (EOF, error, probe failure, confirmation timeout) ends the session: the
  connection is dropped, pending `subscribe()` calls fail, and the worker reconnects with capped,
  jittered backoff. It resubscribes from the hub's own set of posts (`local_posts()`, filtered
  by the ring), not from its memory, and once Redis confirmed, reports the gap (`on_gap`) for
  those posts: Pub/Sub keeps nothing for absent subscribers; the streams' history does. The
  worker re-raises `CancelledError`, logs anything else with the server's name, and never ends.

redis-py choices, deliberate: the connection is a bare redis-py `Connection`, not `PubSub`: its
hidden reconnect-and-resubscribe would hide the gap that must be reported, and its SUBSCRIBE
does not wait for the confirmation. The read blocks with no socket timeout (a quiet channel is
not a dead one: the probe decides that).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError

from livecomments import metrics
from livecomments.backoff import Backoff
from livecomments.config import RedisSettings
from livecomments.live.broker import BrokerUnavailable, StreamListener
from livecomments.live.redis.channels import Channels
from livecomments.live.redis.probe import DeafConnection, Probe

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "livecomments:post:"
# Channels per SUBSCRIBE/UNSUBSCRIBE command (a resubscribe of 100k posts is ~200 commands).
SUBSCRIBE_BATCH = 512

SessionState = Literal["connecting", "up", "down"]


class ShardUnavailable(BrokerUnavailable):
    """The post's Redis server is not connected (or did not confirm in time)."""


def post_of(channel: str) -> str:
    return channel[len(CHANNEL_PREFIX) :]


class PubSubSession:
    """The Pub/Sub side of one Redis server (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: RedisSettings,
        node_id: str,
        pool: ConnectionPool,
        client: Redis,
        *,
        owns: Callable[[str], bool],
        on_message: Callable[[bytes, bytes], None],
        on_gap: Callable[[Iterable[str]], None],
    ) -> None:
        self.name = name
        self.settings = settings
        self._pool = pool
        self.probe = Probe(node_id, client, lambda: self.settings.probe_interval)
        self._owns = owns
        self._on_message = on_message
        self._on_gap = on_gap
        self._listener: StreamListener | None = None
        # Channel names, not post ids; the probe channel is among them.
        self._state: SessionState = "connecting"
        self._state_changed = asyncio.Event()
        self.channels = Channels()
        self._ever_up = False
        self.reconnects = 0
        self.probe_failures = 0
        self.last_error: str | None = None

    # -- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, post_id: str) -> None:
        """Follow `post_id` on this server; returns once Redis confirmed, raises otherwise."""
        channel = CHANNEL_PREFIX + post_id
        timeout = self.settings.timeout
        try:
            async with asyncio.timeout(timeout):
                while self._state != "up":
                    if self._state == "down":
                        self.channels.owe_late(channel)
                        raise ShardUnavailable(f"redis {self.name} is down: {self.last_error}")
                    changed = self._state_changed
                    await changed.wait()
                if self.channels.is_subscribed(channel):
                    self.channels.want(channel)  # already subscribed, and staying so
                    return
                waiter = self.channels.waiter(channel)
                try:
                    await waiter
                finally:
                    self.channels.forget_waiter(channel, waiter)
        except TimeoutError:
            self.channels.owe_late(channel)
            raise ShardUnavailable(
                f"redis {self.name}: SUBSCRIBE not confirmed within {timeout:g}s"
            ) from None

    def unsubscribe(self, post_id: str) -> None:
        """Stop following `post_id` here. Does not wait: the command worker sends it soon."""
        self.channels.unwant(CHANNEL_PREFIX + post_id)

    def prune(self) -> None:
        """After a ring change: unsubscribe the posts this server no longer carries."""
        wanted = self.channels.wanted
        self.channels.keep_only(
            {c for c in wanted if c == self.probe.channel or self._owns(post_of(c))}
        )

    def fail_waiters(self, error: Exception) -> None:
        self.channels.fail_waiters(error)

    def _set_state(self, state: SessionState) -> None:
        self._state = state
        metrics.REDIS_SHARD_UP.labels(self.name).set(state == "up")
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()

    # -- the session ---------------------------------------------------------------------------

    async def worker(self, listener: StreamListener) -> None:
        """Connect, follow, read; on any loss log, back off and start over. Never ends."""
        self._listener = listener
        backoff = Backoff()
        while True:
            try:
                await self._session(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Any loss, from EOF to a bug in this module: the session is gone, start over.
                self._lose(e, backoff)
            self._set_state("down")
            await asyncio.sleep(backoff.next())
            self._set_state("connecting")

    def _lose(self, error: Exception, backoff: Backoff) -> None:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        was_up = self._state == "up"
        self.last_error = message
        self._set_state("down")
        self.fail_waiters(ShardUnavailable(f"redis {self.name}: {message}"))
        if isinstance(error, DeafConnection):
            self.probe_failures += 1
            metrics.REDIS_PROBE_FAILURES.labels(self.name).inc()
        following = len(self.post_channels())
        self.channels.confirmed.clear()
        if not isinstance(error, RedisError | OSError | TimeoutError):
            log.error("redis %s: Pub/Sub session failed; restarting", self.name, exc_info=error)
        elif was_up:
            log.warning(
                "redis %s: Pub/Sub connection lost (%s); reconnecting, %d posts to check",
                self.name,
                message,
                following,
            )
        else:
            # While a server stays down, the first failed attempt says so; the rest are noise.
            level = logging.WARNING if backoff.attempt == 0 else logging.DEBUG
            log.log(level, "redis %s: cannot connect (%s); retrying", self.name, message)

    def _owned_local_posts(self) -> list[str]:
        """The posts the hub follows now that live on this server."""
        assert self._listener is not None
        return [p for p in self._listener.local_posts() if self._owns(p)]

    async def _session(self, backoff: Backoff) -> None:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self.settings.timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
            reader = asyncio.create_task(self._read_worker(conn), name=f"redis-read {self.name}")
            reader.add_done_callback(lambda _: self.channels.settled.set())
            tasks.append(reader)
            # Follow what local sockets watch now (the hub's set), not what we followed before.
            owned = self._owned_local_posts()
            self.channels.new_session({CHANNEL_PREFIX + p for p in owned} | {self.probe.channel})
            await self._sync(conn, reader)
            # Posts the hub kept while this session was connecting (their subscribe gave up
            # after we read local_posts() above): follow them in this session too.
            missed = {CHANNEL_PREFIX + p for p in self._owned_local_posts()}
            missed -= self.channels.wanted
            if missed:
                self.channels.wanted |= missed
                owned += [post_of(c) for c in missed]
                await self._sync(conn, reader)
            self._came_up(owned, backoff)
            tasks.append(
                asyncio.create_task(
                    self._command_worker(conn, reader), name=f"redis-commands {self.name}"
                )
            )
            tasks.append(asyncio.create_task(self.probe.worker(), name=f"redis-probe {self.name}"))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
            raise ConnectionError("Pub/Sub session ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await conn.disconnect(nowait=True)
            except (OSError, RedisError) as e:  # it is being dropped anyway
                log.debug("redis %s: disconnect: %s", self.name, e)

    def _came_up(self, owned: list[str], backoff: Backoff) -> None:
        """Confirmed: count the reconnect, and report the gap of every post restored."""
        self._set_state("up")
        backoff.reset()
        if self._ever_up:
            self.reconnects += 1
            metrics.REDIS_RECONNECTS.labels(self.name).inc()
        self._ever_up = True
        restored = [p for p in owned if CHANNEL_PREFIX + p in self.channels.confirmed]
        log.info("redis %s: Pub/Sub connected, following %d posts", self.name, len(restored))
        self.channels.late.clear()  # reported below with the rest
        # Whatever was published while we were away is lost to Pub/Sub: the hub fills it from
        # the streams' history (or, with a new epoch, tells its viewers to reload).
        self._on_gap(restored)

    async def _read_worker(self, conn: AbstractConnection) -> None:
        """Parse every reply; deliver messages without awaiting anything but the socket."""
        while True:
            reply = await conn.read_response(timeout=math.inf)
            if not isinstance(reply, list) or len(reply) < 3:
                raise ConnectionError(f"unexpected Pub/Sub reply {reply!r:.100}")
            kind = reply[0]
            if kind == b"message":
                if reply[1] == self.probe.channel_b:
                    self.probe.on_echo(reply[2])
                else:
                    self._on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                self._on_subscribed(reply[1].decode())
            elif kind == b"unsubscribe":
                self.channels.on_unsubscribed(reply[1].decode())
            else:
                log.warning("redis %s: ignored Pub/Sub reply %r", self.name, reply[:2])

    def _on_subscribed(self, channel: str) -> None:
        if self.channels.on_subscribed(channel) and self._state == "up":
            # Its local subscribers were answered before Redis confirmed: report the gap.
            self._on_gap([post_of(channel)])

    async def _command_worker(self, conn: AbstractConnection, reader: asyncio.Task[None]) -> None:
        """Turn changes of the wanted set into batched SUBSCRIBE/UNSUBSCRIBE rounds."""
        while True:
            await self.channels.dirty.wait()
            self.channels.dirty.clear()
            await self._sync(conn, reader)

    async def _sync(self, conn: AbstractConnection, reader: asyncio.Task[None]) -> None:
        """One round: send the difference between wanted and confirmed, wait for every reply."""
        to_sub, to_unsub = self.channels.start_round()
        count = len(to_sub) + len(to_unsub)
        if not count:
            return
        # Scaled so that a resubscribe of many posts after a reconnect has the time it needs.
        deadline = self.settings.timeout * (1 + count // 10_000)
        try:
            async with asyncio.timeout(deadline):
                for command, channels in (("UNSUBSCRIBE", to_unsub), ("SUBSCRIBE", to_sub)):
                    ordered = sorted(channels)
                    for i in range(0, len(ordered), SUBSCRIBE_BATCH):
                        await conn.send_command(command, *ordered[i : i + SUBSCRIBE_BATCH])
                while not self.channels.settled.is_set():
                    await self.channels.settled.wait()
        except TimeoutError:
            raise ShardUnavailable(
                f"{count} (UN)SUBSCRIBEs not confirmed in {deadline:g}s"
            ) from None
        if reader.done():
            error = reader.exception()
            raise error if error is not None else ConnectionError("Pub/Sub reader ended")

    # -- status --------------------------------------------------------------------------------

    @property
    def last_probe_ok(self) -> float | None:
        return self.probe.last_ok

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "up"

    def post_channels(self) -> set[str]:
        """Post channels Redis confirmed on the current session."""
        return {c for c in self.channels.confirmed if c != self.probe.channel}
