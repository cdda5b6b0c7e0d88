"""The wire format of a publication on a post's Redis channel, built by the APPEND script
(streams.py) and read here: `b"2" + epoch + kind + offset + b"|" + body`.

A version byte; the stream's epoch (16 hex digits); the kind (`c` a comment, `d` a deletion);
the offset in decimal; `|`; the body as the outbox wrote it (a comment's JSON: the hub wraps it
into the event without decoding it). A node reads every publication of the posts it follows,
its own included: local viewers get comments from the stream like everyone else.
"""

from __future__ import annotations

from livecomments.model.stream import Publication

VERSION = b"2"
EPOCH_LEN = 16
_KIND_AT = 1 + EPOCH_LEN
_MAX_OFFSET_DIGITS = 19


def pack(epoch: str, offset: int, kind: bytes, body: bytes) -> bytes:
    """What the script publishes (here for tests and for tools that publish by hand)."""
    return VERSION + epoch.encode() + kind + b"%d|" % offset + body


def unpack(post_id: str, data: bytes) -> Publication | None:
    """The publication, or None if `data` is not one (another version, cut short, garbage)."""
    if len(data) < _KIND_AT + 3 or data[:1] != VERSION:
        return None
    bar = data.find(b"|", _KIND_AT + 1, _KIND_AT + 2 + _MAX_OFFSET_DIGITS)
    digits = data[_KIND_AT + 1 : bar]
    if bar < 0 or not digits.isdigit():
        return None
    try:
        epoch = data[1:_KIND_AT].decode("ascii")
    except UnicodeDecodeError:
        return None
    kind = data[_KIND_AT : _KIND_AT + 1]
    return Publication(post_id, epoch, int(digits), kind, data[bar + 1 :])
