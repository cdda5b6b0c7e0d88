"""POST retry memory: same comment back, a reused id refused, bounded in bytes."""

from __future__ import annotations

import pytest

from livecomments.api.dedupe import ENTRY_OVERHEAD, RecentRequests
from livecomments.api.errors import ApiError
from livecomments.model.comment import Draft


def draft(post: str = "p", message: str = "m") -> Draft:
    return Draft(post, "u", message, None, None)


async def test_a_retry_gets_the_first_attempts_comment():
    recent = RecentRequests(max_bytes=1 << 20)
    assert recent.claim(("u", "1"), draft()) is None
    recent.settle(("u", "1"), b'{"id":"1"}')
    earlier = recent.claim(("u", "1"), draft())
    assert earlier is not None and await earlier == b'{"id":"1"}'


async def test_the_same_id_for_a_different_comment_is_refused():
    recent = RecentRequests(max_bytes=1 << 20)
    recent.claim(("u", "1"), draft(post="a"))
    with pytest.raises(ApiError) as e:
        recent.claim(("u", "1"), draft(post="b"))
    assert e.value.status == 409
    with pytest.raises(ApiError):
        recent.claim(("u", "1"), draft(post="a", message="changed"))


async def test_memory_is_bounded_by_bytes_not_count():
    big = b"x" * 8000
    recent = RecentRequests(max_bytes=100 * (len(big) + ENTRY_OVERHEAD))
    for i in range(1000):
        recent.claim(("u", str(i)), draft(message=str(i)))
        recent.settle(("u", str(i)), big)
    assert recent._bytes <= 100 * (len(big) + ENTRY_OVERHEAD)
    assert len(recent._seen) == 100
    assert recent.claim(("u", "999"), draft(message="999")) is not None  # newest kept
    assert recent.claim(("u", "0"), draft(message="0")) is None  # oldest forgotten


async def test_a_failed_attempt_fails_its_waiting_retry_and_frees_the_id():
    recent = RecentRequests(max_bytes=1 << 20)
    recent.claim(("u", "1"), draft())
    waiting = recent.claim(("u", "1"), draft())
    assert waiting is not None
    recent.forget(("u", "1"), ApiError(503, "queue_full", "full"))
    with pytest.raises(ApiError):
        await waiting
    assert recent.claim(("u", "1"), draft()) is None


async def test_an_attempt_still_committing_is_never_evicted():
    """The window fills while the first attempt commits: its retry still gets its comment, and
    a later retry does not become a second comment."""
    recent = RecentRequests(max_bytes=0)  # every settled comment overflows it at once
    assert recent.claim(("u", "slow"), draft(message="slow")) is None
    retry = recent.claim(("u", "slow"), draft(message="slow"))
    assert retry is not None
    assert recent.claim(("u", "fast"), draft(message="fast")) is None
    recent.settle(("u", "fast"), b'{"id":"2"}')  # overflows: evicts what it may
    recent.settle(("u", "slow"), b'{"id":"1"}')
    assert retry.done() and retry.result() == b'{"id":"1"}'
