"""The ring sweeper's rule, without Redis: which posts a pending change guards, and until when.

The sweeps themselves (SCAN, DROP_STALE, retries) run against real servers in
tests/functional/test_redis_broker_functional.py; here no sweep ever reaches a server: `connect`
points nowhere and each test stops the sweeper before it tries twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from livecomments.live.redis.ring import Ring
from livecomments.live.redis.sweep import MARGIN, RingSweeper, post_of_key
from tests.support.server import free_port

A, B, C = (f"redis://10.0.0.{i}:6379/0" for i in (1, 2, 3))
POSTS = [f"post-{i}" for i in range(2000)]


@pytest.fixture
async def sweeper() -> AsyncIterator[RingSweeper]:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    sweeper = RingSweeper(lambda url: Redis.from_url(nowhere, protocol=2), lambda: 0.5)
    sweeper.attempts = 1
    yield sweeper
    await sweeper.stop()


def test_post_of_key_reads_the_post_id_and_nothing_else():
    assert post_of_key(b"livecomments:{p-1}:m") == "p-1"
    assert post_of_key("livecomments:{a:b}:m") == "a:b"
    assert post_of_key(b"livecomments:ratelimit:x") is None
    assert post_of_key(b"livecomments:{p-1}:s") is None


async def test_only_posts_moved_onto_a_shard_are_guarded_there(sweeper: RingSweeper):
    old, new = Ring([A, B]), Ring([A, B, C])
    assert all(sweeper.max_age_ms(p, A) is None for p in POSTS)  # no change yet: no cost
    sweeper.ring_changed(old, new)
    for post in POSTS:
        owner = new.node_for(post)
        age = sweeper.max_age_ms(post, owner)
        if old.node_for(post) == owner:
            assert age is None  # stayed: its epoch goes on
        else:
            assert owner == C  # adding a server moves posts only onto it
            assert age is not None and 0 <= age <= MARGIN * 1000 + 1000


async def test_the_latest_change_that_moved_a_post_here_decides(sweeper: RingSweeper):
    """A -> C -> A before any sweep finished: back on A, the post is guarded from the second
    change, with a margin no longer than the time between the two changes."""
    two, three = Ring([A, B]), Ring([A, B, C])
    post = next(p for p in POSTS if two.node_for(p) == A and three.node_for(p) == C)
    stayed = next(p for p in POSTS if two.node_for(p) == three.node_for(p) == A)
    sweeper.ring_changed(two, three)
    first = sweeper.max_age_ms(post, C)
    assert first is not None and first >= MARGIN * 1000 - 100
    sweeper.ring_changed(three, two)
    back = sweeper.max_age_ms(post, A)
    # The margin is cut to the time since the first change (here: almost nothing), so the
    # epoch the post had on A before it left counts as stale.
    assert back is not None and back < 1000
    assert sweeper.max_age_ms(stayed, A) is None
    assert sweeper.status()["pending"] == {A: 2, B: 2}  # C left the ring: nothing pending there


async def test_a_new_password_is_not_a_new_shard(sweeper: RingSweeper):
    before = Ring(["redis://:old@10.0.0.1:6379/0", B])
    after = Ring(["redis://:new@10.0.0.1:6379/0", B])
    sweeper.ring_changed(before, after)
    owners = {"redis://:new@10.0.0.1:6379/0": A, B: B}  # the guard is asked by the shard's name
    assert all(sweeper.max_age_ms(p, owners[after.node_for(p)]) is None for p in POSTS)
    assert not any(s["retired"] for s in sweeper.status()["shards"])  # type: ignore[attr-defined]
