"""A full disk under the write-ahead queue: the real cause is said, /readyz is 503, nothing that
was acknowledged is lost, and the service takes comments again by itself once there is room."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounts import tmpfs

WRITERS = 8


async def post_until_refused(http, url: str) -> tuple[list[str], list[dict[str, Any]]]:
    """8 writers post ~1.5 kB comments until the queue refuses 20 in a row (bounded)."""
    acked: list[str] = []
    refusals: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(1500):
            if stop.is_set():
                return
            body = {
                "post_id": f"full-{i % 10}",
                "uid": f"w{w}",
                "message": f"{w}-{i} " + "x" * 1500,
            }
            async with http.post(f"{url}/v1/comments", json=body) as r:
                if r.status == 201:
                    acked.append((await r.json())["comment"]["id"])
                    continue
                assert r.status == 503, await r.text()
                refusals.append(await r.json())
                if len(refusals) >= 20:
                    stop.set()

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return acked, refusals


@pytest.mark.fault
@pytest.mark.parametrize("room", ["freed by someone", "the queue's own file"])
async def test_a_full_queue_disk_refuses_plainly_and_recovers_by_itself(
    start_server, http, tmp_path: Path, room: str
):
    """Either someone frees room, or the space is the queue's own file and, once everything in
    it is flushed to the store, the queue starts a new one."""
    with tmpfs(tmp_path / "queue", "2m") as queue_dir:
        filler = queue_dir / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024))
        server = start_server(env={"LIVECOMMENTS_QUEUE_DIR": str(queue_dir)})
        acked, refusals = await post_until_refused(http, server.url)
        assert acked and refusals
        error = refusals[-1]["error"]
        assert error["code"] == "queue_unavailable"
        assert "full" in error["message"], error  # SQLite's "database or disk is full"
        assert "no transaction is active" not in error["message"]
        async with http.get(f"{server.url}/readyz") as r:
            ready = await r.json()
            assert r.status == 503 and "queue_unwritable" in ready["not_ready"], ready
            assert "full" in ready["store"]["queue_error"]
        assert "database or disk is full" in server.logs()

        if room == "freed by someone":
            filler.unlink()  # no restart, no operator action on the service
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            body = {"post_id": "full-0", "uid": "after", "message": "room again"}
            async with http.post(f"{server.url}/v1/comments", json=body) as r:
                status = r.status
                if status == 201:
                    acked.append((await r.json())["comment"]["id"])
                    break
            await asyncio.sleep(0.2)
        assert status == 201, server.logs()
        async with http.get(f"{server.url}/readyz") as r:
            assert r.status == 200, await r.text()

        listed: set[str] = set()
        for p in [f"full-{i}" for i in range(10)]:
            params = {"post_id": p, "limit": "200", "after": "0"}
            while True:
                async with http.get(f"{server.url}/v1/comments", params=params) as r:
                    assert r.status == 200
                    page = await r.json()
                listed.update(c["id"] for c in page["comments"])
                if not page["has_more"]:
                    break
                params["after"] = page["comments"][-1]["id"]
        assert set(acked) <= listed, len(set(acked) - listed)
        assert server.stop() == 0
