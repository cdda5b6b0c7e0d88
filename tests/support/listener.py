"""A stand-in for the hub, as a broker sees it (a `StreamListener`): it records what the
broker hands it, for the broker contract and the Redis broker's own tests."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from livecomments.model.stream import Publication


class RecordingListener:
    def __init__(self, posts: Iterable[str] = ()) -> None:
        self.posts: set[str] = set(posts)  # what `local_posts()` says this node follows
        self.publications: list[Publication] = []
        self.gaps: list[str] = []

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)

    def on_stream_gap(self, post_ids: Iterable[str]) -> None:
        self.gaps.extend(post_ids)

    def local_posts(self) -> Collection[str]:
        return self.posts

    def of(self, post_id: str) -> list[Publication]:
        return [p for p in self.publications if p.post_id == post_id]

    def offsets(self, post_id: str) -> list[int]:
        return [p.offset for p in self.of(post_id)]

    def got(self, post_id: str, body: bytes) -> int:
        """How many times `body` was handed over for the post."""
        return sum(1 for p in self.of(post_id) if p.body == body)
