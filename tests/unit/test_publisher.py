"""The outbox's publisher keeps each post's stream in queue order, whatever its shard does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from livecomments.config import HistorySettings
from livecomments.live.broker import MemoryBroker
from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.model.stream import DELETE, Entry, Position
from livecomments.storage.publisher import StreamPublisher
from livecomments.storage.queue import WriteAheadQueue
from tests.support.listener import RecordingListener
from tests.support.wait import wait_for


class ShardDownFor(MemoryBroker):
    """A memory broker whose shard does not answer `post`'s first append (a timeout: no error,
    no reconnect, so nobody unparks it); while that append hangs, `meanwhile` is queued."""

    def __init__(self, post: str, meanwhile: Callable[[], Awaitable[object]]) -> None:
        super().__init__(HistorySettings())
        self.post = post
        self.meanwhile = meanwhile
        self.refused = 0

    async def append(self, entries: Sequence[Entry]) -> list[Position | None]:
        if not self.refused and any(e.post_id == self.post for e in entries):
            self.refused = len(entries)
            await self.meanwhile()
            return [None] * len(entries)
        return await super().append(entries)


async def test_a_later_record_of_a_parked_post_waits_for_the_earlier_one(tmp_path: Path):
    """A comment whose append timed out is parked; its deletion, queued meanwhile, must not
    take an offset before it (viewers would get the delete, then the comment, and show it)."""
    queue = WriteAheadQueue(tmp_path / "queue", 1 << 20)
    await queue.open()
    broker = ShardDownFor("p", lambda: queue.enqueue(Deletion(2, "p", 1, 2, "u")))
    listener = RecordingListener(["p"])
    await broker.start(listener)
    publisher = StreamPublisher(queue, broker, lambda post_id, body: None)
    await queue.enqueue(Comment(1, "p", "u", "hello", None, None, 1))
    worker = asyncio.create_task(publisher.worker())
    try:
        await wait_for(lambda: len(listener.of("p")) == 2, 10.0, "both appended")
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await queue.close()
    kinds = [(p.offset, p.kind) for p in listener.of("p")]
    assert kinds[1][1] == DELETE and kinds[0][0] < kinds[1][0], kinds
