"""The seam between the hub and whoever keeps each post's stream: where positions come from.

Each post's live stream has a **position**: an `offset` that grows by exactly 1 per publication,
and an `epoch` that changes whenever the stream's history was lost (a Redis server restarted
empty, the post moved to another shard, the embedded process restarted). A `Broker` keeps the
streams:

* `append` is the one place offsets are assigned: atomically, per entry, it drops an entry whose
  comment id the stream already has (returning the position it got then), takes the next
  offset, keeps the publication in the post's bounded history, and publishes it to every node
  that follows the post, this one included: local viewers get comments from the stream too, so
  every viewer of a post sees one order.
* `history` answers where a stream is, and what it holds after a position, if it still does.
* `recent` lists the comments of a GET window the history holds, `taken_down` the ones its
  deletions took down (for GET on any node).
* Publications reach `StreamListener.on_publication` in stream order per post (Pub/Sub keeps
  order per connection), but may be lost with a connection; the broker then calls
  `on_stream_gap` for the posts it follows, and the hub fills the gap from `history`.

Two brokers: `MemoryBroker` here (one node: this process keeps the streams, and a restart is a
new epoch) and `RedisBroker` (live/redis/broker.py: the post's Redis shard keeps them).
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from livecomments.config import HistorySettings, RedisSettings
from livecomments.model.stream import Entry, Position, Publication

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "Entry",
    "History",
    "MemoryBroker",
    "Position",
    "Publication",
    "StreamListener",
    "open_broker",
]

# Streams looked at between two sweeps for idle ones (MemoryBroker).
SWEEP_EVERY = 4096


class BrokerUnavailable(ConnectionError):
    """The post's shard cannot be reached right now. Nothing was lost: appends stay in the
    outbox, and a subscription is followed once the shard is back (`on_stream_gap`)."""


@dataclass(frozen=True, slots=True)
class History:
    """Where a stream is, and the publications after the position asked for.

    `complete`: `publications` are every one from the asked offset + 1 up to `position` (or up
    to the limit asked); False when the history no longer holds them (trimmed, or another
    epoch)."""

    position: Position
    publications: list[Publication] = field(default_factory=list)
    complete: bool = True


class StreamListener(Protocol):
    """What a broker may call on the hub."""

    def on_publication(self, publication: Publication) -> None:
        """A publication of a followed post, in its stream's order. Never awaits."""

    def on_stream_gap(self, post_ids: Iterable[str]) -> None:
        """Publications of these posts may have been lost (a session dropped): check."""

    def local_posts(self) -> Collection[str]:
        """Posts with local subscribers: what a reconnecting broker must follow again."""


class Broker(Protocol):
    async def start(self, listener: StreamListener) -> None: ...

    async def stop(self) -> None: ...

    async def subscribe(self, post_id: str) -> None:
        """Receive the post's publications from now on; `BrokerUnavailable` if not yet."""

    async def unsubscribe(self, post_id: str) -> None: ...

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        """Append each entry to its post's stream; per entry its position, None if its shard
        is unreachable (try again later). Never raises for one shard's failure."""

    async def history(self, post_id: str, since: Position | None = None, limit: int = 0) -> History:
        """The stream's position and, if `since` is given and in its epoch, up to `limit`
        publications after it. Raises `BrokerUnavailable`."""

    async def position(self, post_id: str) -> Position:
        """Where the post's stream is now. Raises `BrokerUnavailable`."""

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        """Comment JSON the post's history holds: the oldest `limit` with an id after `after`,
        or the newest `limit` (with an id before `before`, if given). Raises
        `BrokerUnavailable`."""

    async def taken_down(self, post_id: str) -> set[int]:
        """Ids of the post's comments whose deletion the history holds. Raises
        `BrokerUnavailable`."""

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        """Call `callback()` whenever a shard is reachable again (the outbox re-checks)."""

    def status(self) -> dict[str, object]:
        """For /readyz: `{"status": "ok" | "degraded", ...details}`."""


class ReconnectCallback(Protocol):
    def __call__(self) -> None: ...


@runtime_checkable
class Reconfigurable(Protocol):
    """A broker whose servers can change at runtime."""

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP with a new `redis.urls`: posts whose shard changed follow it there (a new
        epoch: their viewers reload once)."""


class _Stream:
    """One post's stream in memory: its position and bounded history."""

    __slots__ = ("epoch", "history", "ids", "offset", "touched")

    def __init__(self) -> None:
        # Per stream, not per process: a stream forgotten while idle and made again later must
        # not restart its offsets in an epoch some client still holds.
        self.epoch = secrets.token_hex(8)
        self.offset = 0
        self.history: collections.deque[tuple[float, Publication, int]] = collections.deque()
        self.ids: dict[int, int] = {}  # comment id -> offset, for the ones in `history`
        self.touched = time.monotonic()


class MemoryBroker:
    """One node: this process keeps every stream, in memory: a restart starts every stream in a
    new epoch, so a client that comes back after it is told plainly to reload."""

    def __init__(self, settings: HistorySettings) -> None:
        self._settings = settings
        self._streams: dict[str, _Stream] = {}
        self._listener: StreamListener | None = None
        self._calls = 0

    async def start(self, listener: StreamListener) -> None:
        self._listener = listener

    async def stop(self) -> None:
        self._listener = None

    async def subscribe(self, post_id: str) -> None:
        pass

    async def unsubscribe(self, post_id: str) -> None:
        pass

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        pass  # never disconnected

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        return [self.append_one(entry) for entry in entries]

    def append_one(self, entry: Entry) -> Position:
        stream = self._stream(entry.post_id)
        known = stream.ids.get(entry.comment_id)
        if known is not None:
            return Position(stream.epoch, known)
        stream.offset += 1
        publication = Publication(
            entry.post_id, stream.epoch, stream.offset, entry.kind, entry.body
        )
        stream.history.append((time.monotonic(), publication, entry.comment_id))
        stream.ids[entry.comment_id] = stream.offset
        self._trim(stream)
        if self._listener is not None:
            self._listener.on_publication(publication)
        return Position(stream.epoch, stream.offset)

    async def history(self, post_id: str, since: Position | None = None, limit: int = 0) -> History:
        stream = self._stream(post_id)
        self._trim(stream)
        position = Position(stream.epoch, stream.offset)
        if since is None or since.epoch != stream.epoch or since.offset >= stream.offset:
            # Complete: nothing to replay, or a position this epoch never reached (lost).
            same = since is None or (since.epoch == stream.epoch and since.offset == stream.offset)
            return History(position, complete=same)
        held = [p for _, p, _ in stream.history if p.offset > since.offset]
        complete = bool(held) and held[0].offset == since.offset + 1
        if limit:
            held = held[:limit]
        return History(position, held if complete else [], complete)

    async def position(self, post_id: str) -> Position:
        stream = self._stream(post_id)
        return Position(stream.epoch, stream.offset)

    async def recent(
        self, post_id: str, after: int | None, before: int | None, limit: int
    ) -> list[bytes]:
        return []  # one node: everything in its history is in its own queue or database

    async def taken_down(self, post_id: str) -> set[int]:
        return set()  # the same: its queue and database know every deletion

    def _stream(self, post_id: str) -> _Stream:
        self._calls += 1
        if self._calls % SWEEP_EVERY == 0:
            self._forget_idle()
        stream = self._streams.get(post_id)
        if stream is None:
            stream = self._streams[post_id] = _Stream()
        stream.touched = time.monotonic()
        return stream

    def _forget_idle(self) -> None:
        """Streams untouched for `history.meta_ttl` go, as Redis expires their keys: memory is
        bounded by the posts of the last day, not by every post ever commented on."""
        idle_since = time.monotonic() - self._settings.meta_ttl
        for post_id in [p for p, s in self._streams.items() if s.touched < idle_since]:
            del self._streams[post_id]

    def _trim(self, stream: _Stream) -> None:
        """Keep at most `history.size` publications, none older than `history.ttl`."""
        oldest = time.monotonic() - self._settings.ttl
        while stream.history and (
            len(stream.history) > self._settings.size or stream.history[0][0] < oldest
        ):
            _, _, comment_id = stream.history.popleft()
            stream.ids.pop(comment_id, None)

    def status(self) -> dict[str, object]:
        return {"status": "ok", "kind": "memory", "streams": len(self._streams)}


def open_broker(redis: RedisSettings, history: HistorySettings) -> Broker:
    """In memory for one node; Redis, sharded by a ring, when `redis.urls` lists servers."""
    if not redis.urls:
        return MemoryBroker(history)
    from livecomments.live.redis.broker import RedisBroker  # noqa: PLC0415 (only with Redis on)

    return RedisBroker(redis, history)
