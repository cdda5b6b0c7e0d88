"""The write-ahead queue's memory: every comment it holds, and what is still owed to each.

A comment stays in the queue (the outbox) until it is both **stored** (in the database, by the
flusher) and **appended** (to its post's stream, by the publisher). Meanwhile it is here too, so
that the flusher and the publisher each take their oldest work without reading the file, and a
GET lists it before the database has it (read-your-writes).

Comments are kept as the bytes the queue wrote (a third of the memory of `Comment` objects), in
id order (= commit order: ids are issued and queued without an await between). Nothing here
awaits or touches the file; queue.py persists every change.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Collection, Iterable

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion, is_deletion

Row = tuple[int, str, bytes]  # (comment id, post id, the comment's encoded bytes)


class PendingRows:
    def __init__(self) -> None:
        self._payloads: dict[int, bytes] = {}
        self._by_post: dict[str, list[int]] = {}
        self._unstored: dict[int, None] = {}  # an ordered set
        self._unappended: dict[int, str] = {}  # id -> post id, in id order
        # Appended but not stored yet: id -> (post id, the epoch it was appended in). Should that
        # epoch end (its shard restarted empty) before the database has the comment, it is
        # appended again: nobody could otherwise find it (storage/log.py, verify_appended).
        self.appended_unstored: dict[int, tuple[str, str]] = {}
        # Queued deletions: post -> the comment ids they delete, and each deletion's own id ->
        # (post, target), so that a page never lists what a queued deletion took down.
        self._deleting: dict[str, set[int]] = {}
        self._deletions: dict[int, tuple[str, int]] = {}
        self.bytes = 0
        self.has_unstored = asyncio.Event()
        self.has_unappended = asyncio.Event()
        self.all_appended = asyncio.Event()
        self.all_appended.set()
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self, row: Row, *, stored: bool = False, epoch: str | None = None) -> bool:
        """Hold a committed comment; False if it is owed nothing (a delete lost in a crash)."""
        comment_id, post_id, payload = row
        if stored and epoch is not None:
            return False
        self._payloads[comment_id] = payload
        if is_deletion(payload):
            target = Deletion.decode(payload).target
            self._deleting.setdefault(post_id, set()).add(target)
            self._deletions[comment_id] = (post_id, target)
        else:
            ids = self._by_post.setdefault(post_id, [])
            if not ids or ids[-1] < comment_id:
                ids.append(comment_id)
            else:
                bisect.insort(ids, comment_id)
        self.bytes += len(payload)
        if not stored:
            self._unstored[comment_id] = None
            self.has_unstored.set()
        if epoch is None:
            self._unappended[comment_id] = post_id
            self.has_unappended.set()
            self.all_appended.clear()
        elif not stored:
            self.appended_unstored[comment_id] = (post_id, epoch)
        self.empty.clear()
        return True

    # -- what is owed --------------------------------------------------------------------------

    def unstored(self, limit: int) -> list[Comment | Deletion]:
        """Up to `limit` comments (and deletions) the database does not have yet, oldest
        first."""
        ids = itertools.islice(self._unstored, limit)
        return [_decode(self._payloads[i]) for i in ids]

    def unappended(self, limit: int, skip_posts: Collection[str] = ()) -> list[Row]:
        """Up to `limit` comments not appended to their stream yet, oldest first, none of the
        posts in `skip_posts` (whose shard is not answering: their comments wait, in order)."""
        rows: list[Row] = []
        for comment_id, post_id in self._unappended.items():
            if post_id not in skip_posts:
                rows.append((comment_id, post_id, self._payloads[comment_id]))
                if len(rows) == limit:
                    break
        return rows

    def unappended_count(self) -> int:
        return len(self._unappended)

    def mark_stored(self, ids: Iterable[int]) -> list[int]:
        """The database has these; returns those now owed nothing (to delete)."""
        finished: list[tuple[int, str]] = []
        for comment_id in ids:
            if comment_id not in self._unstored:
                continue
            del self._unstored[comment_id]
            appended = self.appended_unstored.pop(comment_id, None)
            if appended is not None:
                finished.append((comment_id, appended[0]))
        if not self._unstored:
            self.has_unstored.clear()
        return self._forget(finished)

    def mark_appended(self, epochs: dict[int, str]) -> list[int]:
        """These are in their streams (in these epochs); returns those now owed nothing."""
        finished: list[tuple[int, str]] = []
        for comment_id, epoch in epochs.items():
            post_id = self._unappended.pop(comment_id, None)
            if post_id is None:
                continue
            if comment_id in self._unstored:
                self.appended_unstored[comment_id] = (post_id, epoch)
            else:
                finished.append((comment_id, post_id))
        if not self._unappended:
            self.has_unappended.clear()
            self.all_appended.set()
        return self._forget(finished)

    def mark_unappended(self, ids: Iterable[int]) -> list[int]:
        """Their epoch ended before the database had them: append them again."""
        again = []
        for comment_id in ids:
            entry = self.appended_unstored.pop(comment_id, None)
            if entry is not None:
                self._unappended[comment_id] = entry[0]
                again.append(comment_id)
        if again:
            # Ids are appended in id order; put these back in theirs.
            self._unappended = dict(sorted(self._unappended.items()))
            self.has_unappended.set()
            self.all_appended.clear()
        return again

    def _forget(self, rows: list[tuple[int, str]]) -> list[int]:
        gone_by_post: dict[str, set[int]] = {}
        for comment_id, post_id in rows:
            self.bytes -= len(self._payloads.pop(comment_id))
            deletion = self._deletions.pop(comment_id, None)
            if deletion is not None:
                targets = self._deleting[deletion[0]]
                targets.discard(deletion[1])
                if not targets:
                    del self._deleting[deletion[0]]
                continue
            gone_by_post.setdefault(post_id, set()).add(comment_id)
        for post_id, gone in gone_by_post.items():
            self._forget_ids(post_id, gone)
        if not self._payloads:
            self.empty.set()
        return [comment_id for comment_id, _ in rows]

    def _forget_ids(self, post_id: str, gone: set[int]) -> None:
        ids_of_post = self._by_post[post_id]
        # What goes is usually the oldest: one slice deletion per post and batch, not one list
        # shift per comment (a hot post's list is long).
        k = len(gone)
        if set(ids_of_post[:k]) == gone:
            del ids_of_post[:k]
        else:
            ids_of_post[:] = [i for i in ids_of_post if i not in gone]
        if not ids_of_post:
            del self._by_post[post_id]

    # -- for readers ---------------------------------------------------------------------------

    def page(self, post_id: str, n: int, before: int | None, after: int | None) -> list[Comment]:
        """The queued comments a page could need: at most `n`, ascending, found by bisection
        (a hot post's backlog can be long; only what is returned is decoded). `after`: the
        oldest n newer than it; otherwise the newest n (older than `before`, if given)."""
        ids = self._by_post.get(post_id, [])
        deleted = self._deleting.get(post_id, set())
        if deleted:
            ids = [i for i in ids if i not in deleted]
        if after is not None:
            start = bisect.bisect_right(ids, after)
            window = ids[start : start + n]
        else:
            end = len(ids) if before is None else bisect.bisect_left(ids, before)
            window = ids[max(0, end - n) : end]
        return [Comment.decode(self._payloads[i]) for i in window]

    def deleting(self, post_id: str) -> set[int]:
        """The comment ids of the post that a queued deletion takes down."""
        return self._deleting.get(post_id, set())

    def payload(self, comment_id: int) -> bytes | None:
        return self._payloads.get(comment_id)

    def ids(self) -> list[int]:
        return list(self._payloads)

    def __len__(self) -> int:
        return len(self._payloads)

    def __contains__(self, comment_id: object) -> bool:
        return comment_id in self._payloads

    def oldest_age_seconds(self) -> float:
        first = next(iter(self._payloads.values()), None)
        if first is None:
            return 0.0
        record = _decode(first)
        created = record.deleted_at if isinstance(record, Deletion) else record.created_at
        return max(0.0, time.time() - created / 1000)


def _decode(payload: bytes) -> Comment | Deletion:
    return Deletion.decode(payload) if is_deletion(payload) else Comment.decode(payload)
