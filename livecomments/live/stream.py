"""One post's live stream on this node: where its viewers are, and who is still catching up.

The hub keeps one `PostStream` per post with local viewers. Its `position` is the last
publication delivered to `subs`, who are caught up: each of them has had every publication of
this epoch up to it, once, in order. The stream moves only by `deliver` (the next offset) or
`reset` (another epoch, or a gap the history no longer holds), so `subs` never see a jump.

A viewer that comes back with a position is a `Joiner` until its missing publications have been
read from the history: it holds the frames delivered meanwhile, so nothing can fall between the
history it is sent and the live stream it joins.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import orjson

from livecomments.live import events
from livecomments.live.conn import text_frame
from livecomments.model.stream import COMMENT, DELETE, Position, Publication

# Publications held for a stream that is filling a gap, and frames for one joiner, before they
# are given up on (the history has them: the stream refills, the joiner reloads).
MAX_HELD = 10_000


class Subscriber(Protocol):
    """What the hub needs of a socket (conn.Conn; tests use a fake)."""

    def offer(self, frame: bytes) -> bool:
        """Queue a complete WebSocket frame without awaiting; False if the socket dropped it."""


@dataclass(eq=False)
class Joiner:
    sub: Subscriber
    since: Position
    held: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, frame) meanwhile
    spoiled: bool = False  # an epoch change or too much held: it cannot be recovered

    def hold(self, offset: int, frame: bytes) -> None:
        if len(self.held) >= MAX_HELD:
            self.spoiled = True
            self.held.clear()
        elif not self.spoiled:
            self.held.append((offset, frame))


class PostStream:
    def __init__(self, post_id: str) -> None:
        self.post_id = post_id
        self.subs: set[Subscriber] = set()
        self.joiners: set[Joiner] = set()
        self.position: Position | None = None  # None: not known yet (its shard is down)
        self.followed = False  # the broker has been asked to follow it
        self.filling = False
        self.refill = False
        # Publications that arrived out of order or while filling, by (epoch, offset).
        self.waiting: dict[tuple[str, int], Publication] = {}

    @property
    def empty(self) -> bool:
        return not self.subs and not self.joiners

    def deliver(self, publication: Publication) -> int:
        """The next publication: framed once, offered to every caught-up viewer, held for every
        joiner. Returns how many sockets took it."""
        frame = text_frame(events.publication(publication))
        taken = 0
        for sub in self.subs:
            taken += sub.offer(frame)
        for joiner in self.joiners:
            joiner.hold(publication.offset, frame)
        self.position = Position(publication.epoch, publication.offset)
        return taken

    def reset(self, position: Position) -> None:
        """Continue from `position` (another epoch, or past what the history holds): every
        caught-up viewer is told to reload; no joiner can be recovered any more."""
        self.position = position
        frame = text_frame(events.reset(self.post_id, position))
        for sub in self.subs:
            sub.offer(frame)
        for joiner in self.joiners:
            joiner.spoiled = True
            joiner.held.clear()
        self.waiting = {k: p for k, p in self.waiting.items() if k[0] == position.epoch}

    def wait(self, publication: Publication) -> None:
        if len(self.waiting) >= MAX_HELD:
            self.waiting.clear()  # the history has them; the fill that follows reads them there
        self.waiting[(publication.epoch, publication.offset)] = publication

    def drain_waiting(self) -> bool:
        """Deliver what waited and is next; False if a gap remains (fill again)."""
        position = self.position
        if position is None:
            return not self.waiting
        for key in sorted(k for k in self.waiting if k[0] == position.epoch):
            publication = self.waiting.pop(key)
            assert self.position is not None
            if publication.offset <= self.position.offset:
                continue
            if publication.offset != self.position.offset + 1:
                self.waiting[key] = publication
                return False
            self.deliver(publication)
        # Anything left is of another epoch: only the history can say which is current.
        return not self.waiting

    def finish_join(self, joiner: Joiner, publications: list[Publication] | None) -> bool:
        """Make a joiner a caught-up viewer: `subscribed`, then what it missed from the history
        (`publications`, None if the history could not be read), then what was delivered while
        it was read. True if it recovered; otherwise it reloads and continues from here."""
        self.joiners.discard(joiner)
        position = self.position
        frames = None
        if position is not None and publications is not None and not joiner.spoiled:
            frames = _recovery(joiner, position, publications)
        joiner.sub.offer(text_frame(events.subscribed(self.post_id, position, frames is not None)))
        for frame in frames or ():
            joiner.sub.offer(frame)
        self.subs.add(joiner.sub)
        return frames is not None


def _recovery(
    joiner: Joiner, position: Position, publications: list[Publication]
) -> list[bytes] | None:
    """The frames for offsets since + 1 .. position, if history and held frames cover them."""
    if position.epoch != joiner.since.epoch:
        return None
    replay = [p for p in publications if joiner.since.offset < p.offset <= position.offset]
    upto = replay[-1].offset if replay else joiner.since.offset
    held = [(offset, frame) for offset, frame in joiner.held if upto < offset <= position.offset]
    offsets = [p.offset for p in replay] + [offset for offset, _ in held]
    if offsets != list(range(joiner.since.offset + 1, position.offset + 1)):
        return None
    return [text_frame(event) for event in events.replay(_taken_down(replay))] + [
        frame for _, frame in held
    ]


def _taken_down(publications: list[Publication]) -> list[Publication]:
    """A replay never shows a comment that a later publication of the same replay deletes: it
    keeps the comment's offset, as a deletion (the client shows nothing, and counts it)."""
    deleted = {p.body for p in publications if p.kind == DELETE}
    if not deleted:
        return publications
    return [
        replace(p, kind=DELETE, body=_id_of(p.body))
        if p.kind == COMMENT and _id_of(p.body) in deleted
        else p
        for p in publications
    ]


def _id_of(comment_json: bytes) -> bytes:
    return str(orjson.loads(comment_json)["id"]).encode()
