"""The Redis wire format, alone: what a node publishes is what another node reads back."""

from __future__ import annotations

import pytest

from livecomments.live.redis import envelope
from livecomments.live.redis.envelope import OriginSequences, pack_event, pack_lost_notice, unpack

ORIGIN = b"0123456789abcdef"


def test_an_event_round_trips_with_its_payload_untouched():
    payload = b'{"type":"comment","comment":{"message":"h\xc3\xa9 | !"}}'
    packed = pack_event(ORIGIN, 42, payload)
    assert packed.startswith(envelope.VERSION + ORIGIN)
    message = unpack(packed)
    assert message == envelope.Envelope(ORIGIN, 42, envelope.EVENT, payload)


def test_a_lost_notice_carries_when_the_loss_began():
    message = unpack(pack_lost_notice(ORIGIN, 7, 1_795_000_000_123))
    assert message is not None and message.kind == envelope.LOST
    assert message.lost_since_ms == 1_795_000_000_123


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"1",
        b"2" + ORIGIN + b"%016x" % 1 + b"|{}",  # another version
        b"1" + ORIGIN + b"not-hex-at-all!!" + b"|{}",
        b"1" + ORIGIN + b"%016x" % 1 + b"?{}",  # neither an event nor a notice
        b"1" + ORIGIN[:8],  # cut short
    ],
)
def test_anything_else_is_refused_not_guessed(data: bytes):
    assert unpack(data) is None


def test_a_retried_batch_is_recognised_per_origin():
    seen = OriginSequences()
    assert seen.is_new(b"a", 1) and seen.is_new(b"a", 2)
    assert not seen.is_new(b"a", 2) and not seen.is_new(b"a", 1)  # the retry's repeats
    assert seen.is_new(b"b", 1)  # another origin has its own sequence


def test_origins_are_remembered_up_to_a_bound_least_recent_first():
    seen = OriginSequences(max_origins=2)
    seen.is_new(b"a", 5)
    seen.is_new(b"b", 5)
    seen.is_new(b"a", 6)  # a is now the most recent
    seen.is_new(b"c", 5)  # evicts b
    assert not seen.is_new(b"a", 6)
    assert seen.is_new(b"b", 1)  # forgotten: taken as new
