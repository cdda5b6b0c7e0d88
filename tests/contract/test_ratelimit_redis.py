"""RedisBuckets against private redis-servers: one bucket per key for every instance (a burst
spent through one is spent through all), spread over several servers by the ring, idle buckets
expiring, and the fallback to the local bucket while Redis is down or silent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from livecomments.api.ratelimit import (
    REDIS_RETRY_SECONDS,
    LocalBuckets,
    Rate,
    RedisBuckets,
    comment_buckets,
)
from livecomments.config import LimitsSettings, RedisSettings
from tests.support.redis_servers import RedisServers, redis_servers
from tests.unit.test_ratelimit import FakeClock, refused

# One token a minute: nothing refills while a test runs.
SLOW = Rate(per_second=1 / 60, burst=3)
TIMEOUT = 0.5  # redis.timeout in these tests, seconds


def fallbacks(limit: str = "comments") -> float:
    value = REGISTRY.get_sample_value("livecomments_rate_limit_fallbacks_total", {"limit": limit})
    return value or 0.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServers]:
    with redis_servers(tmp_path) as servers:
        yield servers


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., RedisBuckets]]:
    made: list[RedisBuckets] = []

    def make_buckets(urls: list[str], rate: Rate = SLOW, **kwargs: object) -> RedisBuckets:
        settings = RedisSettings(urls=urls, timeout=TIMEOUT)
        buckets = RedisBuckets("comments", rate, settings, **kwargs)  # type: ignore[arg-type]
        made.append(buckets)
        return buckets

    yield make_buckets
    for buckets in made:
        await buckets.close()


async def test_a_burst_spent_through_one_instance_is_refused_through_another(redis, make):
    (server,) = redis.start(1)
    one, two = make([server.url]), make([server.url])
    before, fell_back = refused("comments"), fallbacks()
    assert await one.acquire("alice") == 0.0
    assert await two.acquire("alice") == 0.0
    assert await one.acquire("alice") == 0.0
    wait = await two.acquire("alice")
    assert 55.0 < wait <= 60.0  # the next token, a minute after the first was taken
    assert 55.0 < await one.acquire("alice") <= 60.0
    assert await two.acquire("bob") == 0.0  # another author, another bucket
    assert refused("comments") == before + 2
    assert fallbacks() == fell_back  # Redis decided every one


async def test_the_bucket_refills_on_the_servers_clock(redis, make):
    (server,) = redis.start(1)
    buckets = make([server.url], Rate(per_second=20.0, burst=1))
    assert await buckets.acquire("a") == 0.0
    wait = await buckets.acquire("a")
    assert 0.0 < wait <= 0.05
    deadline = time.monotonic() + 5
    while await buckets.acquire("a") and time.monotonic() < deadline:
        pass  # each refusal takes nothing; within 50 ms a token is back
    assert time.monotonic() < deadline


async def test_idle_buckets_expire_from_redis(redis, make):
    (server,) = redis.start(1)
    buckets = make([server.url], Rate(per_second=1 / 60, burst=2))
    await buckets.acquire("alice")
    ttl = server.command("PTTL", buckets.redis_key("alice"))
    # Full again one interval (60 s) after the one token taken: then the key is gone.
    assert 55_000 < ttl <= 60_000
    assert buckets.redis_key("alice").startswith("livecomments:ratelimit:comments:")
    assert "alice" not in buckets.redis_key("alice")  # keys are hashed, of a fixed length


async def test_keys_are_spread_over_the_servers_and_every_instance_agrees(redis, make):
    servers = redis.start(2)
    urls = [s.url for s in servers]
    one, two = make(urls), make(list(reversed(urls)))
    for i in range(40):
        for _ in range(SLOW.burst):
            assert await one.acquire(f"author{i}") == 0.0
        assert await two.acquire(f"author{i}") > 0
    held = [int(s.command("DBSIZE")) for s in servers]
    assert sum(held) == 40 and min(held) > 0


async def test_redis_down_falls_back_to_the_local_bucket_then_comes_back(redis, make):
    (server,) = redis.start(1)
    clock = FakeClock()
    local = LocalBuckets("comments", SLOW, clock=clock)
    buckets = make([server.url], fallback=local, clock=clock)
    assert await buckets.acquire("alice") == 0.0  # one token spent in Redis
    server.kill()
    before = fallbacks()
    # The local bucket decides: a full burst (it knows nothing of Redis's), then refusals.
    assert [await buckets.acquire("alice") for _ in range(SLOW.burst)] == [0.0] * SLOW.burst
    assert await buckets.acquire("alice") > 0
    assert fallbacks() == before + SLOW.burst + 1
    server.start()
    # Within REDIS_RETRY_SECONDS the server is left alone, even though it is back.
    assert await buckets.acquire("alice") > 0
    assert int(server.command("DBSIZE")) == 0
    clock.advance(REDIS_RETRY_SECONDS)
    assert await buckets.acquire("alice") == 0.0  # Redis again: a new server, a full bucket
    assert int(server.command("DBSIZE")) == 1
    assert fallbacks() == before + SLOW.burst + 2


async def test_a_silent_redis_costs_one_timeout_then_is_left_alone(redis, make):
    (server,) = redis.start(1)
    clock = FakeClock()
    buckets = make([server.url], clock=clock)
    assert await buckets.acquire("alice") == 0.0
    server.pause()
    try:
        started = time.monotonic()
        assert await buckets.acquire("alice") == 0.0  # the local bucket, after the timeout
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 2
        started = time.monotonic()
        assert await buckets.acquire("alice") == 0.0  # no second timeout
        assert time.monotonic() - started < TIMEOUT / 2
    finally:
        server.resume()


async def test_comment_buckets_use_redis_when_it_is_configured(redis):
    (server,) = redis.start(1)
    limits = LimitsSettings(comments_per_minute=1, comments_burst=1)
    one = comment_buckets(limits, RedisSettings(urls=[server.url]))
    two = comment_buckets(limits, RedisSettings(urls=[server.url]))
    try:
        assert isinstance(one, RedisBuckets)
        assert await one.acquire("alice") == 0.0
        assert await two.acquire("alice") > 0
    finally:
        await one.close()
        await two.close()
