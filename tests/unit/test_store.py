"""store.Comments: read-your-writes while the flusher moves comments under a reader's feet."""

from __future__ import annotations

import asyncio
from pathlib import Path

from livecomments.model.comment import Comment
from livecomments.storage.base import PageQuery
from livecomments.storage.log import DurableLog
from livecomments.storage.queue import WriteAheadQueue
from livecomments.storage.sqlite import SQLiteStore


class ReadThenWait(SQLiteStore):
    """A read that has its rows but has not returned yet (the database answered, the event
    loop has not resumed the reader): the test flushes in between."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.read_done = asyncio.Event()
        self.gate = asyncio.Event()

    async def page(self, query: PageQuery) -> list[Comment]:
        rows = await super().page(query)
        self.read_done.set()
        await self.gate.wait()
        return rows


async def test_a_comment_flushed_during_a_read_is_still_listed(tmp_path: Path):
    queue = WriteAheadQueue(tmp_path / "queue", 1 << 20)
    await queue.open()
    store = ReadThenWait(f"sqlite:///{tmp_path}/c.db")
    await store.open()
    comments = DurableLog(queue, store, flush_batch=100, retry_max=1)
    c = Comment(1, "p", "u", "acknowledged", None, None, 1)
    await comments.accept(c)

    reading = asyncio.create_task(comments.page(PageQuery("p", 50)))
    await asyncio.wait_for(store.read_done.wait(), 5)  # the database did not have it yet
    await store.insert_many([c])  # what the flusher does meanwhile: store, then forget
    await queue.mark_stored([c.id])
    await queue.mark_appended({c.id: "epoch"})
    store.gate.set()
    listed, _ = await asyncio.wait_for(reading, 5)
    assert [x.id for x in listed] == [1], "an acknowledged comment vanished from GET"
    await queue.close()
    await store.close()
