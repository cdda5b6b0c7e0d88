"""Retry safety for POST: the same `client_msg_id` from the same `uid` yields the same comment.

Clients that time out and retry a POST send the same `client_msg_id`; within the window the retry
gets the original comment back (201, same body) instead of creating a second one. A retry that
arrives while the first attempt is still committing waits for it. A `client_msg_id` reused for
a different comment (another post, another message) is refused with 409, never answered with
the old comment as if the new one had been stored.

The window is the most recent comments whose encoded size adds up to `max_bytes` (memory is
bounded by bytes, not by a count any client could fill with large messages). It is in memory
and per instance: a retry after a restart, or to another instance, creates a new comment.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from livecomments.api.errors import ApiError
from livecomments.model.comment import Draft

Key = tuple[str, str]  # (uid, client_msg_id)

# Bookkeeping per remembered comment beyond its encoded bytes (key, digest, future, entry).
ENTRY_OVERHEAD = 400


def fingerprint(draft: Draft) -> bytes:
    """What makes two POSTs the same comment: a digest of every field the client chose."""
    parts = (draft.post_id, draft.uid, draft.message, draft.parent_id or "", draft.reply_to or "")
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=16).digest()


@dataclass(slots=True)
class _Attempt:
    digest: bytes
    future: asyncio.Future[bytes]  # the comment's JSON once it is durable
    size: int = 0  # counted once settled


class RecentRequests:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._seen: OrderedDict[Key, _Attempt] = OrderedDict()

    def claim(self, key: Key, draft: Draft) -> asyncio.Future[bytes] | None:
        """The earlier attempt's future if `key` was seen with the same comment; None if not
        (the caller owns the key now). Raises ApiError 409 if it was seen with another one."""
        digest = fingerprint(draft)
        earlier = self._seen.get(key)
        if earlier is not None:
            if earlier.digest != digest:
                raise ApiError(
                    409,
                    "client_msg_id_reused",
                    "client_msg_id: already used by this uid for a different comment",
                )
            return earlier.future
        self._seen[key] = _Attempt(digest, asyncio.get_running_loop().create_future())
        return None

    def settle(self, key: Key, comment_json: bytes) -> None:
        attempt = self._seen.get(key)
        if attempt is None or attempt.future.done():
            return
        attempt.future.set_result(comment_json)
        attempt.size = len(comment_json) + ENTRY_OVERHEAD
        self._bytes += attempt.size
        while self._bytes > self._max_bytes:
            # The oldest settled one: an attempt still committing stays, or its retries would
            # wait on a future nobody settles, and a third attempt would store it twice.
            oldest = next((k for k, a in self._seen.items() if a.future.done()), None)
            if oldest is None:
                break
            self._bytes -= self._seen.pop(oldest).size

    def forget(self, key: Key, error: ApiError) -> None:
        """The attempt failed: waiting retries get `error`, later ones may try afresh."""
        attempt = self._seen.pop(key, None)
        if attempt is not None:
            self._bytes -= attempt.size
            if not attempt.future.done():
                attempt.future.set_exception(error)
                attempt.future.exception()  # retrieved: no warning if nobody was waiting
