"""The seam between one instance's hub and the others: where live traffic crosses processes.

The hub delivers every comment to its own sockets itself, then hands the same encoded bytes to
`Bridge.publish`. A bridge carries them to the other instances and calls `HubListener.deliver`
there; it must never hand an instance back its own publications (the hub already delivered them).

`MemoryBridge` is the single-instance bridge: there is nobody else, so it carries nothing. The
Redis bridge (live/redis/bridge.py) implements the same protocol across hosts, and one more
ability, `Reconfigurable`: a new ring of Redis servers at runtime (SIGHUP).

Guarantees every bridge keeps (tests/contract/test_bridge_contract.py holds both to them):
* `publish` never awaits and never raises; a subscriber on another instance receives what was
  published after its `subscribe` returned, once, in the order of each publisher.
* An instance never receives its own publications back.
* A loss it cannot repair (a dropped connection, a dropped publish) ends in `resync` for the
  posts concerned, never in silence.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, runtime_checkable

from livecomments.config import RedisSettings


class BridgeUnavailable(ConnectionError):
    """The bridge cannot follow a post right now (its server is down or not answering).

    A bridge raising this promises to follow the post by itself once it is back, because it
    resubscribes from `HubListener.local_posts()` and then resyncs those posts. The hub can
    therefore keep the local subscriber instead of refusing it."""


class HubListener(Protocol):
    """What a bridge may call on the hub."""

    def deliver(self, post_id: str, payload: bytes) -> None:
        """Fan a remote instance's encoded event out to local sockets. Never awaits."""

    def resync(self, post_ids: Iterable[str], since_ms: int) -> None:
        """Tell local subscribers of these posts they may have missed comments created since
        `since_ms` (Unix ms: when the bridge last knew it was receiving everything)."""

    def local_posts(self) -> Collection[str]:
        """Posts with local subscribers: what a reconnecting bridge must subscribe to again."""


class Bridge(Protocol):
    async def start(self, listener: HubListener) -> None: ...

    async def stop(self) -> None: ...

    async def subscribe(self, post_id: str) -> None:
        """Receive other instances' events for `post_id` from now on. Raises
        `BridgeUnavailable` if it cannot yet but will (see there), anything else if it cannot."""

    async def unsubscribe(self, post_id: str) -> None: ...

    def publish(self, post_id: str, payload: bytes) -> None:
        """Send an encoded event to the other instances. Never awaits, never raises: the comment
        is already durable and delivered locally, so a failure here is retried or counted."""

    def status(self) -> dict[str, object]:
        """For /readyz: `{"status": "ok" | "degraded" | ..., ...details}`."""


@runtime_checkable
class Reconfigurable(Protocol):
    """A bridge whose servers can change at runtime."""

    async def reconfigure(self, settings: RedisSettings) -> None:
        """SIGHUP with a new `redis.urls`: move the posts whose shard changed, keep sockets."""


class MemoryBridge:
    """One instance, nothing to bridge: every subscriber is local and already served."""

    async def start(self, listener: HubListener) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def subscribe(self, post_id: str) -> None:
        pass

    async def unsubscribe(self, post_id: str) -> None:
        pass

    def publish(self, post_id: str, payload: bytes) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"status": "ok", "kind": "memory"}


def open_bridge(settings: RedisSettings) -> Bridge:
    """In-memory for one instance; Redis, sharded by a ring, when `redis.urls` lists servers."""
    if not settings.urls:
        return MemoryBridge()
    from livecomments.live.redis.bridge import RedisBridge  # noqa: PLC0415 (only with Redis on)

    return RedisBridge(settings)
