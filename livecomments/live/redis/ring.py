"""Which Redis server carries a post's live traffic: a consistent-hash ring over `redis.urls`.

Every instance must map a post to the same server without talking to the others, so the ring
depends on nothing but the list of servers and the post id:

* The hash is `stable_hash`: the first 8 bytes of BLAKE2b (digest_size=8, no key, no salt) of
  the UTF-8 text, read as a big-endian unsigned 64-bit integer. It is the same in every process
  and on every platform; Python's `hash()` is salted per process and must never be used here.
* Each server is placed on the ring at `VNODES` points, `stable_hash(f"{key}#{i}")` for
  i in 0..VNODES-1, where `key` is the server's URL without its password (`urls.redact_url`):
  changing a password does not move posts, and the order of the list does not matter.
* A post belongs to the first point clockwise from `stable_hash(post_id)`.

Adding one server to N moves about 1/(N+1) of the posts, all of them to the new server; removing
one moves only the posts it carried. With 160 points per server the share of each server stays
within about 10% of 1/N.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from livecomments.urls import redact_url

# Points per server: more points, smoother shares, a bigger (still tiny) table to search.
VNODES = 160


def stable_hash(text: str) -> int:
    """The ring's hash: BLAKE2b-64 of the UTF-8 text, big-endian. Identical in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """An immutable ring over a non-empty list of server URLs."""

    __slots__ = ("_hashes", "_owners", "urls")

    def __init__(self, urls: Iterable[str], vnodes: int = VNODES) -> None:
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(urls))
        if not self.urls:
            raise ValueError("a ring needs at least one server")
        points: list[tuple[int, str]] = []
        for url in self.urls:
            key = redact_url(url)
            points.extend((stable_hash(f"{key}#{i}"), url) for i in range(vnodes))
        # Ties (two points with one hash) are broken by URL, so every instance agrees on them.
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [url for _, url in points]

    def node_for(self, post_id: str) -> str:
        """The URL of the server that carries `post_id`."""
        i = bisect.bisect_right(self._hashes, stable_hash(post_id))
        return self._owners[i % len(self._owners)]
