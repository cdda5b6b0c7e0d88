"""The wire format of a message on a post's Redis channel, and the filter of repeats.

`b"1" + origin + seq + kind + body`: a version byte; the publishing bridge's random node id (16
hex digits, new at every start); its sequence number (16 hex digits); then `b"|"` and the hub's
encoded event, delivered as is (encode once), or `b"!"` and a Unix-ms time (a LOST notice: events
of this post published since then were dropped).

A bridge drops its own echo by origin, and `OriginSequences` drops a (origin, seq) no newer than
the last seen from that origin on that server: a retried batch whose first attempt reached
Redis after all is not delivered twice. (One worker publishes to a server in order, so each
origin's sequence only grows on each server.)
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = b"1"
EVENT = b"|"  # the header's last byte: an event follows
LOST = b"!"  # ... or a time: events of this post were dropped, resync its subscribers
ID_LEN = 16  # hex digits of the node id and of the sequence number
HEADER_LEN = 1 + ID_LEN + ID_LEN + 1
# Origins whose last sequence number we remember per server (one per instance start).
MAX_ORIGINS = 4096


@dataclass(frozen=True, slots=True)
class Envelope:
    origin: bytes
    seq: int
    kind: bytes  # EVENT or LOST
    body: bytes

    @property
    def lost_since_ms(self) -> int:
        """For a LOST notice: when the oldest dropped event was published (0 if unreadable)."""
        return int(self.body) if self.body.isdigit() else 0


def pack_event(origin: bytes, seq: int, payload: bytes) -> bytes:
    return VERSION + origin + b"%016x" % seq + EVENT + payload


def pack_lost_notice(origin: bytes, seq: int, since_ms: int) -> bytes:
    """`since_ms`: when the oldest dropped event of this post was published (Unix ms)."""
    return VERSION + origin + b"%016x" % seq + LOST + b"%d" % since_ms


def unpack(data: bytes) -> Envelope | None:
    """The envelope, or None if `data` is not one (another version, cut short, garbage)."""
    if len(data) < HEADER_LEN or data[:1] != VERSION:
        return None
    kind = data[HEADER_LEN - 1 : HEADER_LEN]
    if kind not in (EVENT, LOST):
        return None
    try:
        seq = int(data[1 + ID_LEN : 1 + 2 * ID_LEN], 16)
    except ValueError:
        return None
    return Envelope(data[1 : 1 + ID_LEN], seq, kind, data[HEADER_LEN:])


class OriginSequences:
    """The last sequence number seen from each origin on one server."""

    def __init__(self, max_origins: int = MAX_ORIGINS) -> None:
        self._last: dict[bytes, int] = {}
        self._max = max_origins

    def is_new(self, origin: bytes, seq: int) -> bool:
        """True, and remembered, if `seq` is newer than the last seen from `origin`."""
        last = self._last.pop(origin, None)
        if last is not None and seq <= last:
            self._last[origin] = last
            return False
        self._last[origin] = seq  # re-inserted last: the dict's order is least recent first
        if len(self._last) > self._max:
            del self._last[next(iter(self._last))]
        return True
