"""The documented live-comments client, in Python: what a browser does, made countable.

A `Viewer` follows the client rules of the WebSocket protocol (README, "Watch a post live") to the
letter, so a chaos test can run many of them against real servers, break things, and then count:
`settle()` waits until every viewer shows every comment it must, and each viewer's log says what
it applied, in which order, and every time it had to reload or reconnect.

What it keeps, per post: its stream position `(epoch, offset)` (both `None` before the server gave
one), the comments it shows (id -> comment), and `positioned` (id -> the position at which it was
applied). The rules it follows:

- `subscribed` with `recovered: true`: the position stays; the replay that follows is applied
  like any event. `recovered: false` (or `true` to a subscribe that sent no position, which
  would be a server bug): reload, and continue from the position the server gave. `null`
  epoch/offset (the post's Redis shard is down): keep the old position (a later resubscribe
  sends it) and wait for the `reset` that follows.
- An event (`comment`, each item of `comments`, `delete`) with offset `last + 1` is applied and
  advances the position; one with offset `<= last` is ignored (already applied); one beyond
  `last + 1` is a gap: resubscribe with the last position. An offset of `null` is shown (deduped
  by id) and does not advance the position. An event that names an `epoch` other than ours means
  resubscribe too (the events of the protocol's first version carry none; they belong to the
  epoch of the last `subscribed`/`reset`).
- While a subscribe of a post is unanswered, its positioned events are ignored: they come from
  before the server read the subscribe, and the answer's replay (or reload) covers them. So a
  burst of out-of-order events costs one resubscribe, not one per event. An answer that does not
  come within `subscribe_timeout` drops the socket (and reconnects), so nothing waits forever.
- `reset`: reload, continue from the reset's position.
- `reconnect`: the instance drains; the close (1012) follows within `drain_timeout` or the viewer
  closes itself. Either way it reconnects.
- A closed or failed socket: reconnect to the next URL of the list after a capped, jittered
  backoff (`backoff_base` doubling up to `backoff_cap`, uniform in [c/2, c]; reset once a
  socket gets its first `subscribed`), then subscribe every post with its position.
- Reload: GET `/v1/comments?post_id=P&limit=200` (the newest page), then, with `full_reload`,
  older pages with `&before=<smallest id of the last page>` until `has_more` is false. A test
  that counts needs the full reload; a UI would load the newest page only and page back when
  the reader scrolls (`full_reload=False` does that). A failed GET (network error, any non-200
  status) is retried with the same kind of backoff, never given up; a `Retry-After` is honoured
  up to the backoff's cap. A newer reload of a post cancels an older one (it covers it).
  The GET goes to the base URL of the current socket, so it follows the viewer to a live node.

What it proves (read after `stop()`, or while it runs):

- `duplicates`: ids shown twice (a UI appends each shown comment once; dedupe is by id): must
  stay empty.
- `redelivered`: an id applied again at a *different* offset of the same epoch (the server sent
  one comment under two offsets of one stream). An id first shown by a reload or with a `null`
  offset and then applied with an offset is normal and not counted. So is an id applied again
  in a *later* epoch (`reappended`): when a stream's history is lost, the outbox appends again
  the comments that history held and the database did not have yet (storage/publisher.py), so
  that every instance's GET still finds them; a client shows each id once.
- `offset_violations`: a jump it applied within one epoch. It never applies one (it resubscribes
  instead), so this is a self-check of this client.
- `log`: every event it applied `(epoch, offset, id)` in order, every gap, resubscribe, reload,
  connection and disconnection; `applied()`, `reloads()`, `gaps()` and `connections` read it.

Every wait is bounded: connecting (`connect_timeout`), reading (aiohttp's heartbeat pings the
server every `heartbeat` seconds and drops a socket whose pong does not come), a subscribe's
answer, a drain, each GET (`get_timeout`), the close handshake (`close_timeout`). The only
sleeps are the backoffs above.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import aiohttp
from yarl import URL

# An epoch as the server sends it (an opaque JSON value compared for equality).
Epoch = str | int
Position = tuple[Epoch, int]
Comment = dict[str, Any]

LogKind = Literal[
    "connected",  # a socket opened; detail = base URL
    "disconnected",  # it closed; detail = close code (or why the viewer dropped it)
    "connect_failed",  # detail = the error
    "subscribe",  # a subscribe was sent; epoch/offset = the position sent (None: no position)
    "subscribed",  # the answer; detail = "recovered" | "not_recovered" | "no_position"
    "applied",  # a positioned event was applied; id = comment id (or the deleted id)
    "deleted",  # a delete was applied; id = the deleted id
    "unpositioned",  # a comment with offset null was shown (id = its id)
    "ignored",  # a positioned event at or before the position (already applied)
    "gap",  # an event beyond last + 1 (or of another epoch): offset = what came
    "reset",  # a reset: epoch/offset = the new position
    "reload",  # a reload started; detail = "reset" | "not_recovered"
    "reloaded",  # it finished; detail = "<pages> pages, <comments> comments"
    "get_failed",  # a GET of a reload failed; detail = status or error
    "drain",  # a `reconnect` notice came
    "error",  # an `error` event; detail = code: message
    "protocol",  # something the protocol does not allow; detail says what
]


@dataclass(frozen=True)
class LogEntry:
    kind: LogKind
    post_id: str | None = None
    epoch: Epoch | None = None
    offset: int | None = None
    id: str | None = None
    detail: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Redelivery:
    post_id: str
    id: str
    first: Position
    again: Position


@dataclass(frozen=True)
class OffsetViolation:
    post_id: str
    epoch: Epoch
    expected: int
    got: int


@dataclass
class PostState:
    post_id: str
    epoch: Epoch | None = None
    offset: int | None = None
    shown: dict[str, Comment] = field(default_factory=dict)
    # Ids in the order they were first shown: what a UI appends to its list.
    display: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    positioned: dict[str, Position] = field(default_factory=dict)
    # A subscribe is unanswered since this monotonic time (None: none is).
    awaiting_since: float | None = None
    # The last position applied or set, kept apart from (epoch, offset) for the self-check.
    anchor: Position | None = None
    reload_task: asyncio.Task[None] | None = None  # the latest reload of this post

    @property
    def position(self) -> Position | None:
        if self.epoch is None or self.offset is None:
            return None
        return (self.epoch, self.offset)


_names = itertools.count(1)


class Viewer:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        urls: Sequence[str],
        post_ids: Iterable[str],
        *,
        rng: random.Random,
        full_reload: bool = True,
        name: str | None = None,
        page_limit: int = 200,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        connect_timeout: float = 5.0,
        heartbeat: float = 5.0,
        subscribe_timeout: float = 10.0,
        drain_timeout: float = 5.0,
        get_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> None:
        if not urls:
            raise ValueError("a viewer needs at least one URL")
        self.session = session
        self.urls = [u.rstrip("/") for u in urls]
        self.post_ids = list(dict.fromkeys(post_ids))
        self.rng = rng
        self.full_reload = full_reload
        self.name = name or f"viewer-{next(_names)}"
        self.page_limit = page_limit
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.subscribe_timeout = subscribe_timeout
        self.drain_timeout = drain_timeout
        self.get_timeout = get_timeout
        self.close_timeout = close_timeout

        self.posts = {p: PostState(p) for p in self.post_ids}
        self.log: list[LogEntry] = []
        self.redelivered: list[Redelivery] = []
        self.reappended: list[Redelivery] = []
        self.offset_violations: list[OffsetViolation] = []
        self.connections: list[str] = []  # the base URL of each socket that opened, in order
        self.base: str | None = None  # the current socket's base URL
        self._url_index = rng.randrange(len(self.urls))
        self._drain_deadline: float | None = None
        self._task: asyncio.Task[None] | None = None
        # Every reload task not finished yet, superseded (cancelled) ones included: stop() awaits
        # them all, so none outlives the viewer or its session.
        self._reloads: set[asyncio.Task[None]] = set()
        self._stopping = False

    # The public surface.

    def shown(self, post_id: str) -> dict[str, Comment]:
        return self.posts[post_id].shown

    def position(self, post_id: str) -> Position | None:
        return self.posts[post_id].position

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        """(post_id, id) of every id shown more than once."""
        found = []
        for state in self.posts.values():
            seen: set[str] = set()
            for cid in state.display:
                if cid in seen:
                    found.append((state.post_id, cid))
                seen.add(cid)
        return found

    def entries(self, kind: LogKind, post_id: str | None = None) -> list[LogEntry]:
        return [e for e in self.log if e.kind == kind and (post_id is None or e.post_id == post_id)]

    def applied(self, post_id: str) -> list[tuple[Epoch | None, int | None, str | None]]:
        """(epoch, offset, id) of every positioned event applied to the post, in order."""
        return [(e.epoch, e.offset, e.id) for e in self.entries("applied", post_id)]

    def reloads(self, post_id: str) -> list[LogEntry]:
        return self.entries("reload", post_id)

    def gaps(self, post_id: str | None = None) -> list[LogEntry]:
        return self.entries("gap", post_id)

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended the socket loop or a reload (a bug in this client)."""
        for task in [self._task, *self._reloads]:
            if task is not None and task.done() and not task.cancelled():
                failure = task.exception()
                if failure is not None:
                    return failure
        return None

    def start(self) -> Viewer:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)
        return self

    async def stop(self) -> None:
        """Cancel the socket loop and every reload, close the socket, and wait for them all.
        Raises what ended the loop, if something other than `stop()` did."""
        self._stopping = True
        tasks = [t for t in [self._task, *self._reloads] if t is not None]
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def __aenter__(self) -> Viewer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_positioned(self, timeout: float) -> None:
        """Wait until every post has a position and no unanswered subscribe."""
        deadline = time.monotonic() + timeout
        while True:
            self.raise_if_failed()
            waiting = [
                p
                for p, s in self.posts.items()
                if s.position is None or s.awaiting_since is not None
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no position after {timeout}s for {waiting}")
            await asyncio.sleep(0.02)

    def describe(self, post_id: str) -> str:
        state = self.posts[post_id]
        reload = state.reload_task is not None and not state.reload_task.done()
        return (
            f"position {state.position}, {len(state.shown)} shown, "
            f"{'awaiting a subscribe answer, ' if state.awaiting_since is not None else ''}"
            f"{'reloading, ' if reload else ''}socket to {self.base}, "
            f"{len(self.connections)} connections, {len(self.gaps(post_id))} gaps, "
            f"{len(self.reloads(post_id))} reloads"
        )

    # The socket loop.

    def raise_if_failed(self) -> None:
        failure = self.failure
        if failure is not None:
            raise AssertionError(f"{self.name} died: {failure!r}") from failure

    def _record(self, kind: LogKind, post_id: str | None = None, **fields: Any) -> None:
        self.log.append(LogEntry(kind, post_id, **fields))

    def _delay(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** min(attempt, 30))
        return self.rng.uniform(ceiling / 2, ceiling)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            base = self.urls[self._url_index]
            try:
                async with asyncio.timeout(self.connect_timeout):
                    ws = await self.session.ws_connect(
                        f"{ws_base(base)}/v1/ws",
                        heartbeat=self.heartbeat,
                        timeout=aiohttp.ClientWSTimeout(ws_close=self.close_timeout),
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Swallowed: a node that is down or refuses is what this loop is for.
                self._record("connect_failed", detail=f"{base}: {exc!r}")
            else:
                if await self._socket(ws, base):
                    attempt = 0
            if self._stopping:
                return
            self._url_index = (self._url_index + 1) % len(self.urls)
            await asyncio.sleep(self._delay(attempt))  # the documented reconnect backoff
            attempt += 1

    async def _socket(self, ws: aiohttp.ClientWebSocketResponse, base: str) -> bool:
        """Run one socket until it closes; True if it got at least one `subscribed`."""
        self.base = base
        self.connections.append(base)
        self._record("connected", detail=base)
        self._drain_deadline = None
        answered = False
        why = "closed"
        try:
            for state in self.posts.values():
                await ws.send_str(self._subscribe(state))
            while True:
                try:
                    msg = await ws.receive(timeout=self._receive_timeout())
                except TimeoutError:
                    why = "drain timed out" if self._drain_deadline else "subscribe unanswered"
                    return answered
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        self._record("protocol", detail="a binary frame")
                        continue
                    return answered  # CLOSE, CLOSING, CLOSED, ERROR: the socket is gone
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    self._record("protocol", detail=f"not JSON: {msg.data[:200]!r}")
                    continue
                if not isinstance(event, dict):
                    self._record("protocol", detail=f"not an object: {msg.data[:200]!r}")
                    continue
                answered |= event.get("type") == "subscribed"
                for frame in self._handle(event):
                    await ws.send_str(frame)
        except (aiohttp.ClientError, OSError) as exc:
            why = repr(exc)  # a send to a socket that broke: reconnect like any close
            return answered
        finally:
            self.base = None
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await ws.close()
            code = ws.close_code
            self._record("disconnected", detail=f"{code if code is not None else why}")

    def _receive_timeout(self) -> float | None:
        """Until the earliest of: an unanswered subscribe's deadline, the drain's deadline.
        None otherwise: the heartbeat bounds the read."""
        deadlines = [
            s.awaiting_since + self.subscribe_timeout
            for s in self.posts.values()
            if s.awaiting_since is not None
        ]
        if self._drain_deadline is not None:
            deadlines.append(self._drain_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _subscribe(self, state: PostState) -> str:
        frame: dict[str, Any] = {"type": "subscribe", "post_id": state.post_id}
        position = state.position
        if position is not None:
            frame["epoch"], frame["offset"] = position
        state.awaiting_since = time.monotonic()
        epoch, offset = position if position is not None else (None, None)
        self._record("subscribe", state.post_id, epoch=epoch, offset=offset)
        return json.dumps(frame)

    # The rules. Synchronous on purpose: each event's state change is done before the next one
    # is read, with no await in between; what must be sent is returned.

    def _handle(self, event: dict[str, Any]) -> list[str]:
        kind = event.get("type")
        if kind in ("pong", "unsubscribed"):
            return []
        if kind == "reconnect":
            self._record("drain")
            self._drain_deadline = time.monotonic() + self.drain_timeout
            return []
        if kind == "error":
            self._record("error", detail=f"{event.get('code')}: {event.get('message')}")
            return []
        post_id = event.get("post_id")
        state = self.posts.get(post_id) if isinstance(post_id, str) else None
        if state is None:
            self._record("protocol", detail=f"an event for a post not watched: {event}")
            return []
        if kind == "subscribed":
            return self._on_subscribed(state, event)
        if kind == "reset":
            return self._on_reset(state, event)
        if kind == "comment":
            return self._on_items(state, event, [event.get("comment")])
        if kind == "comments":
            comments = event.get("comments")
            return self._on_items(state, event, comments if isinstance(comments, list) else [])
        if kind == "delete":
            return self._on_items(state, event, [None])
        self._record("protocol", post_id, detail=f"unknown event: {event}")
        return []

    def _on_subscribed(self, state: PostState, event: dict[str, Any]) -> list[str]:
        state.awaiting_since = None
        epoch, offset, recovered = event.get("epoch"), event.get("offset"), event.get("recovered")
        if epoch is None or offset is None:
            # The shard is down: keep the old position (a resubscribe sends it); a reset follows.
            self._record("subscribed", state.post_id, detail="no_position")
            return []
        if recovered is True:
            if state.position is None or epoch != state.epoch:
                self._record(
                    "protocol",
                    state.post_id,
                    epoch=epoch,
                    offset=offset,
                    detail=f"recovered to a position we did not send (ours: {state.position})",
                )
                self._set_position(state, epoch, offset, "not_recovered")
                return []
            # The replay of offset + 1 .. `offset` follows; it is applied like any event.
            self._record(
                "subscribed", state.post_id, epoch=epoch, offset=offset, detail="recovered"
            )
            return []
        self._record(
            "subscribed", state.post_id, epoch=epoch, offset=offset, detail="not_recovered"
        )
        self._set_position(state, epoch, offset, "not_recovered")
        return []

    def _on_reset(self, state: PostState, event: dict[str, Any]) -> list[str]:
        epoch, offset = event.get("epoch"), event.get("offset")
        if epoch is None or not isinstance(offset, int):
            self._record("protocol", state.post_id, detail=f"a reset without a position: {event}")
            return []
        self._record("reset", state.post_id, epoch=epoch, offset=offset)
        self._set_position(state, epoch, offset, "reset")
        return []

    def _set_position(self, state: PostState, epoch: Epoch, offset: int, why: str) -> None:
        """Continue from (epoch, offset), reloading what it covers. The position is set first,
        so the events after it that arrive while the reload runs are applied as they come."""
        state.epoch, state.offset = epoch, offset
        state.anchor = (epoch, offset)
        self._record("reload", state.post_id, epoch=epoch, offset=offset, detail=why)
        if state.reload_task is not None:
            state.reload_task.cancel()  # the new reload covers everything the old one would
        task = asyncio.create_task(self._reload(state), name=f"{self.name} reload {state.post_id}")
        state.reload_task = task
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[None]) -> None:
        # A reload that failed (a bug: GETs are retried forever) stays in the set, so stop()
        # raises its exception instead of asyncio logging it as never retrieved.
        if task.cancelled() or task.exception() is None:
            self._reloads.discard(task)

    def _on_items(self, state: PostState, event: dict[str, Any], comments: list[Any]) -> list[str]:
        """A `comment`, `comments` or `delete`: item i has offset `offset + i` (or all null)."""
        first = event.get("offset")
        if first is not None and not isinstance(first, int):
            self._record("protocol", state.post_id, detail=f"a bad offset: {event}")
            return []
        if first is not None and "epoch" in event and event["epoch"] != state.epoch:
            return self._gap(state, first, f"epoch {event['epoch']!r}")
        for i, comment in enumerate(comments):
            cid = event.get("id") if event.get("type") == "delete" else _comment_id(comment)
            if not isinstance(cid, str):
                self._record("protocol", state.post_id, detail=f"no id in {event}")
                return []
            if first is None:
                # Delivered while the shard is down: shown (or removed), the position stays.
                self._show_or_delete(state, cid, comment)
                self._record("unpositioned", state.post_id, id=cid)
                continue
            frames = self._on_positioned(state, first + i, cid, comment)
            if frames:
                return frames  # a resubscribe: the rest is covered by its answer
        return []

    def _on_positioned(
        self, state: PostState, offset: int, cid: str, comment: Comment | None
    ) -> list[str]:
        if state.awaiting_since is not None:
            return []  # the subscribe's answer covers it (see the module docstring)
        if state.offset is None:
            return self._gap(state, offset, "no position yet")
        if offset <= state.offset:
            self._record("ignored", state.post_id, epoch=state.epoch, offset=offset, id=cid)
            return []
        if offset == state.offset + 1:
            self._apply(state, offset, cid, comment)
            return []
        return self._gap(state, offset, "a gap")

    def _gap(self, state: PostState, offset: int, why: str) -> list[str]:
        if state.awaiting_since is not None:
            return []
        self._record("gap", state.post_id, epoch=state.epoch, offset=offset, detail=why)
        return [self._subscribe(state)]

    def _apply(self, state: PostState, offset: int, cid: str, comment: Comment | None) -> None:
        assert state.epoch is not None
        epoch = state.epoch
        if state.anchor is not None and state.anchor[0] == epoch and offset != state.anchor[1] + 1:
            self.offset_violations.append(
                OffsetViolation(state.post_id, epoch, state.anchor[1] + 1, offset)
            )
        state.offset = offset
        state.anchor = (epoch, offset)
        if comment is not None:  # a delete names a comment's id; it is not a redelivery
            first = state.positioned.get(cid)
            if first is not None and first != (epoch, offset):
                again = Redelivery(state.post_id, cid, first, (epoch, offset))
                (self.redelivered if first[0] == epoch else self.reappended).append(again)
            state.positioned[cid] = (epoch, offset)
        self._show_or_delete(state, cid, comment)
        if comment is None:
            self._record("deleted", state.post_id, epoch=epoch, offset=offset, id=cid)
        self._record("applied", state.post_id, epoch=epoch, offset=offset, id=cid)

    def _show_or_delete(self, state: PostState, cid: str, comment: Comment | None) -> None:
        """Show the comment, or (None: a delete) remove `cid` for good."""
        if comment is None:
            state.deleted.add(cid)
            state.shown.pop(cid, None)
        else:
            self._show(state, comment)

    def _show(self, state: PostState, comment: Comment) -> None:
        cid = comment["id"]
        if cid in state.shown or cid in state.deleted:
            return
        state.shown[cid] = comment
        state.display.append(cid)

    # Reloads.

    async def _reload(self, state: PostState) -> None:
        before: str | None = None
        pages = count = 0
        while True:
            params = {"post_id": state.post_id, "limit": str(self.page_limit)}
            if before is not None:
                params["before"] = before
            page = await self._get_page(state.post_id, params)
            comments = page.get("comments") or []
            for comment in comments:
                self._show(state, comment)
            pages += 1
            count += len(comments)
            if not (self.full_reload and page.get("has_more") and comments):
                break
            before = min((c["id"] for c in comments), key=int)
        self._record("reloaded", state.post_id, detail=f"{pages} pages, {count} comments")

    async def _get_page(self, post_id: str, params: dict[str, str]) -> dict[str, Any]:
        """One page, retried until it comes (a reload is never given up)."""
        timeout = aiohttp.ClientTimeout(total=self.get_timeout)
        attempt = 0
        while True:
            base = self.base or self.urls[self._url_index]
            retry_after = 0.0
            try:
                async with self.session.get(
                    f"{base}/v1/comments", params=params, timeout=timeout
                ) as r:
                    if r.status == 200:
                        page = await r.json()
                        if isinstance(page, dict) and isinstance(page.get("comments"), list):
                            return page
                        failure = f"{base}: not a page: {page!r:.200}"
                    else:
                        failure = f"{base}: {r.status} {(await r.text())[:200]}"
                        retry_after = parse_retry_after(r.headers.get("Retry-After"))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failure = f"{base}: {exc!r}"  # retried below, like a 5xx
            self._record("get_failed", post_id, detail=failure)
            delay = max(self._delay(attempt), min(retry_after, self.backoff_cap))
            await asyncio.sleep(delay)  # the documented GET backoff
            attempt += 1


def _comment_id(comment: Any) -> str | None:
    cid = comment.get("id") if isinstance(comment, dict) else None
    return cid if isinstance(cid, str) else None


def ws_base(base: str) -> str:
    """ws://host:port for http://host:port (wss for https), with the base's path."""
    url = URL(base)
    return str(url.with_scheme("wss" if url.scheme == "https" else "ws")).rstrip("/")


def parse_retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0  # an HTTP date: the backoff alone decides


async def settle(
    viewers: Sequence[Viewer], expected: Mapping[str, set[str]], timeout: float
) -> None:
    """Wait until every viewer shows every expected id of the posts it watches.

    Polls until `timeout`; then raises AssertionError naming each viewer, post and what it
    misses, with its state. Also raises if a viewer's loop died."""
    deadline = time.monotonic() + timeout
    while True:
        missing: list[tuple[Viewer, str, set[str]]] = []
        for viewer in viewers:
            viewer.raise_if_failed()
            for post_id in viewer.post_ids:
                lacking = expected.get(post_id, set()) - viewer.shown(post_id).keys()
                if lacking:
                    missing.append((viewer, post_id, lacking))
        if not missing:
            return
        if time.monotonic() > deadline:
            lines = [
                f"{v.name} {p}: misses {len(ids)} of {len(expected[p])} "
                f"(e.g. {sorted(ids, key=int)[:5]}); {v.describe(p)}"
                for v, p, ids in missing
            ]
            raise AssertionError(f"not settled after {timeout}s:\n" + "\n".join(lines))
        await asyncio.sleep(0.02)
