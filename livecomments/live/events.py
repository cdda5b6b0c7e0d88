"""Every event the server sends on a WebSocket, built here and nowhere else (the README's table).

Events are JSON text. Those sent to many sockets (a publication) are built once as bytes and
framed once by the hub; the others answer one socket. A comment arrives as the JSON the queue
wrote (`Comment.encode()`) and is wrapped, never decoded or encoded again.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from livecomments.model.stream import COMMENT, Position, Publication

PONG = b'{"type":"pong"}'
RECONNECT = b'{"type":"reconnect"}'
# Comments per `comments` event when a recovery replays many.
BATCH = 100


def _post(post_id: str) -> bytes:
    return orjson.dumps(post_id)


def comment(post_id: str, offset: int | None, comment_json: bytes) -> bytes:
    """`{"type":"comment","post_id":P,"offset":N,"comment":C}`; `offset` null: delivered while
    its post's shard was down, not part of the stream yet (clients dedupe it by id)."""
    at = b"null" if offset is None else b"%d" % offset
    return (
        b'{"type":"comment","post_id":'
        + _post(post_id)
        + b',"offset":'
        + at
        + b',"comment":'
        + comment_json
        + b"}"
    )


def comments(post_id: str, offset: int, comment_jsons: Sequence[bytes]) -> bytes:
    """`{"type":"comments","post_id":P,"offset":N,"comments":[C1..Ck]}`, Ci at offset N+i-1."""
    return (
        b'{"type":"comments","post_id":'
        + _post(post_id)
        + b',"offset":%d,"comments":[' % offset
        + b",".join(comment_jsons)
        + b"]}"
    )


def delete(post_id: str, offset: int | None, comment_id: bytes) -> bytes:
    """`{"type":"delete","post_id":P,"offset":N,"id":ID}`: the comment is gone."""
    at = b"null" if offset is None else b"%d" % offset
    return (
        b'{"type":"delete","post_id":'
        + _post(post_id)
        + b',"offset":'
        + at
        + b',"id":"'
        + comment_id
        + b'"}'
    )


def publication(pub: Publication) -> bytes:
    if pub.kind == COMMENT:
        return comment(pub.post_id, pub.offset, pub.body)
    return delete(pub.post_id, pub.offset, pub.body)


def replay(publications: Sequence[Publication]) -> list[bytes]:
    """Consecutive publications as few events as can carry them: runs of comments become
    `comments` events of at most BATCH; a deletion stands alone."""
    out: list[bytes] = []
    run: list[Publication] = []

    def close_run() -> None:
        if run:
            out.append(comments(run[0].post_id, run[0].offset, [p.body for p in run]))
            run.clear()

    for pub in publications:
        if pub.kind != COMMENT:
            close_run()
            out.append(publication(pub))
            continue
        run.append(pub)
        if len(run) == BATCH:
            close_run()
    close_run()
    return out


def subscribed(post_id: str, position: Position | None, recovered: bool) -> bytes:
    """`recovered`: the events from the client's offset + 1 up to `offset` follow; otherwise
    the client reloads and continues from `offset`. A null position: the post's shard is down;
    a `reset` follows when it is back."""
    return orjson.dumps(
        {
            "type": "subscribed",
            "post_id": post_id,
            "epoch": None if position is None else position.epoch,
            "offset": None if position is None else position.offset,
            "recovered": recovered,
        }
    )


def reset(post_id: str, position: Position) -> bytes:
    """A gap the server cannot fill: reload, continue from this position."""
    return orjson.dumps(
        {"type": "reset", "post_id": post_id, "epoch": position.epoch, "offset": position.offset}
    )


def unsubscribed(post_id: str) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "post_id": post_id})


def authenticated(sub: str | None, moderator: bool, expires_at: float | None) -> bytes:
    """`{"type":"authenticated","sub":S,"moderator":B,"expires_at":T}`: the socket's token was
    taken (T: Unix seconds, null for none)."""
    return orjson.dumps(
        {"type": "authenticated", "sub": sub, "moderator": moderator, "expires_at": expires_at}
    )


def error(code: str, message: str) -> bytes:
    """Bad input on this socket; it stays open."""
    return orjson.dumps({"type": "error", "code": code, "message": message})
