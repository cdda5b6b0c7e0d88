"""The Redis wire format, alone: what the APPEND script publishes is what a node reads back."""

from __future__ import annotations

import pytest

from livecomments.live.redis.envelope import pack, unpack
from livecomments.model.stream import COMMENT, DELETE, Publication

EPOCH = "0123456789abcdef"


def test_a_comment_round_trips_with_its_body_untouched():
    body = b'{"id":"1","message":"h\xc3\xa9 | 42|"}'
    data = pack(EPOCH, 42, COMMENT, body)
    assert unpack("p", data) == Publication("p", EPOCH, 42, COMMENT, body)


def test_a_deletion_and_a_large_offset():
    data = pack(EPOCH, 10**12, DELETE, b"383391481420840960")
    assert unpack("p", data) == Publication("p", EPOCH, 10**12, DELETE, b"383391481420840960")


def test_what_the_lua_script_builds_is_what_pack_builds():
    # '2' .. epoch .. kind .. offset .. '|' .. body, as in streams.APPEND
    assert b"2" + EPOCH.encode() + b"c" + b"7" + b"|" + b"{}" == pack(EPOCH, 7, COMMENT, b"{}")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"2",
        b"1" + EPOCH.encode() + b"c7|{}",  # another version
        b"2" + EPOCH.encode() + b"cx|{}",  # no offset
        b"2" + EPOCH.encode() + b"c7{}",  # no bar
        b"2" + EPOCH.encode() + b"c" + b"9" * 30 + b"|{}",  # an offset beyond reason
        b"2" + b"\xff" * 16 + b"c7|{}",  # an epoch that is not text
    ],
)
def test_anything_else_is_refused_not_guessed(data: bytes):
    assert unpack("p", data) is None
