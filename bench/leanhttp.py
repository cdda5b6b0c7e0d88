"""The comment poster: keep-alive HTTP/1.1 connections, one request in flight on each.

A full HTTP client costs a hundred microseconds or more per request, which at thousands of
comments per second would make the load generator the bottleneck. `HttpConn` writes a prebuilt
request and reads only the status line, `Content-Length` and that many bytes of body.

Every comment's message carries the `time.time_ns()` of the moment its request was written,
between `~` markers (see leanws.py); ack latency is timed with the monotonic clock.

Two ways to post:

* `run_rate`: open loop, at a fixed rate for a fixed time, round-robin over a list of posts. When
  every connection is busy the comment waits for one; how late the latest comment was sent
  against its schedule is reported, and none is sent more than `LATE_LIMIT` late.
* `run_closed`: closed loop, each connection posts again as soon as its previous comment is
  acknowledged: the ingest benchmark, where concurrency = number of connections.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import time
from collections import Counter, deque
from typing import cast

import orjson

from bench.hist import Histogram

_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:[ \t]*(\d+)")
MAX_RESPONSE_BYTES = 1 << 20
# Seconds past its time a scheduled comment may still be sent; later ones are counted as unsent.
LATE_LIMIT = 1.0
# Seconds between scheduling rounds of the open-loop poster, at least (uvloop's timer resolution).
TICK = 0.001
# Seconds a request may wait for its response before the run gives up on it.
RESPONSE_TIMEOUT = 10.0


class HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._waiter: asyncio.Future[int] | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc or 'closed'}"))

    def request(self, data: bytes) -> asyncio.Future[int]:
        """Write one request; the future gets the response status."""
        assert self.transport is not None
        assert self._waiter is None or self._waiter.done(), "one request at a time"
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        head_end = self._buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buf) > MAX_RESPONSE_BYTES:
                self._broken("response head too large")
            return
        m = _CONTENT_LENGTH.search(self._buf, 0, head_end + 2)
        if m is None:
            self._broken("response without Content-Length")
            return
        end = head_end + 4 + int(m.group(1))
        if len(self._buf) < end:
            return
        try:
            status = int(self._buf[9:12])
        except ValueError:
            self._broken("bad status line")
            return
        self._buf = self._buf[end:]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def _broken(self, why: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.abort()


class Poster:
    """A pool of keep-alive connections to one server, posting comments to `POST /v1/comments`."""

    def __init__(self, port: int, pad: int) -> None:
        self.port = port
        self.pad = "x" * pad
        self.conns: list[HttpConn] = []
        self._head = b"POST /v1/comments HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port

    async def open(self, n: int) -> None:
        """Have `n` open connections (replacing any that broke)."""
        loop = asyncio.get_running_loop()
        self.conns = [c for c in self.conns if c.open]
        for _ in range(n - len(self.conns)):
            _, conn = await loop.create_connection(HttpConn, "127.0.0.1", self.port)
            self.conns.append(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def _request(self, post_id: str) -> tuple[bytes, int]:
        """The request and its monotonic send time. The message carries the wall-clock time,
        which probes compare with the kernel's (wall-clock) arrival stamps."""
        sent = time.monotonic_ns()
        message = f"~{time.time_ns()}~{self.pad}"
        body = orjson.dumps({"post_id": post_id, "uid": "bench", "message": message})
        head = b"%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            self._head,
            len(body),
        )
        return head + body, sent

    async def run_rate(self, posts: list[str], rate: float, duration: float) -> dict[str, object]:
        """Post `rate` comments per second for `duration` seconds, round-robin over `posts`."""
        total = max(1, round(rate * duration))
        interval_ns = 1e9 / rate
        free: deque[HttpConn] = deque(c for c in self.conns if c.open)
        ack = Histogram()
        statuses: Counter[str] = Counter()
        in_flight: dict[asyncio.Future[int], HttpConn] = {}
        sent = unsent = 0
        last_send_ns = 0
        max_late_ns = 0  # how far behind its schedule the latest comment was sent

        def done(fut: asyncio.Future[int], *, conn: HttpConn, sent_ns: int) -> None:
            in_flight.pop(fut, None)
            if fut.cancelled() or fut.exception() is not None:
                statuses["connection_error"] += 1
                return
            ack.add((time.monotonic_ns() - sent_ns) // 1000)
            statuses[str(fut.result())] += 1
            if conn.open:
                free.append(conn)

        t0 = time.monotonic_ns()
        give_up = t0 + int((duration + LATE_LIMIT) * 1e9)
        while sent + unsent < total:
            now = time.monotonic_ns()
            if now > give_up:
                unsent = total - sent
                break
            due = min(total, int((now - t0) / interval_ns) + 1)
            while sent + unsent < due and free:
                conn = free.popleft()
                data, sent_ns = self._request(posts[(sent + unsent) % len(posts)])
                max_late_ns = max(max_late_ns, sent_ns - t0 - int((sent + unsent) * interval_ns))
                last_send_ns = sent_ns
                fut = conn.request(data)
                in_flight[fut] = conn
                fut.add_done_callback(functools.partial(done, conn=conn, sent_ns=sent_ns))
                sent += 1
            # uvloop's timers tick in milliseconds: a shorter sleep returns at once and the loop
            # would spin. Whatever falls due meanwhile goes out together at the next tick.
            next_ns = t0 + (sent + unsent) * interval_ns
            wait = (next_ns - time.monotonic_ns()) / 1e9 if free else 0.0
            await asyncio.sleep(min(max(wait, TICK), 0.05))
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=RESPONSE_TIMEOUT)
        for fut, conn in list(in_flight.items()):
            statuses["timeout"] += 1
            conn.abort()  # a late answer must not be read as the next request's
            fut.cancel()
        return {
            "target_rate": rate,
            "planned": total,
            "sent": sent,
            "unsent": unsent,
            "max_late_ms": round(max_late_ns / 1e6, 3),
            "send_span_s": round(max(last_send_ns - t0, 0) / 1e9, 4),
            "ok": statuses.get("201", 0),
            "statuses": dict(statuses),
            "ack": ack.pairs(),
            "ack_max_us": ack.max_us,
        }

    async def run_closed(self, posts: list[str], duration: float) -> dict[str, object]:
        """Each connection posts back to back for `duration` seconds, the comments round-robin
        over `posts`."""
        ack = Histogram()
        statuses: Counter[str] = Counter()
        deadline = time.monotonic_ns() + int(duration * 1e9)
        next_post = itertools.cycle(posts)

        async def loop_one(conn: HttpConn) -> None:
            while conn.open and time.monotonic_ns() < deadline:
                data, sent_ns = self._request(next(next_post))
                try:
                    status = await asyncio.wait_for(conn.request(data), RESPONSE_TIMEOUT)
                except (ConnectionError, TimeoutError) as e:
                    statuses[type(e).__name__] += 1
                    conn.abort()
                    return
                ack.add((time.monotonic_ns() - sent_ns) // 1000)
                statuses[str(status)] += 1

        t0 = time.monotonic_ns()
        await asyncio.gather(*(loop_one(c) for c in self.conns))
        elapsed = (time.monotonic_ns() - t0) / 1e9
        ok = statuses.get("201", 0)
        return {
            "concurrency": len(self.conns),
            "ok": ok,
            "statuses": dict(statuses),
            "rate": round(ok / elapsed, 1),
            "elapsed_s": round(elapsed, 3),
            "ack": ack.pairs(),
            "ack_max_us": ack.max_us,
        }
