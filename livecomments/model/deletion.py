"""A comment taken down: the record that travels the same way a comment does.

A deletion is made durable in the write-ahead queue like a comment (with an id of its own, from
the same generator), then stored (a tombstone in the database: the comment's row stays, so a
late insert of it cannot bring it back) and appended to the post's stream, where it has an offset
like a comment: every viewer gets `{"type":"delete",...}` in stream order, and one who recovers
across it never sees the comment again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# How a queued deletion's bytes start; a queued comment's start with '{"id"'.
MARK = b'{"delete":'


@dataclass(frozen=True, slots=True)
class Deletion:
    id: int  # the deletion's own id: its place in the queue and its dedupe key in the stream
    post_id: str
    target: int  # the deleted comment's id
    deleted_at: int  # Unix ms
    by: str  # who: a uid, "moderator:<uid>" or "server"

    def encode(self) -> bytes:
        # Copied, as Comment.encode does: orjson's bytes keep its whole output buffer, and
        # the queue holds these until they are stored and appended.
        return memoryview(
            orjson.dumps(
                {
                    "delete": str(self.target),
                    "id": str(self.id),
                    "post_id": self.post_id,
                    "deleted_at": self.deleted_at,
                    "by": self.by,
                }
            )
        ).tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> Deletion:
        data: dict[str, Any] = orjson.loads(payload)
        return cls(
            int(data["id"]),
            data["post_id"],
            int(data["delete"]),
            int(data["deleted_at"]),
            data["by"],
        )


def is_deletion(payload: bytes) -> bool:
    return payload.startswith(MARK)
