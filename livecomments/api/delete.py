"""`DELETE /v1/comments/{id}?post_id=P`: taking a comment down, everywhere at once.

The deletion travels the comment's own way (model/deletion.py): durable in the write-ahead
queue before the answer, then stored as a tombstone and appended to the post's stream, so every
viewer on every instance gets `delete` at the next offset, a viewer recovering across it never
sees the comment, and GET on every instance stops listing it at once (storage/log.py filters
what is queued, stored and streamed). Deleting twice is not an error. Who may: access.py.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from livecomments.api.access import check_scope, deleter, identity_of
from livecomments.api.errors import (
    RETRY_AFTER_STORE_UNAVAILABLE,
    ApiError,
    json_response,
    retry_after,
)
from livecomments.api.keys import IDS, LOG, SETTINGS
from livecomments.api.rest import check_instance_id, parse_int, refusal
from livecomments.model.comment import Comment, check_key
from livecomments.model.deletion import Deletion
from livecomments.model.ids import MAX_SNOWFLAKE, instance_of, timestamp_ms, wall_clock_ms
from livecomments.storage.base import StoreUnavailable
from livecomments.storage.queue import QueueFull, QueueWriteFailed

# How long DELETE looks for a comment it cannot find yet: one acknowledged by another instance
# a moment ago reaches the stream within milliseconds, the database within a flush. Only an id
# that another instance minted within FRESH_MS can be on its way; any other unknown id is a 404
# at once (a client asking for made-up ids costs one lookup each, not twenty).
FIND_WAIT = 1.0
FIND_POLL = 0.05
FRESH_MS = 5_000


async def delete_comment(request: web.Request) -> web.Response:
    app = request.app
    limits = app[SETTINGS].limits
    identity = await identity_of(request)
    post_id = check_key("post_id", request.query.get("post_id"), limits.id_max_chars)
    assert post_id is not None
    comment_id = parse_int("id", request.match_info["id"], 1, MAX_SNOWFLAKE)
    uid = check_key("uid", request.query.get("uid"), limits.id_max_chars, required=False)
    check_scope(identity, post_id)
    try:
        found = await app[LOG].find(post_id, comment_id)
        if found is None and _on_its_way(app, comment_id):
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
    by = deleter(request, identity, comment, uid)
    body = {"deleted": {"id": str(comment_id), "post_id": post_id}}
    if deleted:
        return json_response(body)
    check_instance_id(app)
    deletion = Deletion(app[IDS].next_id(), post_id, comment_id, wall_clock_ms(), by)
    try:
        await app[LOG].accept(deletion)
    except (QueueFull, QueueWriteFailed) as e:
        raise refusal(e) from e
    return json_response(body)


def _on_its_way(app: web.Application, comment_id: int) -> bool:
    """Whether another instance may have acknowledged this id a moment ago."""
    # The id's own timestamp is the client's to choose: one from the future is not fresh.
    fresh = 0 <= wall_clock_ms() - timestamp_ms(comment_id) < FRESH_MS
    return fresh and instance_of(comment_id) != app[IDS].instance_id


async def _find_soon(
    app: web.Application, post_id: str, comment_id: int
) -> tuple[Comment, bool] | None:
    """Find the comment, waiting up to FIND_WAIT for one just acknowledged by another instance:
    it is in that instance's queue until it reaches the stream (milliseconds) or the database."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIND_WAIT
    while True:
        found = await app[LOG].find(post_id, comment_id)
        if found is not None or loop.time() >= deadline:
            return found
        await asyncio.sleep(FIND_POLL)
