"""Who may do what: a request's identity (api/auth.py) held to the rules of each action.

The rules, in one place (README "Security" explains them to users):

* Posting: a token's `sub` is the author; a body naming another `uid` is refused (403), one
  naming none takes `sub`. A server key (the site's backend) posts for the `uid` it names. In
  open mode without a credential the body's `uid` is taken as given: that mode trusts clients.
  A token with a scope may post only to the posts it names (403).
* Reading (GET, WebSocket subscribe): public unless `auth.read = "token"`; then a token (or a
  server key) is needed (401), and its scope holds (403).
* Deleting: a moderator (the token's roles) or a server key may delete any comment; an author
  their own, within `auth.delete_window` seconds of posting (0: always).
* Rate limits key comments by who is verified: the author (a token's `sub`, or the `uid` a
  server key posts for); an unverified client (open mode) by its address, since it could
  otherwise name a fresh uid for each comment.
"""

from __future__ import annotations

import math
import time

from aiohttp import hdrs, web

from livecomments.api.auth import AuthError, Identity
from livecomments.api.errors import ApiError, invalid
from livecomments.api.keys import ADDRESSES, AUTH, COMMENT_BUCKETS, SETTINGS
from livecomments.api.socketlimits import address_key
from livecomments.config import Settings
from livecomments.model.comment import Comment, check_key

_IDENTITY = web.RequestKey("identity", Identity)


async def identity_of(request: web.Request) -> Identity:
    """The request's identity from `Authorization` (once per request); AuthError if the
    credential is refused, or missing where one is required."""
    cached: Identity | None = request.get(_IDENTITY)
    if cached is not None:
        return cached
    identity = await request.app[AUTH].identify(request.headers.get(hdrs.AUTHORIZATION), None)
    request[_IDENTITY] = identity
    return identity


def verified(identity: Identity) -> bool:
    return identity.sub is not None or identity.server


def author_of(request: web.Request, identity: Identity, uid: str | None) -> str:
    """The uid a comment is posted under (see the module docstring)."""
    if identity.server:
        if uid is None:
            raise invalid("uid", "is required when a server key posts")
        return uid
    if identity.sub is not None:
        if uid is not None and uid != identity.sub:
            raise ApiError(403, "forbidden", "uid: must be the token's subject (or left out)")
        return subject_as_uid(request, identity.sub)
    if uid is None:
        raise invalid("uid", "is required")
    return uid


def subject_as_uid(request: web.Request, sub: str) -> str:
    """A token's `sub` becomes a comment's uid, so it must be one; mapping other subjects
    (`auth0|123`) is the token issuer's job."""
    try:
        checked = check_key("uid", sub, request.app[SETTINGS].limits.id_max_chars)
    except ApiError:
        raise AuthError(
            "invalid_token", "the token's sub is not a valid uid (1-64 of A-Z a-z 0-9 . _ : -)"
        ) from None
    assert checked is not None
    return checked


def check_scope(identity: Identity, post_id: str) -> None:
    if not identity.may_access(post_id):
        raise ApiError(403, "forbidden", f"this token is not for post {post_id}")


def check_read(settings: Settings, identity: Identity, post_id: str) -> None:
    """Reading a post: anyone, unless `auth.read = "token"`."""
    if settings.auth.read != "token":
        return
    if not verified(identity):
        raise AuthError("unauthenticated", "reading needs a token (auth.read = token)")
    check_scope(identity, post_id)


def deleter(request: web.Request, identity: Identity, comment: Comment, uid: str | None) -> str:
    """Who deletes `comment` (recorded in its tombstone), or 403."""
    if identity.server:
        return "server"
    if identity.moderator:
        return f"moderator:{identity.sub}"
    author = identity.sub if identity.sub is not None else uid
    if author is None or author != comment.uid:
        raise ApiError(403, "forbidden", "only the comment's author or a moderator may delete it")
    window = request.app[SETTINGS].auth.delete_window
    if window and time.time() - comment.created_at / 1000 > window:
        raise ApiError(
            403,
            "delete_window_passed",
            f"authors may delete their comments for {window:g} s after posting; ask a moderator",
        )
    return author


async def take_comment_token(request: web.Request, identity: Identity, author: str) -> None:
    """One comment from the author's bucket, or 429 with Retry-After."""
    buckets = request.app[COMMENT_BUCKETS]
    if not buckets.rate.on:
        return  # the limit is off: no key to work out (an address is parsed for it)
    if verified(identity):
        key = "uid:" + author
    else:
        key = "ip:" + address_key(request.app[ADDRESSES].of(request))
    wait = await buckets.acquire(key)
    if wait > 0:
        limits = request.app[SETTINGS].limits
        raise ApiError(
            429,
            "rate_limited",
            f"at most {limits.comments_per_minute:g} comments a minute (bursts of "
            f"{limits.comments_burst}); retry in {math.ceil(wait)} s",
            {"Retry-After": str(math.ceil(wait))},
        )
