"""The REST side of the API: a comment's first room.

    POST /v1/comments -> create_comment(): who is asking (access.py, auth.py: the author, their
      scope), the body decoded (body.py) and checked into a Draft (model/comment.py), a retry
      recognised by its client_msg_id (dedupe.py), the author's rate (ratelimit.py), a
      snowflake id given (model/ids.py)
      -> DurableLog.accept() (storage/log.py): fsync'd in the write-ahead queue; only then 201
      -> the outbox's publisher (storage/publisher.py) appends it to its post's stream, whose
         shard publishes it to every node's hub (live/hub.py) and so to every viewer.

`GET /v1/comments` pages through a post: the database merged with what is still queued here and
with the post's stream history (storage/log.py), so a comment is listed here as soon as its POST
returned, and on every instance as soon as any viewer was sent it. (Taking a comment down:
delete.py. Which pages may call these from a browser: origins.py, before any handler.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from livecomments import metrics
from livecomments.api.access import (
    author_of,
    check_read,
    check_scope,
    identity_of,
    take_comment_token,
)
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
from livecomments.model.comment import check_key, draft_from
from livecomments.model.ids import MAX_SNOWFLAKE, wall_clock_ms
from livecomments.storage.base import PageQuery, StoreUnavailable
from livecomments.storage.queue import QueueFull, QueueWriteFailed


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
    identity = await identity_of(request)
    uid = check_key("uid", fields.get("uid"), limits.id_max_chars, required=False)
    author = author_of(request, identity, uid)
    draft = draft_from({**fields, "uid": author}, limits.id_max_chars, limits.message_max_chars)
    check_scope(identity, draft.post_id)
    client_msg_id = check_key(
        "client_msg_id", fields.get("client_msg_id"), limits.id_max_chars, required=False
    )
    check_instance_id(app)
    # Scoped by the author, who is the token's subject once auth is on: nobody can claim
    # another author's client_msg_id.
    key = (draft.uid, client_msg_id) if client_msg_id else None
    if key is not None:
        earlier = app[RECENT].claim(key, draft)
        if earlier is not None:
            return _created(await earlier)  # the first attempt's comment, or its ApiError
    try:
        await take_comment_token(request, identity, author)
    except ApiError as e:
        if key is not None:
            app[RECENT].forget(key, e)
        raise
    comment = draft.to_comment(app[IDS].next_id(), wall_clock_ms())
    try:
        comment_json = await app[LOG].accept(comment)
    except BaseException as e:
        error = refusal(e if isinstance(e, QueueFull) else QueueWriteFailed(str(e) or "failed"))
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


def check_instance_id(app: web.Application) -> None:
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


def refusal(e: Exception) -> ApiError:
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


async def list_comments(request: web.Request) -> web.Response:
    """`GET /v1/comments?post_id=P[&limit=N][&before=ID | &after=ID]`."""
    query = parse_page_query(request.query, request.app[SETTINGS])
    settings = request.app[SETTINGS]
    if settings.auth.read == "token":  # public reads look at no credential
        check_read(settings, await identity_of(request), query.post_id)
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
        limit = parse_int("limit", q["limit"], 1, limits.page_max)
    before = parse_int("before", q["before"], 0, MAX_SNOWFLAKE) if "before" in q else None
    after = parse_int("after", q["after"], 0, MAX_SNOWFLAKE) if "after" in q else None
    if before is not None and after is not None:
        raise invalid("before", "cannot be combined with after")
    return PageQuery(post_id, limit, before, after)


def parse_int(name: str, text: str, low: int, high: int) -> int:
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
