"""Every event the server sends on a WebSocket, built here and nowhere else (the README's table).

Events are JSON text. Those sent to many sockets (`comment`, `resync`) are built once as bytes and
framed once by the hub; the others are answers to one socket. Comment JSON arrives already
encoded (`Comment.encode()`, the bytes the queue wrote) and is wrapped, never encoded again.
"""

from __future__ import annotations

import orjson

from livecomments.model.ids import lowest_id_at

# Clocks of different hosts disagree a little; a resync reaches this much further back.
RESYNC_CLOCK_SKEW_MS = 5_000

PONG = b'{"type":"pong"}'


def comment(comment_json: bytes) -> bytes:
    """`{"type":"comment","comment":C}` around C as already encoded: no second encode."""
    return b'{"type":"comment","comment":' + comment_json + b"}"


def resync(post_id: str, since_ms: int) -> bytes:
    """`after` is an id below every comment created since `since_ms` on any instance: a client
    refetches from the smaller of it and its own newest id, and skips ids it already shows.
    (Its newest id alone is not enough: comments accepted by this instance kept arriving during
    the gap, so the newest shown may be newer than a remote comment that was missed.)"""
    after = lowest_id_at(since_ms - RESYNC_CLOCK_SKEW_MS)
    return orjson.dumps({"type": "resync", "post_id": post_id, "after": str(after)})


def subscribed(post_id: str) -> bytes:
    return orjson.dumps({"type": "subscribed", "post_id": post_id})


def unsubscribed(post_id: str) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "post_id": post_id})


def error(code: str, message: str) -> bytes:
    """Bad input on this socket; it stays open."""
    return orjson.dumps({"type": "error", "code": code, "message": message})
