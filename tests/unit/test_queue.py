"""The write-ahead queue: durable on return, group commit, bounded, and it survives damage."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from livecomments.model.comment import Comment
from livecomments.model.deletion import Deletion
from livecomments.storage import queue_file as queue_module
from livecomments.storage.queue import QUEUE_FILE, QueueFull, QueueUnusable, WriteAheadQueue
from tests.support.mounts import remount, tmpfs
from tests.support.wait import wait_for


def comment(i: int, post: str = "p") -> Comment:
    return Comment(i, post, "u", f"message {i}", None, None, 1_700_000_000_000 + i)


async def finish(q: WriteAheadQueue, comments: list[Comment]) -> None:
    """What the flusher and the publisher do: stored, then appended; the row is then done."""
    await q.mark_stored([c.id for c in comments])
    await q.mark_appended({c.id: "epoch" for c in comments})


async def open_queue(path: Path, max_bytes: int = 1 << 20) -> WriteAheadQueue:
    q = WriteAheadQueue(path, max_bytes)
    await q.open()
    return q


async def test_committed_comments_survive_a_reopen(tmp_path: Path):
    q = await open_queue(tmp_path)
    for i in range(1, 6):
        await q.enqueue(comment(i))
    await finish(q, [comment(1)])
    await q.close()

    q = await open_queue(tmp_path)
    assert [c.id for c in q.rows.unstored(100)] == [2, 3, 4, 5]
    assert q.recovered_rows == 4
    assert q.last_id == 5
    await q.close()


async def test_what_is_owed_survives_a_reopen_apart_stored_and_appended(tmp_path: Path):
    """A row leaves the queue once it is both stored and appended; until then a restart owes
    exactly what is missing, no more (a repeat is harmless, a miss is not)."""
    q = await open_queue(tmp_path)
    for i in range(1, 5):
        await q.enqueue(comment(i))
    await q.mark_stored([1, 2])
    await q.mark_appended({2: "e1", 3: "e1"})
    await q.close()

    q = await open_queue(tmp_path)
    assert [c.id for c in q.rows.unstored(100)] == [3, 4]
    assert [row[0] for row in q.rows.unappended(100)] == [1, 4]
    assert q.depth == 3  # 2 is done: stored and appended
    await q.close()


async def test_a_queued_deletion_hides_its_comment_until_it_is_done(tmp_path: Path):
    q = await open_queue(tmp_path)
    for i in range(1, 4):
        await q.enqueue(comment(i))
    await q.enqueue(Deletion(10, "p", 2, 1_700_000_000_010, "u"))
    assert [c.id for c in q.rows.page("p", 10, None, None)] == [1, 3]
    assert q.rows.deleting("p") == {2}
    await q.close()

    q = await open_queue(tmp_path)  # a crash keeps the deletion, and its effect on pages
    assert [c.id for c in q.rows.page("p", 10, None, None)] == [1, 3]
    owed = q.rows.unstored(100)
    assert [type(r).__name__ for r in owed] == ["Comment"] * 3 + ["Deletion"]
    await q.mark_stored([10])
    await q.mark_appended({10: "e1"})
    assert q.rows.deleting("p") == set()  # the database and the stream have it now
    await q.close()


async def test_concurrent_enqueues_share_commits(tmp_path: Path):
    q = await open_queue(tmp_path)
    await asyncio.gather(*(q.enqueue(comment(i)) for i in range(1, 301)))
    assert q.depth == 300
    assert q.commits < 300 / 4, f"{q.commits} commits for 300 comments: no group commit"
    await q.close()


async def test_read_your_writes_index_by_post(tmp_path: Path):
    q = await open_queue(tmp_path)
    await asyncio.gather(*(q.enqueue(comment(i, post=f"p{i % 2}")) for i in range(1, 11)))

    def page(n: int, before: int | None = None, after: int | None = None) -> list[int]:
        return [c.id for c in q.rows.page("p1", n, before, after)]

    assert page(100) == [1, 3, 5, 7, 9]
    assert page(2) == [7, 9]
    assert page(2, before=7) == [3, 5]
    assert page(2, after=1) == [3, 5]
    assert page(10, after=9) == []
    assert q.rows.page("nobody", 5, None, None) == []
    await finish(q, [comment(3, "p1"), comment(5, "p1")])
    assert page(100) == [1, 7, 9]
    assert q.depth == 8
    await q.close()


async def test_full_queue_refuses_instead_of_accepting(tmp_path: Path):
    size = len(comment(1).encode())
    q = await open_queue(tmp_path, max_bytes=size * 3 + 10)
    for i in range(1, 4):
        await q.enqueue(comment(i))
    with pytest.raises(QueueFull):
        await q.enqueue(comment(4))
    await finish(q, [comment(1)])
    await q.enqueue(comment(4))  # room again once something was flushed
    assert q.depth == 3
    await q.close()


async def test_wait_empty_returns_once_everything_is_acked(tmp_path: Path):
    q = await open_queue(tmp_path)
    await q.enqueue(comment(1))
    waiter = asyncio.create_task(q.wait_empty())
    await asyncio.sleep(0)
    assert not waiter.done()
    await finish(q, [comment(1)])
    await asyncio.wait_for(waiter, 5)
    await q.close()


def snapshot_while_open(src: Path, dst: Path) -> None:
    """What a crash leaves on disk: the main file and its WAL, uncheckpointed."""
    dst.mkdir()
    for name in (QUEUE_FILE, QUEUE_FILE + "-wal"):
        shutil.copyfile(src / name, dst / name)


async def test_garbage_after_the_last_commit_is_ignored(tmp_path: Path):
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    q = await open_queue(live)
    for i in range(1, 21):
        await q.enqueue(comment(i))
    snapshot_while_open(live, crashed)
    await q.close()
    with open(crashed / (QUEUE_FILE + "-wal"), "ab") as f:
        f.write(b"\x37\x7f\x06\x82" + b"torn half-written frame" * 50)

    q = await open_queue(crashed)
    assert [c.id for c in q.rows.unstored(100)] == list(range(1, 21))
    await q.close()


async def test_a_torn_last_commit_keeps_every_earlier_commit(tmp_path: Path):
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    q = await open_queue(live)
    for i in range(1, 11):
        await q.enqueue(comment(i))  # acknowledged, one commit each
    await q.enqueue(comment(11))
    snapshot_while_open(live, crashed)
    await q.close()
    wal = crashed / (QUEUE_FILE + "-wal")
    wal.write_bytes(wal.read_bytes()[:-200])  # the crash cut the last commit short

    q = await open_queue(crashed)
    ids = [c.id for c in q.rows.unstored(100)]
    assert ids[:10] == list(range(1, 11))  # every commit before the torn one survived
    await q.close()


async def test_a_file_that_is_not_a_database_is_set_aside(tmp_path: Path, caplog):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / QUEUE_FILE).write_bytes(b"this is not sqlite" * 100)
    q = await open_queue(tmp_path)
    await q.enqueue(comment(1))
    assert q.depth == 1
    await q.close()
    assert list(tmp_path.glob(f"{QUEUE_FILE}.corrupt-*"))
    assert "integrity check" in caplog.text


async def test_a_damaged_page_salvages_readable_rows(tmp_path: Path, caplog):
    q = await open_queue(tmp_path)
    for i in range(1, 2001):
        await q.enqueue(comment(i, post=f"post-{i}"))
    await q.close()  # checkpointed into the main file
    path = tmp_path / QUEUE_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 20 : page * 20 + 200] = b"\xff" * 200  # damage a leaf page of the queue table
    path.write_bytes(bytes(data))

    q = await open_queue(tmp_path)
    ids = [c.id for c in q.rows.unstored(10_000)]
    await q.close()
    assert "integrity check" in caplog.text
    assert 1500 < len(ids) < 2000  # all but the rows of the damaged page
    assert set(ids) <= set(range(1, 2001))
    assert ids == sorted(ids)


async def test_a_salvage_keeps_the_deletions_too(tmp_path: Path, caplog):
    """A damaged file's readable rows are kept, deletions as well as comments (a deletion does
    not decode as a comment: it was once skipped as damage, and the comment came back)."""
    q = await open_queue(tmp_path)
    for i in range(1, 2001):
        await q.enqueue(comment(i, post=f"post-{i}"))
    for i in range(3001, 3011):
        await q.enqueue(Deletion(i, f"post-{i - 3000}", i - 3000, 1, "u"))
    await q.close()
    path = tmp_path / QUEUE_FILE
    data = bytearray(path.read_bytes())
    data[4096 * 20 : 4096 * 20 + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))

    q = await open_queue(tmp_path)
    ids = [c.id for c in q.rows.unstored(10_000)]
    await q.close()
    assert "integrity check" in caplog.text
    assert set(range(3001, 3011)) <= set(ids)


# -- what is not damage: another process, a lock, a read-only directory ------------------------


async def test_a_second_queue_on_the_same_directory_is_refused_with_the_holders_pid(
    tmp_path: Path,
):
    first = await open_queue(tmp_path)
    try:
        with pytest.raises(QueueUnusable, match=rf"{tmp_path}.*in use.*pid {os.getpid()}"):
            await open_queue(tmp_path)
    finally:
        await first.close()
    second = await open_queue(tmp_path)  # the lock went with the first
    await second.close()


async def test_a_healthy_file_locked_elsewhere_is_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(queue_module, "LOCK_WAIT", 0.3)
    q = await open_queue(tmp_path)
    await q.enqueue(comment(1))
    await q.close()
    other = sqlite3.connect(tmp_path / QUEUE_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # a backup tool, an sqlite3 shell
    try:
        with pytest.raises(QueueUnusable, match="locked by another process"):
            await open_queue(tmp_path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not list(tmp_path.glob("*corrupt*"))
    q = await open_queue(tmp_path)
    assert [c.id for c in q.rows.unstored(10)] == [1]
    await q.close()


async def test_a_read_only_directory_is_a_permission_message_not_damage(tmp_path: Path):
    mount = tmp_path / "ro"
    with tmpfs(mount, "1m"):
        q = await open_queue(mount)
        await q.enqueue(comment(1))
        await q.close()
        remount(mount, "ro")
        with pytest.raises(QueueUnusable, match=r"read-only|not writable"):
            await open_queue(mount)
        assert not list(mount.glob("*corrupt*"))


async def test_a_repair_never_resets_the_file_under_a_commit_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The queue is refusing (a write failed) while a group it took before is being fsync'd:
    that group is in neither the waiting list nor the rows, and a repair that judged the file
    empty would reset it right after the commit, losing acknowledged comments on a crash."""
    import threading  # noqa: PLC0415

    from livecomments.storage import queue as queue_mod  # noqa: PLC0415

    monkeypatch.setattr(queue_mod, "REPAIR_INTERVAL", 0.01)
    q = await open_queue(tmp_path)
    gate, entered = threading.Event(), threading.Event()
    commit = q._file.commit

    def held_commit(rows: list[tuple[int, str, bytes]]) -> None:
        entered.set()
        assert gate.wait(10)
        commit(rows)

    monkeypatch.setattr(q._file, "commit", held_commit)
    accepted = asyncio.create_task(q.enqueue(comment(1)))
    await asyncio.to_thread(entered.wait, 10)
    q._cannot_write("a test", OSError("no space"))
    await asyncio.sleep(0.1)  # the repairer has looked (and queued its work behind the commit)
    gate.set()
    await accepted
    await wait_for(lambda: q.write_error is None, 10.0, "the repair")
    await q.close()
    reopened = await open_queue(tmp_path)
    try:
        assert reopened.depth == 1
    finally:
        await reopened.close()
