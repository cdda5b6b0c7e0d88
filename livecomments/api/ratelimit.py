"""Token buckets, the rate limits' one mechanism, and the per-author limit on comments.

Every limit is a token bucket: `Rate.per_second` tokens flow in, at most `Rate.burst` are kept,
each request takes one, and a request that finds none is refused with the seconds until one will
be there (`Retry-After`). A bucket is stored as one number, its GCRA "theoretical arrival time"
(the time at which it would be full again, once every token taken so far has flowed back): the
same decisions as a counter of tokens and a timestamp, in one float locally and one Redis string
(`_take` and `TAKE_SCRIPT` are the same arithmetic). A bucket whose time has passed is full, so
forgetting it (LRU eviction, a Redis TTL) changes no decision.

A rate of 0 turns a limit off: every limiter here then allows everything, so callers need no
branch. Every refusal is counted in `livecomments_rate_limited_total{limit}`.

* `TokenBucket`: one bucket, for one owner (api/socketlimits.py: a socket's frames).
* `Buckets` (comments per author): `LocalBuckets` in memory, or `RedisBuckets` shared by every
  instance (see its docstring for what happens when Redis fails). `comment_buckets` picks one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from livecomments import metrics
from livecomments.config import LimitsSettings, RedisSettings
from livecomments.live.redis.client import connection_kwargs
from livecomments.live.redis.ring import Ring
from livecomments.urls import redact_url

log = logging.getLogger(__name__)

Clock = Callable[[], float]
LimitName = Literal["comments", "ws_per_ip", "ws_connects_per_ip", "frames"]

# Keys (authors, addresses) one LocalBuckets remembers; the least recently used is forgotten
# past it. Forgetting a bucket refills it: at worst an attacker cycling through more keys than
# this gets each one's burst again, while memory stays bounded (~100 bytes a key).
MAX_KEYS = 100_000
# Float slack in the GCRA comparison: a request exactly on time is not refused by a rounding.
EPSILON = 1e-9
# Seconds RedisBuckets leaves a failed Redis server alone (deciding locally) before trying it again:
# an unreachable server must not cost every comment a timeout.
REDIS_RETRY_SECONDS = 5.0
# Seconds between two log lines about the same failing limiter (the metric counts every one).
LOG_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float  # tokens that flow in per second; 0: the limit is off
    burst: int  # tokens kept at most: requests allowed at once

    @property
    def on(self) -> bool:
        return self.per_second > 0

    @property
    def interval(self) -> float:
        """Seconds per token."""
        return 1.0 / self.per_second

    @property
    def tolerance(self) -> float:
        """How far ahead of now a bucket's arrival time may be and still hold a token."""
        return (max(self.burst, 1) - 1) * self.interval


def _take(tat: float, now: float, rate: Rate) -> tuple[float, float]:
    """One GCRA step on arrival time `tat`: (new tat, 0.0) if a token was taken, else
    (tat, seconds until a token is there)."""
    tat = max(tat, now)
    wait = tat - now - rate.tolerance
    if wait > EPSILON:
        return tat, wait
    return tat + rate.interval, 0.0


class TokenBucket:
    """One bucket, for one owner (a socket): `take(now)` is 0.0 or the seconds to wait."""

    __slots__ = ("_rate", "_tat")

    def __init__(self, rate: Rate) -> None:
        self._rate = rate
        self._tat = 0.0

    def take(self, now: float) -> float:
        if not self._rate.on:
            return 0.0
        self._tat, wait = _take(self._tat, now, self._rate)
        return wait


class Buckets(Protocol):
    """Token buckets by key (an author), one `Rate` for all keys.

    `acquire(key)` takes a token from the key's bucket and returns 0.0, or takes nothing and
    returns the seconds until a token will be there. It never raises for a backend's failure
    (each implementation says what it decides then). `close()` releases connections."""

    rate: Rate

    async def acquire(self, key: str) -> float: ...

    async def close(self) -> None: ...


class LocalBuckets:
    """Buckets in this process's memory: exact, per instance, at most `max_keys` of them (LRU)."""

    def __init__(
        self,
        limit: LimitName,
        rate: Rate,
        *,
        max_keys: int = MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate = rate
        self._max_keys = max_keys
        self._clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._refused = metrics.RATE_LIMITED.labels(limit)

    def __len__(self) -> int:
        return len(self._tats)

    def take(self, key: str) -> float:
        """`acquire` without the coroutine: nothing here waits."""
        if not self.rate.on:
            return 0.0
        now = self._clock()
        tat = self._tats.pop(key, None)  # popped and put back: the most recently used is last
        if tat is None and len(self._tats) >= self._max_keys:
            self._tats.popitem(last=False)
        tat, wait = _take(now if tat is None else tat, now, self.rate)
        self._tats[key] = tat
        if wait:
            self._refused.inc()
        return wait

    async def acquire(self, key: str) -> float:
        return self.take(key)

    async def close(self) -> None:
        pass


# The Redis form of `_take`, in microseconds of the server's clock (one clock for every
# instance, whatever their own say). KEYS[1]: the bucket; ARGV: interval, tolerance (us).
# Returns the microseconds to wait, 0 when a token was taken. The key expires when the bucket
# is full again, so idle authors cost Redis nothing.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - now - tonumber(ARGV[2])
if wait > 0 then return wait end
tat = tat + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
"""
KEY_PREFIX = "livecomments:ratelimit:"


class _Server:
    """One Redis server as RedisBuckets uses it, and until when it is left alone."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = Redis.from_url(url, **connection_kwargs("livecomments:ratelimit"))
        self.take = self.client.register_script(TAKE_SCRIPT)
        self.down_until = 0.0


class RedisBuckets:
    """Buckets in Redis, shared by every instance: a burst spent through one instance is spent
    for all. Each key lives on one of `redis.urls`, picked by the same ring as the posts'
    streams (live/redis/ring.py), so every instance asks the same server. One atomic script
    per decision; the redis-py conventions of live/redis/shard.py (RESP2, our own
    `asyncio.timeout(redis.timeout)`, no hidden retries).

    When Redis fails (an error, or no answer within `redis.timeout`), the decision falls to
    `fallback`, a `LocalBuckets` with the same rate, and that server is left alone for
    `REDIS_RETRY_SECONDS`. Why this and not the alternatives: failing open would lift the limit
    exactly when it may matter most (Redis overloaded by a flood), and failing closed would stop
    every comment because a limiter's store is down; the local bucket still holds each author to
    the rate on each instance (so to at most rate x instances overall). Each fallen-back
    decision is counted (`livecomments_rate_limit_fallbacks_total`); failures are logged at most
    once a minute. Local and Redis buckets are separate: moving between them may grant an
    author one extra burst.
    """

    def __init__(
        self,
        limit: LimitName,
        rate: Rate,
        settings: RedisSettings,
        *,
        fallback: LocalBuckets | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate = rate
        self._limit = limit
        self._settings = settings
        self._clock = clock
        self._fallback = fallback or LocalBuckets(limit, rate, clock=clock)
        self._ring = Ring(settings.urls)
        self._servers = {url: _Server(url) for url in self._ring.urls}
        interval_us = max(1, round(rate.interval * 1e6)) if rate.on else 1
        self._args = [interval_us, interval_us * (max(rate.burst, 1) - 1)]
        self._refused = metrics.RATE_LIMITED.labels(limit)
        self._fallbacks = metrics.RATE_LIMIT_FALLBACKS.labels(limit)
        self._logged_at = -LOG_EVERY

    def redis_key(self, key: str) -> str:
        """Hashed: keys are whatever the client or the token says, of any length."""
        return (
            KEY_PREFIX
            + self._limit
            + ":"
            + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        )

    async def acquire(self, key: str) -> float:
        if not self.rate.on:
            return 0.0
        redis_key = self.redis_key(key)
        server = self._servers[self._ring.node_for(redis_key)]
        if server.down_until > self._clock():
            return self._decide_locally(key)
        try:
            async with asyncio.timeout(self._settings.timeout):
                wait_us = await server.take(keys=[redis_key], args=self._args)
        except (RedisError, OSError, TimeoutError) as e:
            server.down_until = self._clock() + REDIS_RETRY_SECONDS
            self._log_failure(server, e)
            return self._decide_locally(key)
        if wait_us:
            self._refused.inc()
            return int(wait_us) / 1e6
        return 0.0

    def _decide_locally(self, key: str) -> float:
        self._fallbacks.inc()
        return self._fallback.take(key)

    def _log_failure(self, server: _Server, error: BaseException) -> None:
        now = self._clock()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning(
                "rate limit %s: redis %s failed (%s: %s); limiting on this instance alone for "
                "now (logged once a minute)",
                self._limit,
                redact_url(server.url),
                type(error).__name__,
                error,
            )

    async def close(self) -> None:
        for server in self._servers.values():
            await server.client.aclose()


def comment_buckets(limits: LimitsSettings, redis: RedisSettings) -> Buckets:
    """Comments per author: in Redis when `redis.urls` is set (shared), else in memory."""
    rate = Rate(limits.comments_per_minute / 60.0, limits.comments_burst)
    local = LocalBuckets("comments", rate)
    if not rate.on or not redis.urls:
        return local
    return RedisBuckets("comments", rate, redis, fallback=local)
