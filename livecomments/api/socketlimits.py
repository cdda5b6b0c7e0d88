"""Limits on WebSockets: per client address (open sockets, new ones per second) and per socket
(frames from the client). All are per instance and in memory (token buckets of ratelimit.py);
a rate or count of 0 turns a limit off. Refusals are counted in
`livecomments_rate_limited_total{limit}`: ws_per_ip, ws_connects_per_ip, frames.

The caller answers `ConnectionLimits.admit`'s refusal with 429 + Retry-After before the upgrade,
and closes a socket with 1008 when its `FrameRate.allow()` is False.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass

from livecomments import metrics
from livecomments.api.ratelimit import MAX_KEYS, Clock, LimitName, LocalBuckets, Rate, TokenBucket
from livecomments.config import LimitsSettings

# Seconds a client is told to wait when its address has ws_per_ip sockets open: nothing says
# when one will close.
RETRY_AFTER_WS_PER_IP = 10.0


@functools.lru_cache(maxsize=4096)  # pure, and asked for every request and upgrade
def address_key(address: str | None) -> str:
    """Whose connection this is, for limits: the IP address, an IPv6 one by its /64 (one host
    gets a whole /64 and could otherwise rotate through it). Unknown: one shared key, "".
    Behind a proxy this is the proxy's address unless the caller passes the client's."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True, slots=True)
class Refused:
    limit: LimitName
    retry_after: float  # seconds, for Retry-After (round up)


class Ticket:
    """An admitted WebSocket's place in its address's count. `release()` when the socket
    closes; releasing again does nothing, so a `finally` may always call it."""

    __slots__ = ("_key", "_limits", "_released")

    def __init__(self, limits: ConnectionLimits, key: str) -> None:
        self._limits = limits
        self._key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limits._release(self._key)


class ConnectionLimits:
    """Per client address, on this instance: how many WebSockets are open (`max_open`, 0: no
    limit) and how fast new ones come (`connects`, a token bucket per address, LRU-bounded).

    Per instance on purpose: both guard this process's sockets and memory, and a check in Redis
    would put a round trip on every upgrade. The open counts need no eviction: an address is
    only kept while it has a socket open, so there are at most `limits.max_connections`."""

    def __init__(
        self,
        max_open: int,
        connects: Rate,
        *,
        max_addresses: int = MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_open = max_open
        self._open: dict[str, int] = {}
        self._connects = LocalBuckets(
            "ws_connects_per_ip", connects, max_keys=max_addresses, clock=clock
        )
        self._open_refused = metrics.RATE_LIMITED.labels("ws_per_ip")

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> ConnectionLimits:
        connects = Rate(limits.ws_connects_per_ip_per_second, limits.ws_connects_burst)
        return cls(limits.ws_per_ip, connects)

    def admit(self, address: str | None) -> Ticket | Refused:
        """Count a new WebSocket from `address`, or say which limit refuses it (nothing is
        counted then). Check before the upgrade, answer a refusal with 429 + Retry-After."""
        key = address_key(address)
        if self.max_open and self._open.get(key, 0) >= self.max_open:
            self._open_refused.inc()
            return Refused("ws_per_ip", RETRY_AFTER_WS_PER_IP)
        wait = self._connects.take(key)
        if wait:
            return Refused("ws_connects_per_ip", wait)
        self._open[key] = self._open.get(key, 0) + 1
        return Ticket(self, key)

    def open_from(self, address: str | None) -> int:
        return self._open.get(address_key(address), 0)

    def addresses(self) -> int:
        """Addresses with a socket open (the size of the count)."""
        return len(self._open)

    def _release(self, key: str) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)


class FrameRate:
    """Frames one client sends on one socket. `allow()` is False past the rate (counted): the
    caller closes the socket with 1008. Off (rate 0): always True."""

    __slots__ = ("_bucket", "_clock")

    def __init__(self, rate: Rate, clock: Clock = time.monotonic) -> None:
        self._bucket = TokenBucket(rate)
        self._clock = clock

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> FrameRate:
        return cls(Rate(limits.frames_per_second, limits.frames_burst))

    def allow(self) -> bool:
        if self._bucket.take(self._clock()):
            _FRAMES_REFUSED.inc()
            return False
        return True


_FRAMES_REFUSED = metrics.RATE_LIMITED.labels("frames")
