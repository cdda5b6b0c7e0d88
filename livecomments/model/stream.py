"""What a post's stream is made of: positions, entries going in, publications coming out.

Shared by the outbox that appends (storage/log.py) and the brokers and hub that keep and deliver
streams (live/): a **position** is an `epoch` (a string, new whenever a stream's history was
lost) and an `offset` (1 for a stream's first publication, then one more per publication).
"""

from __future__ import annotations

from dataclasses import dataclass

COMMENT = b"c"  # a publication's kind: a comment (body: its JSON, as the queue wrote it)
DELETE = b"d"  # ... or a deletion (body: the deleted comment's id, in decimal)


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Entry:
    """What the outbox asks a broker to append: one comment (or deletion) of one post. The
    comment id makes a repeated append harmless: the stream keeps its first offset."""

    comment_id: int
    post_id: str
    kind: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class Publication:
    """An entry as its stream placed it."""

    post_id: str
    epoch: str
    offset: int
    kind: bytes
    body: bytes
