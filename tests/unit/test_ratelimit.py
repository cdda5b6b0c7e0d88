"""Token buckets in memory, on a fake clock: what is allowed, what is refused and for how long,
that a rate of 0 is off, and that the number of buckets kept is bounded."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from livecomments.api.ratelimit import (
    LocalBuckets,
    Rate,
    TokenBucket,
    comment_buckets,
)
from livecomments.config import LimitsSettings, RedisSettings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def refused(limit: str) -> float:
    """How many refusals `limit` has counted in this process so far."""
    value = REGISTRY.get_sample_value("livecomments_rate_limited_total", {"limit": limit})
    return value or 0.0


def test_a_bucket_allows_its_burst_at_once_then_one_per_interval():
    bucket = TokenBucket(Rate(per_second=2.0, burst=3))
    now = 50.0
    assert [bucket.take(now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(now) == pytest.approx(0.5)  # one token every half second
    assert bucket.take(now + 0.25) == pytest.approx(0.25)  # a refusal takes nothing
    assert bucket.take(now + 0.5) == 0.0
    assert bucket.take(now + 0.5) == pytest.approx(0.5)


def test_a_bucket_refills_to_its_burst_and_no_further():
    bucket = TokenBucket(Rate(per_second=1.0, burst=2))
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    # An hour idle: full again, but holds only `burst` tokens.
    assert [bucket.take(3600.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(3600.0) == pytest.approx(1.0)


def test_a_request_exactly_on_time_is_allowed():
    bucket = TokenBucket(Rate(per_second=10.0, burst=1))
    now = 0.0
    for _ in range(100):  # a hundred steps of 0.1 s, whose float sum is not exactly 10
        assert bucket.take(now) == 0.0
        now += 0.1


def test_burst_of_one_allows_one_per_interval():
    bucket = TokenBucket(Rate(per_second=0.5, burst=1))
    assert bucket.take(10.0) == 0.0
    assert bucket.take(11.0) == pytest.approx(1.0)
    assert bucket.take(12.0) == 0.0


def test_rate_zero_is_off():
    assert TokenBucket(Rate(0.0, 1)).take(0.0) == 0.0
    buckets = LocalBuckets("comments", Rate(0.0, 1), clock=FakeClock())
    assert all(buckets.take("a") == 0.0 for _ in range(1000))
    assert len(buckets) == 0  # nothing is even remembered


async def test_local_buckets_are_per_key_and_count_refusals():
    clock = FakeClock()
    buckets = LocalBuckets("comments", Rate(per_second=1 / 60, burst=2), clock=clock)
    before = refused("comments")
    assert [await buckets.acquire("alice") for _ in range(2)] == [0.0, 0.0]
    assert await buckets.acquire("alice") == pytest.approx(60.0)
    assert await buckets.acquire("bob") == 0.0  # another author has their own bucket
    clock.advance(59.0)
    assert await buckets.acquire("alice") == pytest.approx(1.0)
    clock.advance(1.0)
    assert await buckets.acquire("alice") == 0.0
    assert refused("comments") == before + 2
    await buckets.close()


def test_local_buckets_keep_at_most_max_keys_and_forget_the_least_recently_used():
    clock = FakeClock()
    buckets = LocalBuckets("comments", Rate(per_second=1.0, burst=1), max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        assert buckets.take(key) == 0.0
    assert buckets.take("a") > 0  # a is used again (refused): b is now the oldest
    for i in range(1000):  # an attacker inventing authors
        buckets.take(f"x{i}")
        assert len(buckets) <= 3
    assert buckets.take("x999") > 0  # the newest is still remembered
    # Everything else was forgotten: a forgotten bucket starts full.
    assert buckets.take("a") == 0.0


def test_forgetting_an_idle_bucket_changes_no_decision():
    clock = FakeClock()
    buckets = LocalBuckets("comments", Rate(per_second=1.0, burst=2), max_keys=1, clock=clock)
    buckets.take("a")
    buckets.take("a")
    clock.advance(2.0)  # a is full again: remembered or not, the same answer
    buckets.take("b")  # evicts a
    assert [buckets.take("a"), buckets.take("a")] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)


def test_comment_buckets_follow_the_settings():
    limits = LimitsSettings(comments_per_minute=30.0, comments_burst=4)
    buckets = comment_buckets(limits, RedisSettings())
    assert isinstance(buckets, LocalBuckets)
    assert buckets.rate == Rate(0.5, 4)
    off = comment_buckets(LimitsSettings(comments_per_minute=0), RedisSettings(urls=["redis://x"]))
    assert isinstance(off, LocalBuckets) and not off.rate.on
