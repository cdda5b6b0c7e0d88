"""The REST side of the API: a comment's first room.

    POST /v1/comments -> create_comment(): the body decoded (body.py) and checked into a Draft
      (model/comment.py), a retry recognised by its client_msg_id (dedupe.py), a snowflake id
      given (model/ids.py)
      -> DurableLog.accept() (storage/log.py): fsync'd in the write-ahead queue; only then 201
      -> the outbox's publisher (storage/publisher.py) appends it to its post's stream, whose
         shard publishes it to every node's hub (live/hub.py) and so to every viewer.

`GET /v1/comments` pages through a post: the database merged with what is still queued here and
with the post's stream history (storage/log.py), so a comment is listed here as soon as its POST
returned, and on every instance as soon as any viewer was sent it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from livecomments import metrics
from livecomments.api.body import read_body, read_form
from livecomments.api.errors import (
    RETRY_AFTER_INSTANCE_ID,
    RETRY_AFTER_QUEUE_FULL,
    RETRY_AFTER_QUEUE_UNAVAILABLE,
    RETRY_AFTER_STORE_UNAVAILABLE,
    ApiError,
    invalid,
    json_response,
    retry_after,
)
from livecomments.api.keys import IDS, LEASE, LOG, RECENT, SETTINGS
from livecomments.config import Settings
from livecomments.model.comment import Comment, check_key, draft_from
from livecomments.model.deletion import Deletion
from livecomments.model.ids import MAX_SNOWFLAKE, wall_clock_ms
from livecomments.storage.base import PageQuery, StoreUnavailable
from livecomments.storage.queue import QueueFull, QueueWriteFailed

# How long DELETE looks for a comment it cannot find yet: one acknowledged by another instance
# a moment ago reaches the stream within milliseconds, the database within a flush.
FIND_WAIT = 1.0
FIND_POLL = 0.05


async def post_comment_json(request: web.Request) -> web.Response:
    """`POST /v1/comments` with a JSON object body."""
    settings = request.app[SETTINGS]
    body = await read_body(request, settings.limits.body_max_bytes, settings.http.body_timeout)
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("body", "must be a JSON object") from None
    if not isinstance(fields, dict):
        raise invalid("body", "must be a JSON object")
    return await create_comment(request, fields)


async def post_comment_form(request: web.Request) -> web.Response:
    """`POST /v1/comment?uid=..&post_id=..&message=..`: the design's original form.

    Fields come from the query string or a form body; the body wins where both have one.
    """
    settings = request.app[SETTINGS]
    fields: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        fields.update(
            await read_form(request, settings.limits.body_max_bytes, settings.http.body_timeout)
        )
    return await create_comment(request, fields)


async def create_comment(request: web.Request, fields: Mapping[str, Any]) -> web.Response:
    """Check, identify, make durable, acknowledge, publish: in that order, and only that."""
    started = time.perf_counter()
    app = request.app
    limits = app[SETTINGS].limits
    draft = draft_from(fields, limits.id_max_chars, limits.message_max_chars)
    client_msg_id = check_key(
        "client_msg_id", fields.get("client_msg_id"), limits.id_max_chars, required=False
    )
    _check_instance_id(app)
    key = (draft.uid, client_msg_id) if client_msg_id else None
    if key is not None:
        earlier = app[RECENT].claim(key, draft)
        if earlier is not None:
            return _created(await earlier)  # the first attempt's comment, or its ApiError
    comment = draft.to_comment(app[IDS].next_id(), wall_clock_ms())
    try:
        comment_json = await app[LOG].accept(comment)
    except BaseException as e:
        error = _refusal(e if isinstance(e, QueueFull) else QueueWriteFailed(str(e) or "failed"))
        if key is not None:  # a retry must not wait on this attempt for ever
            app[RECENT].forget(key, error)
        if not isinstance(e, QueueFull | QueueWriteFailed):
            raise
        metrics.COMMENTS_REJECTED.inc()
        raise error from e
    if key is not None:
        app[RECENT].settle(key, comment_json)
    metrics.COMMENTS_ACCEPTED.inc()
    metrics.POST_ACK_SECONDS.observe(time.perf_counter() - started)
    return _created(comment_json)


def _check_instance_id(app: web.Application) -> None:
    """Ids are minted only under an instance id this instance holds (storage/lease.py)."""
    if app[LEASE].conflict:
        raise ApiError(
            503,
            "instance_id_conflict",
            "this instance's id is held by another instance; retry (on another instance)",
            retry_after(RETRY_AFTER_INSTANCE_ID),
        )
    if app[IDS].instance_id is None:
        raise ApiError(
            503,
            "instance_id_pending",
            "this instance has no comment id range yet: its database is unreachable; retry "
            "(on another instance)",
            retry_after(RETRY_AFTER_INSTANCE_ID),
        )


def _created(comment_json: bytes) -> web.Response:
    """201 `{"comment": C}` around C as the queue encoded it (no second encode)."""
    return web.Response(
        body=b'{"comment":' + comment_json + b"}", status=201, content_type="application/json"
    )


def _refusal(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(
            503,
            "queue_full",
            "too many comments are waiting for the database; retry later",
            retry_after(RETRY_AFTER_QUEUE_FULL),
        )
    return ApiError(
        503,
        "queue_unavailable",
        f"the comment could not be made durable: {e}",
        retry_after(RETRY_AFTER_QUEUE_UNAVAILABLE),
    )


async def delete_comment(request: web.Request) -> web.Response:
    """`DELETE /v1/comments/{id}?post_id=P`: take a comment down, everywhere at once.

    The deletion is made durable like a comment (storage/log.py), then stored as a tombstone and
    appended to the post's stream: every viewer gets `delete` in stream order, and GET on every
    instance stops listing it. Deleting twice is not an error."""
    app = request.app
    limits = app[SETTINGS].limits
    post_id = check_key("post_id", request.query.get("post_id"), limits.id_max_chars)
    assert post_id is not None
    comment_id = _parse_int("id", request.match_info["id"], 1, MAX_SNOWFLAKE)
    try:
        found = await _find_soon(app, post_id, comment_id)
    except StoreUnavailable as e:
        raise ApiError(
            503,
            "store_unavailable",
            f"the comment database is not answering: {e}",
            retry_after(RETRY_AFTER_STORE_UNAVAILABLE),
        ) from e
    if found is None:
        raise ApiError(404, "not_found", f"post {post_id} has no comment {comment_id}")
    comment, deleted = found
    by = may_delete(request, comment)
    body = {"deleted": {"id": str(comment_id), "post_id": post_id}}
    if deleted:
        return json_response(body)
    _check_instance_id(app)
    deletion = Deletion(app[IDS].next_id(), post_id, comment_id, wall_clock_ms(), by)
    try:
        await app[LOG].accept(deletion)
    except (QueueFull, QueueWriteFailed) as e:
        raise _refusal(e) from e
    return json_response(body)


async def _find_soon(
    app: web.Application, post_id: str, comment_id: int
) -> tuple[Comment, bool] | None:
    """Find the comment, waiting up to FIND_WAIT for one just acknowledged by another instance:
    it is in that instance's queue until it reaches the stream (milliseconds) or the database."""
    deadline = asyncio.get_running_loop().time() + FIND_WAIT
    while True:
        found = await app[LOG].find(post_id, comment_id)
        if found is not None or asyncio.get_running_loop().time() >= deadline:
            return found
        await asyncio.sleep(FIND_POLL)


def may_delete(request: web.Request, comment: Comment) -> str:
    """Who deletes (for the tombstone), or 403. Open mode trusts the `uid` the client names,
    as it does for posting: only the comment's own author may delete it."""
    uid = request.query.get("uid")
    if uid is None or uid != comment.uid:
        raise ApiError(403, "forbidden", "only the comment's author may delete it")
    return uid


async def list_comments(request: web.Request) -> web.Response:
    """`GET /v1/comments?post_id=P[&limit=N][&before=ID | &after=ID]`."""
    query = parse_page_query(request.query, request.app[SETTINGS])
    try:
        comments, has_more = await request.app[LOG].page(query)
    except StoreUnavailable as e:
        raise ApiError(
            503,
            "store_unavailable",
            f"the comment database is not answering: {e}",
            retry_after(RETRY_AFTER_STORE_UNAVAILABLE),
        ) from e
    return json_response({"comments": [c.to_wire() for c in comments], "has_more": has_more})


def parse_page_query(q: Mapping[str, str], settings: Settings) -> PageQuery:
    limits = settings.limits
    post_id = check_key("post_id", q.get("post_id"), limits.id_max_chars)
    assert post_id is not None
    limit = limits.page_default
    if "limit" in q:
        limit = _parse_int("limit", q["limit"], 1, limits.page_max)
    before = _parse_int("before", q["before"], 0, MAX_SNOWFLAKE) if "before" in q else None
    after = _parse_int("after", q["after"], 0, MAX_SNOWFLAKE) if "after" in q else None
    if before is not None and after is not None:
        raise invalid("before", "cannot be combined with after")
    return PageQuery(post_id, limit, before, after)


def _parse_int(name: str, text: str, low: int, high: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise invalid(name, "must be a whole number")
    value = int(text)
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
    return value


async def index(request: web.Request) -> web.Response:
    """The page at `/`: a complete client in plain JavaScript (static/index.html)."""
    page = resources.files("livecomments").joinpath("static/index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def favicon(request: web.Request) -> web.Response:
    """An SVG served at the path browsers ask for on their own (a 404 in every console before)."""
    icon = resources.files("livecomments").joinpath("static/favicon.svg").read_bytes()
    return web.Response(
        body=icon, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )
