"""Retry safety for POST: the same `client_msg_id` from the same `uid` yields the same comment.

Clients that time out and retry a POST send the same `client_msg_id`; within the window (the
last `capacity` ids this instance accepted) the retry gets the original comment back instead of
creating a second one. A retry that arrives while the first attempt is still committing waits
for it. The window is in memory and per instance: a retry after a restart, or to another
instance, creates a new comment.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from livecomments.comment import Comment

Key = tuple[str, str]  # (uid, client_msg_id)


class RecentRequests:
    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[Key, asyncio.Future[Comment]] = OrderedDict()

    def claim(self, key: Key) -> asyncio.Future[Comment] | None:
        """The earlier attempt's future if `key` was seen; else None, and the caller owns it."""
        earlier = self._seen.get(key)
        if earlier is not None:
            return earlier
        self._seen[key] = asyncio.get_running_loop().create_future()
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return None

    def settle(self, key: Key, comment: Comment) -> None:
        future = self._seen.get(key)
        if future is not None and not future.done():
            future.set_result(comment)

    def forget(self, key: Key, error: BaseException) -> None:
        """The attempt failed: waiting retries fail too, later ones may try afresh."""
        future = self._seen.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # mark retrieved: no "never retrieved" warning if nobody waits
