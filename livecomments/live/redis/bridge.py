"""The Redis bridge: live traffic between instances over Redis Pub/Sub, sharded by ring.py.

Each post's channel lives on one Redis server, `Ring(redis.urls).node_for(post_id)`; every
instance computes the same answer. Per server this instance keeps one `RedisNode`, which owns:

* **One Pub/Sub connection**, whatever the number of posts or sockets. It is subscribed to the
  channel of each post that has local subscribers and maps to this server, plus this instance's
  probe channel. `subscribe()` returns only once Redis confirmed the SUBSCRIBE, or raises
  `NodeUnavailable`: at once while the server is down (between reconnect attempts), after at
  most `timeout` seconds while it is connecting or does not confirm.
  Requests are batched: while one SUBSCRIBE/UNSUBSCRIBE round is in flight, the others only mark
  the wanted set; the next round sends the whole difference as one SUBSCRIBE and one UNSUBSCRIBE
  (at most `SUBSCRIBE_BATCH` channels per command).
* **A reader** that parses every reply and calls `HubListener.deliver`, which never awaits: the
  reader never waits on a socket. An error in the listener is logged and the reader goes on.
* **A liveness probe.** Every `probe_interval / 2` seconds it PUBLISHes a sequence number on
  `livecomments:probe:<node id>` (which only this Pub/Sub connection listens to) and requires it
  back within `probe_interval / 2`. A connection that is open but deaf (a stalled proxy, a paused
  or stopped server, a server that forgot us: PUBLISH answers 0 receivers) is therefore found
  within `probe_interval` and re-established.
* **Recovery.** Any loss (EOF, error, probe failure, confirmation timeout) ends the session: the
  connection is dropped, pending `subscribe()` calls fail, and the node reconnects with capped,
  jittered exponential backoff (`BACKOFF_BASE` doubling up to `BACKOFF_CAP`). It resubscribes
  from the hub's own set of posts (`listener.local_posts()`, filtered by the ring), not from its
  memory, and once Redis confirmed, calls `listener.resync()` for those posts: Pub/Sub keeps
  nothing for absent subscribers, so their clients refetch with `GET ...&after=`. The session
  loop re-raises `CancelledError`, logs anything else with the server's name, and never ends.
* **A publisher.** `publish()` never awaits and never raises: it appends to the node's bounded
  buffer (`publish_buffer`; when full the oldest event is dropped and counted). A worker drains
  it on a separate, ordinary connection, pipelining up to `PUBLISH_BATCH` PUBLISHes per round
  trip. A failed batch is retried (backoff) for at most `publish_retry` seconds, then dropped,
  counted and logged. A dropped event is not lost in silence: once the server takes publishes
  again, the node sends a LOST notice per affected post (at most `publish_buffer` posts
  remembered), and the other instances resync that post's subscribers.

Envelope. A message on a post channel is `b"1" + node_id + seq + kind + payload`: a version
byte, this bridge's random node id (16 hex digits, new at every start), a per-bridge sequence
number (16 hex digits), `b"|"` and the hub's encoded event, delivered as is (encode once), or
`b"!"` and nothing (a LOST notice). A bridge drops its own echo by node id, and drops a
(node id, seq) no newer than the last it saw from that origin on that server: a retried batch
whose first attempt reached Redis after all does not deliver twice. (One worker publishes to a
server in order, so each origin's sequence only grows on each server.)

Channels: `livecomments:post:<post_id>` and `livecomments:probe:<node_id>`.

Ring changes (`reconfigure`, on SIGHUP): the posts whose server changed are subscribed on their
new server, then their subscribers get `resync`. Instances do not reload at the same instant, so
for `RING_CHANGE_GRACE` seconds a moved post stays subscribed on its old server too (publishes go
to the new server only; each publish reaches one server, so nothing is received twice): an
instance still on the old list keeps reaching us, and one that reloads after us resyncs its own
subscribers when it does. Servers removed from the list keep running until the grace ends.

redis-py choices, deliberate: `protocol=2` (RESP2) on every connection. Pub/Sub replies are then
plain arrays; we need nothing from RESP3 (client-side caching, pushes on a shared connection),
and redis-py's RESP3 push path builds a debug log string for every message. `socket_timeout` and
`socket_connect_timeout` are None (redis-py 8 defaults to 5 s): the Pub/Sub read must block
indefinitely on a quiet channel (the probe, not a socket timeout, decides it is dead), and every
other operation is bounded by our own `asyncio.timeout(redis.timeout)`, which a reload changes at
once. Retries are off (`Retry(NoBackoff(), 0)`) and the Pub/Sub connection is a bare redis-py
`Connection`, not `PubSub`: its hidden reconnect-and-resubscribe would hide the gap that the
resync exists to cover, and its SUBSCRIBE does not wait for the confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from livecomments.config import RedisSettings
from livecomments.live.bridge import BridgeUnavailable, HubListener
from livecomments.live.redis.ring import Ring, node_key
from livecomments.metrics import Metrics
from livecomments.model.ids import wall_clock_ms

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "livecomments:post:"
PROBE_PREFIX = "livecomments:probe:"
ENVELOPE_VERSION = b"1"
EVENT = b"|"  # the header's last byte: an event follows
LOST = b"!"  # ... or none: events of this post were dropped, resync its subscribers
_ID_LEN = 16  # hex digits of the node id and of the sequence number
_HEADER_LEN = 1 + _ID_LEN + _ID_LEN + 1

# Channels per SUBSCRIBE/UNSUBSCRIBE command (a resubscribe of 100k posts is ~200 commands).
SUBSCRIBE_BATCH = 512
# PUBLISHes per pipelined round trip.
PUBLISH_BATCH = 512
# Reconnect and publish-retry backoff: full jitter over BASE * 2**attempt, capped, seconds.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 5.0
# Seconds a moved post stays subscribed on its old server after a ring change.
RING_CHANGE_GRACE = 60.0
# Origins whose last sequence number we remember per server (one per instance start).
MAX_ORIGINS = 4096

NodeState = Literal["connecting", "up", "down"]


class NodeUnavailable(BridgeUnavailable):
    """The post's Redis server is not connected (or did not confirm in time)."""


class DeafConnection(ConnectionError):
    """The Pub/Sub connection did not echo a liveness probe in time."""


class Backoff:
    """Capped exponential backoff, jittered: uniform(c / 2, c), c = min(cap, base * 2**attempt)."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def pack_envelope(origin: bytes, seq: int, payload: bytes) -> bytes:
    return ENVELOPE_VERSION + origin + b"%016x" % seq + EVENT + payload


def pack_lost_notice(origin: bytes, seq: int, since_ms: int) -> bytes:
    """`since_ms`: when the oldest dropped event of this post was published (Unix ms)."""
    return ENVELOPE_VERSION + origin + b"%016x" % seq + LOST + b"%d" % since_ms


def _connection_kwargs(name: str) -> dict[str, Any]:
    """See the module docstring: RESP2, no socket timeouts (ours apply), no hidden retries."""
    return {
        "protocol": 2,
        "socket_timeout": None,
        "socket_connect_timeout": None,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": name,
    }


class RedisNode:
    """One Redis server as this instance sees it: its Pub/Sub session and its publisher."""

    def __init__(
        self,
        url: str,
        settings: RedisSettings,
        metrics: Metrics,
        node_id: bytes,
        *,
        owns: Callable[[str], bool],
        next_seq: Callable[[], int],
    ) -> None:
        self.url = url
        self.name = node_key(url)
        self.settings = settings
        self._metrics = metrics
        self._node_id = node_id
        self._owns = owns
        self._next_seq = next_seq
        self._listener: HubListener | None = None
        self._probe_channel = PROBE_PREFIX + node_id.decode()
        self._probe_channel_b = self._probe_channel.encode()
        self._sub_pool = ConnectionPool.from_url(
            url, **_connection_kwargs(f"livecomments:{node_id.decode()}:sub")
        )
        self._client = Redis.from_url(
            url, **_connection_kwargs(f"livecomments:{node_id.decode()}:pub")
        )
        self._tasks: list[asyncio.Task[None]] = []
        # -- the Pub/Sub session. Channel names, not post ids; the probe channel is among them.
        self._state: NodeState = "connecting"
        self._state_changed = asyncio.Event()
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()  # Redis confirmed SUBSCRIBE, no UNSUBSCRIBE since
        self._pending_sub: set[str] = set()  # sent, not yet confirmed
        self._pending_unsub: set[str] = set()
        self._settled = asyncio.Event()  # nothing pending, or the reader ended
        self._dirty = asyncio.Event()  # wanted changed: the command worker has work
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._probe_seen = 0
        self._probe_sent = 0
        self._probe_echo = asyncio.Event()
        self._last_seq: dict[bytes, int] = {}
        self._ever_up = False
        # -- publishing
        # (channel, envelope, when it was published: Unix ms, for the LOST notice's `since`)
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        # channel -> oldest dropped event's publish time, for posts that still need a LOST notice
        self._lost: dict[str, int] = {}
        self._outbox_ready = asyncio.Event()
        self._in_flight: list[tuple[str, bytes, int]] = []  # the batch being published
        self._idle = asyncio.Event()
        self._idle.set()
        # -- for status()
        self.reconnects = 0
        self.last_error: str | None = None
        self.dropped = 0
        self.lost_notices_dropped = 0
        self.published = 0
        self.last_probe_ok: float | None = None
        # Wall clock of the last proof that this connection received everything (a probe echo,
        # or the session coming up): a resync after a loss covers comments since then. Before
        # the first session: since the node was created (set by the bridge; a node added by a
        # ring change starts further back, see RedisBridge._move_to).
        self.last_alive_ms: int | None = None
        self.created_ms = wall_clock_ms()
        # Channels whose subscribe() gave up (NodeUnavailable) while the hub kept the post: the
        # node keeps them wanted and, when Redis confirms them, resyncs from the time asked.
        self._late: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, listener: HubListener) -> None:
        self._listener = listener
        self._tasks = [
            asyncio.create_task(self.pubsub_worker(), name=f"redis-pubsub-worker {self.name}"),
            asyncio.create_task(self.publish_worker(), name=f"redis-publish-worker {self.name}"),
        ]

    async def stop(self, drain: float) -> None:
        """Give queued publishes up to `drain` seconds, then end every task and connection."""
        if self._outbox and self._tasks:
            try:
                async with asyncio.timeout(drain):
                    while self._outbox or not self._idle.is_set():
                        await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "redis %s: stopping with %d events unpublished", self.name, len(self._outbox)
                )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_waiters(NodeUnavailable(f"redis {self.name}: bridge stopped"))
        await self._client.aclose()
        await self._sub_pool.aclose()

    def configure(self, settings: RedisSettings) -> None:
        """A reload: probe_interval, publish_retry and timeout apply from their next use."""
        self.settings = settings
        while len(self._outbox) > settings.publish_buffer:
            self._drop_oldest()

    # -- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, post_id: str) -> None:
        """Follow `post_id` on this server; returns once Redis confirmed, raises otherwise."""
        channel = CHANNEL_PREFIX + post_id
        timeout = self.settings.timeout
        asked_ms = wall_clock_ms()
        try:
            async with asyncio.timeout(timeout):
                while self._state != "up":
                    if self._state == "down":
                        self._owe_late(channel, asked_ms)
                        raise NodeUnavailable(f"redis {self.name} is down: {self.last_error}")
                    changed = self._state_changed
                    await changed.wait()
                if channel in self._confirmed and channel not in self._pending_unsub:
                    self._wanted.add(channel)  # already subscribed, and staying so
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(channel, []).append(waiter)
                self._wanted.add(channel)
                self._dirty.set()
                try:
                    await waiter
                finally:
                    self._forget_waiter(channel, waiter)
        except TimeoutError:
            self._owe_late(channel, asked_ms)
            raise NodeUnavailable(
                f"redis {self.name}: SUBSCRIBE not confirmed within {timeout:g}s"
            ) from None

    def _owe_late(self, channel: str, asked_ms: int) -> None:
        """subscribe() is giving up, and the hub keeps the post (BridgeUnavailable): keep the
        channel wanted, so this session or the next follows it, and resync it once confirmed."""
        self._late[channel] = min(self._late.get(channel, asked_ms), asked_ms)
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._dirty.set()

    def unsubscribe(self, post_id: str) -> None:
        """Stop following `post_id` here. Does not wait: the command worker sends it soon."""
        channel = CHANNEL_PREFIX + post_id
        self._late.pop(channel, None)
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._dirty.set()

    def prune(self) -> None:
        """After a ring change: unsubscribe the posts this server no longer carries."""
        keep = {c for c in self._wanted if c == self._probe_channel or self._owns(_post_of(c))}
        if keep != self._wanted:
            self._wanted = keep
            self._dirty.set()

    def _forget_waiter(self, channel: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(channel)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[channel]

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
                    # Whoever awaited it sees the error; don't let asyncio call it unretrieved.
                    future.exception()

    def _set_state(self, state: NodeState) -> None:
        self._state = state
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()

    # -- the Pub/Sub session -------------------------------------------------------------------

    async def pubsub_worker(self) -> None:
        """Connect, follow, read; on any loss log, back off and start over. Never ends."""
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
        self._fail_waiters(NodeUnavailable(f"redis {self.name}: {message}"))
        if isinstance(error, DeafConnection):
            self._metrics.inc("redis_probe_failures_total")
        following = len(self.channels())
        self._confirmed.clear()
        if not isinstance(error, RedisError | OSError | TimeoutError):
            log.error("redis %s: Pub/Sub session failed; restarting", self.name, exc_info=error)
        elif was_up:
            log.warning(
                "redis %s: Pub/Sub connection lost (%s); reconnecting, %d posts will resync",
                self.name,
                message,
                following,
            )
        else:
            # While a server stays down, the first failed attempt says so; the rest are noise.
            level = logging.WARNING if backoff.attempt == 0 else logging.DEBUG
            log.log(level, "redis %s: cannot connect (%s); retrying", self.name, message)

    async def _session(self, backoff: Backoff) -> None:
        assert self._listener is not None
        conn: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
        tasks: list[asyncio.Task[None]] = []
        self._confirmed.clear()
        self._pending_sub.clear()
        self._pending_unsub.clear()
        try:
            async with asyncio.timeout(self.settings.timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
            reader = asyncio.create_task(self._read_worker(conn), name=f"redis-read {self.name}")
            reader.add_done_callback(lambda _: self._settled.set())
            tasks.append(reader)
            # Follow what local sockets watch now (the hub's set), not what we followed before.
            owned = [p for p in self._listener.local_posts() if self._owns(p)]
            self._wanted = {CHANNEL_PREFIX + p for p in owned}
            self._wanted.add(self._probe_channel)
            self._dirty.clear()
            await self._sync(conn, reader)
            # Posts the hub kept while this session was connecting (their subscribe gave up
            # after we read local_posts() above): follow them in this session too.
            missed = {CHANNEL_PREFIX + p for p in self._listener.local_posts() if self._owns(p)}
            missed -= self._wanted
            if missed:
                self._wanted |= missed
                owned += [_post_of(c) for c in missed]
                await self._sync(conn, reader)
            self._set_state("up")
            backoff.reset()
            if self._ever_up:
                self.reconnects += 1
                self._metrics.inc("redis_reconnects_total")
            self._ever_up = True
            restored = [p for p in owned if CHANNEL_PREFIX + p in self._confirmed]
            log.info("redis %s: Pub/Sub connected, following %d posts", self.name, len(restored))
            since_ms = min([self.last_alive_ms or self.created_ms, *self._late.values()])
            self._late.clear()  # resynced below with the rest
            self.last_alive_ms = wall_clock_ms()
            if restored:
                # Published while we were away means lost: tell those clients to refetch.
                self._listener.resync(restored, since_ms)
            tasks.append(
                asyncio.create_task(
                    self._command_worker(conn, reader), name=f"redis-commands {self.name}"
                )
            )
            tasks.append(asyncio.create_task(self._probe_worker(), name=f"redis-probe {self.name}"))
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
            with contextlib.suppress(OSError, RedisError):
                await conn.disconnect(nowait=True)

    async def _read_worker(self, conn: AbstractConnection) -> None:
        """Parse every reply; deliver messages without awaiting anything but the socket."""
        while True:
            reply = await conn.read_response(timeout=math.inf)
            if not isinstance(reply, list) or len(reply) < 3:
                raise ConnectionError(f"unexpected Pub/Sub reply {reply!r:.100}")
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                self._on_subscribed(reply[1].decode())
            elif kind == b"unsubscribe":
                channel = reply[1].decode()
                self._pending_unsub.discard(channel)
                self._confirmed.discard(channel)
                self._check_settled()
            else:
                log.warning("redis %s: ignored Pub/Sub reply %r", self.name, reply[:2])

    def _on_subscribed(self, channel: str) -> None:
        self._pending_sub.discard(channel)
        self._confirmed.add(channel)
        asked_ms = self._late.pop(channel, None)
        if asked_ms is not None and self._listener is not None and self._state == "up":
            # Its local subscribers were told "subscribed" before Redis was: refetch the gap.
            self._listener.resync([_post_of(channel)], asked_ms)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)
        self._check_settled()

    def _check_settled(self) -> None:
        if not self._pending_sub and not self._pending_unsub:
            self._settled.set()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._probe_channel_b:
            self._on_probe(data)
            return
        kind = data[_HEADER_LEN - 1 : _HEADER_LEN]
        if len(data) < _HEADER_LEN or data[:1] != ENVELOPE_VERSION or kind not in (EVENT, LOST):
            self._metrics.inc("redis_discarded_total")
            log.warning("redis %s: dropped a malformed message on %r", self.name, channel[:100])
            return
        origin = data[1 : 1 + _ID_LEN]
        if origin == self._node_id:
            return  # our own publish: the hub delivered it locally already
        try:
            seq = int(data[1 + _ID_LEN : 33], 16)
        except ValueError:
            self._metrics.inc("redis_discarded_total")
            return
        last = self._last_seq.pop(origin, None)
        if last is not None and seq <= last:
            # A retried batch: its first attempt reached Redis after all.
            self._last_seq[origin] = last
            self._metrics.inc("redis_discarded_total")
            return
        self._last_seq[origin] = seq
        if len(self._last_seq) > MAX_ORIGINS:
            del self._last_seq[next(iter(self._last_seq))]
        post_id = channel[len(CHANNEL_PREFIX) :].decode()
        assert self._listener is not None
        try:
            if kind == LOST:
                since = data[_HEADER_LEN:]
                self._listener.resync([post_id], int(since) if since.isdigit() else 0)
            else:
                self._metrics.inc("redis_received_total")
                self._listener.deliver(post_id, data[_HEADER_LEN:])
        except Exception:
            # A bug downstream must not stop every other post's traffic: log it and go on.
            log.exception("redis %s: delivering to post %s failed", self.name, post_id)

    async def _command_worker(self, conn: AbstractConnection, reader: asyncio.Task[None]) -> None:
        """Turn changes of the wanted set into batched SUBSCRIBE/UNSUBSCRIBE rounds."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._sync(conn, reader)

    async def _sync(self, conn: AbstractConnection, reader: asyncio.Task[None]) -> None:
        """One round: send the difference between wanted and confirmed, wait for every reply."""
        to_sub = self._wanted - self._confirmed
        to_unsub = self._confirmed - self._wanted
        if not to_sub and not to_unsub:
            return
        self._pending_sub |= to_sub
        self._pending_unsub |= to_unsub
        self._settled.clear()
        count = len(to_sub) + len(to_unsub)
        # Scaled so that a resubscribe of many posts after a reconnect has the time it needs.
        deadline = self.settings.timeout * (1 + count // 10_000)
        try:
            async with asyncio.timeout(deadline):
                for command, channels in (("UNSUBSCRIBE", to_unsub), ("SUBSCRIBE", to_sub)):
                    ordered = sorted(channels)
                    for i in range(0, len(ordered), SUBSCRIBE_BATCH):
                        await conn.send_command(command, *ordered[i : i + SUBSCRIBE_BATCH])
                while not self._settled.is_set():
                    await self._settled.wait()
        except TimeoutError:
            raise NodeUnavailable(
                f"{count} (UN)SUBSCRIBEs not confirmed in {deadline:g}s"
            ) from None
        if reader.done():
            error = reader.exception()
            raise error if error is not None else ConnectionError("Pub/Sub reader ended")

    async def _probe_worker(self) -> None:
        """Prove the Pub/Sub connection still hears: our own PUBLISH must come back in time."""
        while True:
            budget = self.settings.probe_interval / 2
            await asyncio.sleep(budget)
            self._probe_sent += 1
            seq = self._probe_sent
            try:
                async with asyncio.timeout(budget):
                    receivers = await self._client.publish(self._probe_channel, str(seq))
                    if receivers == 0:
                        raise DeafConnection("Redis lists no subscriber on our probe channel")
                    while self._probe_seen < seq:
                        echo = self._probe_echo
                        await echo.wait()
            except TimeoutError:
                raise DeafConnection(f"probe not echoed within {budget:g}s") from None
            except RedisError as e:
                raise DeafConnection(f"probe PUBLISH failed: {e}") from e
            self.last_probe_ok = time.monotonic()
            self.last_alive_ms = wall_clock_ms()

    def _on_probe(self, data: bytes) -> None:
        try:
            seq = int(data)
        except ValueError:
            return
        if seq > self._probe_seen:
            self._probe_seen = seq
            echo, self._probe_echo = self._probe_echo, asyncio.Event()
            echo.set()

    # -- publishing ----------------------------------------------------------------------------

    def enqueue(self, channel: str, envelope: bytes) -> None:
        """Queue one PUBLISH; never awaits. When the buffer is full the oldest is dropped."""
        if len(self._outbox) >= self.settings.publish_buffer:
            self._drop_oldest()
            if self.dropped % 1000 == 1:
                log.warning(
                    "redis %s: publish buffer full, dropping the oldest events (%d so far)",
                    self.name,
                    self.dropped,
                )
        self._outbox.append((channel, envelope, wall_clock_ms()))
        self._outbox_ready.set()

    def _drop_oldest(self) -> None:
        channel, _, published_ms = self._outbox.popleft()
        self._drop(channel, published_ms)

    def _drop(self, channel: str, published_ms: int) -> None:
        """Count an event that will never be published; its post's subscribers get told."""
        self.dropped += 1
        self._metrics.inc("redis_publish_dropped_total")
        if channel in self._lost or len(self._lost) < self.settings.publish_buffer:
            self._lost[channel] = min(self._lost.get(channel, published_ms), published_ms)
        else:
            self.lost_notices_dropped += 1

    def _send_lost_notices(self) -> None:
        """After a successful batch: one LOST notice per post whose events we dropped, so that
        other instances resync its subscribers rather than miss comments in silence."""
        lost, self._lost = self._lost, {}
        for channel, since_ms in lost.items():
            self.enqueue(channel, pack_lost_notice(self._node_id, self._next_seq(), since_ms))

    async def publish_worker(self) -> None:
        """Drain the buffer in pipelined batches; never ends (errors are logged, backed off)."""
        backoff = Backoff()
        while True:
            try:
                await self._publish_next_batch(backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis %s: publish worker failed; restarting", self.name)
                # The batch it had taken is not retried: count it and send LOST notices.
                for channel, _, published_ms in self._in_flight:
                    self._drop(channel, published_ms)
                self._in_flight = []
                self._idle.set()
                await asyncio.sleep(backoff.next())

    async def _publish_next_batch(self, backoff: Backoff) -> None:
        while not self._outbox:
            self._idle.set()
            self._outbox_ready.clear()
            await self._outbox_ready.wait()
        self._idle.clear()
        batch = [self._outbox.popleft() for _ in range(min(PUBLISH_BATCH, len(self._outbox)))]
        self._in_flight = batch
        loop = asyncio.get_running_loop()
        first_failure = loop.time()
        while True:
            try:
                async with asyncio.timeout(self.settings.timeout):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for channel, envelope, _ in batch:
                            pipe.publish(channel, envelope)
                        await pipe.execute()
            except (RedisError, OSError, TimeoutError) as e:
                self.last_error = f"publish: {type(e).__name__}: {e}"
                waited = loop.time() - first_failure
                if waited >= self.settings.publish_retry:
                    self._in_flight = []
                    for channel, _, published_ms in batch:
                        self._drop(channel, published_ms)
                    log.warning(
                        "redis %s: dropped %d events after retrying for %.1fs: %s",
                        self.name,
                        len(batch),
                        waited,
                        self.last_error,
                    )
                    return
                delay = backoff.next()
                await asyncio.sleep(min(delay, self.settings.publish_retry - waited + 0.001))
                continue
            backoff.reset()
            self._in_flight = []
            self.published += len(batch)
            self._metrics.inc("redis_published_total", len(batch))
            if self._lost:
                self._send_lost_notices()
            return

    # -- status --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._state == "up"

    def channels(self) -> set[str]:
        """Post channels Redis confirmed on the current session."""
        return {c for c in self._confirmed if c != self._probe_channel}

    def status(self) -> dict[str, object]:
        probe_age = None
        if self.last_probe_ok is not None:
            probe_age = round(time.monotonic() - self.last_probe_ok, 3)
        return {
            "url": self.name,
            "state": self._state,
            "connected": self._state == "up",
            "channels": len(self.channels()),
            "last_error": self.last_error,
            "reconnects": self.reconnects,
            "dropped_publishes": self.dropped,
            "lost_notices_pending": len(self._lost),
            "lost_notices_dropped": self.lost_notices_dropped,
            "published": self.published,
            "buffered": len(self._outbox),
            "last_probe_age": probe_age,
        }


def _post_of(channel: str) -> str:
    return channel[len(CHANNEL_PREFIX) :]


class RedisBridge:
    """The `Bridge` over one or more Redis servers (see the module docstring)."""

    def __init__(
        self,
        settings: RedisSettings,
        metrics: Metrics,
        *,
        ring_change_grace: float = RING_CHANGE_GRACE,
    ) -> None:
        if not settings.urls:
            raise ValueError("redis.urls: the Redis bridge needs at least one server")
        self._settings = settings
        self._metrics = metrics
        self._grace = ring_change_grace
        # Random per start: a restarted instance is a new origin (its sequence restarts).
        self.node_id = secrets.token_hex(_ID_LEN // 2).encode()
        self._ring = Ring(settings.urls)
        self._previous: Ring | None = None  # the ring before a change, during its grace
        self._generation = 0  # bumped by every ring change
        self._seq = 0  # of this bridge's envelopes, over all servers
        self._nodes: dict[str, RedisNode] = {url: self._new_node(url) for url in self._ring.urls}
        self._listener: HubListener | None = None
        self._reconfiguring = asyncio.Lock()
        self._grace_task: asyncio.Task[None] | None = None

    def _new_node(self, url: str) -> RedisNode:
        return RedisNode(
            url,
            self._settings,
            self._metrics,
            self.node_id,
            owns=lambda post: url in self._targets(post),
            next_seq=self._next_seq,
        )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _targets(self, post_id: str) -> list[str]:
        """Servers that must carry `post_id` for us: its own, and during a grace its old one."""
        primary = self._ring.node_for(post_id)
        if self._previous is not None:
            old = self._previous.node_for(post_id)
            if old != primary:
                return [primary, old]
        return [primary]

    # -- Bridge --------------------------------------------------------------------------------

    async def start(self, listener: HubListener) -> None:
        """Start every node's workers; does not wait for Redis (an instance starts without it)."""
        self._listener = listener
        for node in self._nodes.values():
            node.start(listener)

    async def stop(self) -> None:
        if self._grace_task is not None:
            self._grace_task.cancel()
            await asyncio.gather(self._grace_task, return_exceptions=True)
        await asyncio.gather(*(n.stop(self._settings.timeout) for n in self._nodes.values()))

    async def subscribe(self, post_id: str) -> None:
        """Returns once the post's server confirmed; raises `NodeUnavailable` otherwise."""
        done: set[str] = set()
        try:
            while True:
                generation = self._generation
                primary = self._ring.node_for(post_id)
                targets = [url for url in self._targets(post_id) if url not in done]
                if not targets:
                    return
                results = await asyncio.gather(
                    *(self._nodes[url].subscribe(post_id) for url in targets),
                    return_exceptions=True,
                )
                done.update(targets)
                for url, result in zip(targets, results, strict=True):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    if isinstance(result, BaseException):
                        if url == primary:
                            raise result
                        # The old server during a ring change: a courtesy, not a requirement.
                        log.info("redis: %s: transitional subscribe failed: %s", post_id, result)
                if generation == self._generation:
                    return
                # The ring changed while we waited: follow the post where it lives now too.
        except BridgeUnavailable:
            # The hub keeps the post: the nodes keep it wanted and follow it when they can.
            raise
        except BaseException:
            # The hub rolls the post back; nothing should stay subscribed on its behalf.
            for url in done:
                if url in self._nodes:
                    self._nodes[url].unsubscribe(post_id)
            raise

    async def unsubscribe(self, post_id: str) -> None:
        for node in self._nodes.values():
            node.unsubscribe(post_id)

    def publish(self, post_id: str, payload: bytes) -> None:
        try:
            node = self._nodes[self._ring.node_for(post_id)]
            envelope = pack_envelope(self.node_id, self._next_seq(), payload)
            node.enqueue(CHANNEL_PREFIX + post_id, envelope)
        except Exception:
            # The comment is durable and delivered here; a bug must not fail the POST.
            log.exception("redis: publish for post %s failed", post_id)

    def status(self) -> dict[str, object]:
        nodes = []
        healthy = True
        for url, node in self._nodes.items():
            active = url in self._ring.urls
            nodes.append({**node.status(), "role": "active" if active else "retiring"})
            healthy = healthy and (node.connected or not active)
        return {
            "status": "ok" if healthy else "degraded",
            "kind": "redis",
            "node_id": self.node_id.decode(),
            "ring_change_in_progress": self._previous is not None,
            "nodes": nodes,
        }

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP: apply the new settings; if the server list changed, move the posts."""
        if not settings.urls:
            raise ValueError("redis.urls: switching from Redis to one instance needs a restart")
        new_ring = Ring(settings.urls)
        async with self._reconfiguring:
            self._settings = settings
            for node in self._nodes.values():
                node.configure(settings)
            if set(new_ring.urls) == set(self._ring.urls):
                return
            if self._grace_task is not None:
                # A second change inside the grace of the first ends the first grace now.
                self._grace_task.cancel()
                await asyncio.gather(self._grace_task, return_exceptions=True)
                await self._end_grace()
            await self._move_to(new_ring)

    async def _move_to(self, new_ring: Ring) -> None:
        assert self._listener is not None
        old_ring = self._ring
        added = [url for url in new_ring.urls if url not in self._nodes]
        # Instances reload within RING_CHANGE_GRACE of each other, and until one has, what it
        # publishes for a moved post may go where we no longer listen: resyncs reach back that far.
        gap_start_ms = wall_clock_ms() - int(self._grace * 1000)
        for url in added:
            self._nodes[url] = self._new_node(url)
            self._nodes[url].created_ms = gap_start_ms
            self._nodes[url].start(self._listener)
        self._previous, self._ring = old_ring, new_ring
        self._generation += 1
        moved = [
            p for p in self._listener.local_posts() if old_ring.node_for(p) != new_ring.node_for(p)
        ]
        results = await asyncio.gather(
            *(self._nodes[new_ring.node_for(p)].subscribe(p) for p in moved),
            return_exceptions=True,
        )
        # The move has a gap (other instances reload at other times), so clients must catch up.
        # A new server's first session, and any server's reconnect, resyncs what it restores
        # from local_posts(); here only the posts that joined a server already connected.
        resync = [
            post
            for post, result in zip(moved, results, strict=True)
            if not isinstance(result, BaseException) and new_ring.node_for(post) not in added
        ]
        failed = sum(1 for r in results if isinstance(r, BaseException))
        self._metrics.inc("redis_ring_moves_total", len(moved))
        log.info(
            "redis: ring is now %s; %d local posts moved (%d wait for their server to connect)",
            [node_key(u) for u in new_ring.urls],
            len(moved),
            failed,
        )
        self._listener.resync(resync, gap_start_ms)
        self._grace_task = asyncio.create_task(self._grace_worker(), name="redis-ring-grace")

    async def _grace_worker(self) -> None:
        await asyncio.sleep(self._grace)
        async with self._reconfiguring:
            await self._end_grace()

    async def _end_grace(self) -> None:
        """Stop following moved posts on their old servers; stop servers no longer listed."""
        self._previous = None
        self._generation += 1
        self._grace_task = None
        retired = [url for url in self._nodes if url not in self._ring.urls]
        for node in self._nodes.values():
            node.prune()
        for url in retired:
            # Popped only once stopped: if we are cancelled meanwhile, stop() finishes it.
            await self._nodes[url].stop(self._settings.timeout)
            del self._nodes[url]
        if retired:
            log.info("redis: ring change complete; retired %s", [node_key(u) for u in retired])

    # -- for tests and status ------------------------------------------------------------------

    @property
    def ring(self) -> Ring:
        return self._ring

    def node(self, url: str) -> RedisNode:
        return self._nodes[url]

    def posts_on(self, url: str) -> Iterable[str]:
        return (_post_of(c) for c in self._nodes[url].channels())
