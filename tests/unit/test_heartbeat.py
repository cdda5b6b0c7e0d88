"""conn.Heartbeat: who gets pinged, who gets cut, on a fake clock."""

from __future__ import annotations

from livecomments.live.conn import PING_FRAME, pong_frame
from livecomments.live.heartbeat import Heartbeat


class FakeConn:
    def __init__(self, last_seen: float) -> None:
        self.last_seen = last_seen
        self.pinged_at: float | None = None
        self.closing = False
        self.frames: list[bytes] = []
        self.aborted = False

    def offer(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def abort(self) -> None:
        self.aborted = True
        self.closing = True

    def heard(self, now: float) -> None:
        self.last_seen = now
        self.pinged_at = None


def test_quiet_sockets_are_pinged_and_silent_ones_cut():
    quiet, chatty = FakeConn(last_seen=0.0), FakeConn(last_seen=25.0)
    beat = Heartbeat([quiet, chatty], interval=30.0)  # type: ignore[list-item]
    assert beat.tick(30.0) == 0
    assert quiet.frames == [PING_FRAME] and chatty.frames == []
    assert beat.tick(37.5) == 0  # pinged 7.5 s ago: still has time to answer
    assert beat.tick(45.0) == 1  # 15 s (interval / 2) without a word since the ping
    assert quiet.aborted and not chatty.aborted


def test_any_frame_after_a_ping_counts_as_an_answer():
    conn = FakeConn(last_seen=0.0)
    beat = Heartbeat([conn], interval=10.0)  # type: ignore[list-item]
    beat.tick(10.0)
    conn.heard(12.0)  # a pong, or any other frame
    assert beat.tick(15.0) == 0 and not conn.aborted
    assert conn.frames == [PING_FRAME]  # not pinged again until quiet for a whole interval
    beat.tick(22.5)
    assert conn.frames == [PING_FRAME, PING_FRAME]


def test_pong_echoes_at_most_a_control_frame_of_payload():
    assert pong_frame(b"abc") == b"\x8a\x03abc"
    assert len(pong_frame(b"x" * 500)) == 2 + 125
