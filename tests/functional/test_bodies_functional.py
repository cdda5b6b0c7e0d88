"""Hostile and unusual request bodies against a real server: every one is a JSON 4xx or a
comment, never a 500, a hang, or bytes read as something they are not (issue 8, items 6, 8, 13).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import urllib.parse
import zlib
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support.server import ServerProcess

COMMENT = {"post_id": "bodies", "uid": "u", "message": "hello"}
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"LIVECOMMENTS_HTTP_IDLE_TIMEOUT": "1", "LIVECOMMENTS_HTTP_BODY_TIMEOUT": "1"}
    s = ServerProcess(tmp_path_factory.mktemp("bodies"), env=env).start()
    yield s
    assert s.stop() == 0, s.logs()
    assert "Traceback" not in s.logs(), s.logs()


@pytest.fixture
async def fresh() -> aiohttp.ClientSession:  # type: ignore[misc]
    """A client that opens a new connection per request: a refused body can end one."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def send(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict]:
    async with http.post(url, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as r:
        assert r.content_type == "application/json", (r.status, await r.text())
        return r.status, await r.json()


def encoded(body: dict, encoding: str) -> bytes:
    raw = json.dumps(body).encode()
    if encoding == "gzip":
        return gzip.compress(raw)
    if encoding == "deflate":
        return zlib.compress(raw)
    return raw


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_taken(server: ServerProcess, fresh, encoding: str):
    headers = {**JSON_HEADERS, "Content-Encoding": encoding}
    status, body = await send(
        fresh, f"{server.url}/v1/comments", encoded(COMMENT, encoding), headers
    )
    assert status == 201 and body["comment"]["message"] == "hello"


@pytest.mark.parametrize(
    "case",
    [
        ("gzip", b'{"not": "gzip"}', 400, "invalid_request"),  # was a 500
        ("deflate", b'{"not": "deflate"}', 400, "invalid_request"),  # was a plain-text 400
        ("gzip", gzip.compress(json.dumps(COMMENT).encode())[:-12], 400, "invalid_request"),
        ("br", b"\x0b\x02\x80{}\x03", 415, "unsupported_encoding"),
        ("zstd", b"(\xb5/\xfd", 415, "unsupported_encoding"),
        ("bogus", json.dumps(COMMENT).encode(), 415, "unsupported_encoding"),  # was read as is
    ],
)
async def test_bodies_that_are_not_what_their_encoding_says(
    server: ServerProcess, fresh, case: tuple[str, bytes, int, str]
):
    encoding, raw, status, code = case
    headers = {**JSON_HEADERS, "Content-Encoding": encoding}
    got, body = await send(fresh, f"{server.url}/v1/comments", raw, headers)
    assert (got, body["error"]["code"]) == (status, code), body


async def test_a_gzip_bomb_is_413_after_decompressing_at_most_the_limit(server, fresh):
    bomb = gzip.compress(b" " * 10_000_000)  # 10 MB of spaces in ~10 KB
    headers = {**JSON_HEADERS, "Content-Encoding": "gzip"}
    status, body = await send(fresh, f"{server.url}/v1/comments", bomb, headers)
    assert (status, body["error"]["code"]) == (413, "body_too_large")


@pytest.mark.parametrize(
    "case",
    [
        (
            "application/x-www-form-urlencoded; charset=adv-bogus",
            b"post_id=p&uid=u&message=x",
            415,
            "unsupported_charset",
        ),
        ("application/x-www-form-urlencoded", b"message=%ff%fe", 400, "invalid_request"),
        ("multipart/form-data", b"garbage", 400, "invalid_request"),
        ("multipart/form-data; boundary=zzz", b"garbage", 400, "invalid_request"),
        ("multipart/form-data; boundary=zzz", b"--zzz\r\nbroken", 400, "invalid_request"),
        (  # aiohttp raises RuntimeError on an unknown transfer encoding: was a 500
            "multipart/form-data; boundary=zzz",
            b'--zzz\r\nContent-Disposition: form-data; name="message"\r\n'
            b"Content-Transfer-Encoding: x-foo\r\n\r\nhi\r\n--zzz--\r\n",
            400,
            "invalid_request",
        ),
    ],
)
async def test_malformed_forms_are_400_or_415(
    server: ServerProcess, fresh, case: tuple[str, bytes, int, str]
):
    content_type, raw, status, code = case
    url = f"{server.url}/v1/comment?uid=u&post_id=p&message=x"
    got, body = await send(fresh, url, raw, {"Content-Type": content_type})
    assert (got, body["error"]["code"]) == (status, code), body


async def test_a_well_formed_multipart_form_is_taken(server: ServerProcess, fresh):
    form = aiohttp.FormData(COMMENT, default_to_multipart=True)
    async with fresh.post(f"{server.url}/v1/comment", data=form) as r:
        assert r.status == 201, await r.text()


# -- item 8: the body limit admits every message the message limit admits --------------------


EMOJI_MESSAGE = "\U0001f600" * 2000  # 2000 characters, the default limit


async def test_the_longest_emoji_message_fits_as_ascii_escaped_json(server, fresh):
    raw = json.dumps({**COMMENT, "message": EMOJI_MESSAGE}, ensure_ascii=True).encode()
    assert len(raw) > 24_000
    status, body = await send(fresh, f"{server.url}/v1/comments", raw, JSON_HEADERS)
    assert status == 201 and body["comment"]["message"] == EMOJI_MESSAGE


async def test_the_longest_emoji_message_fits_as_a_form(server, fresh):
    raw = urllib.parse.urlencode({**COMMENT, "message": EMOJI_MESSAGE}).encode()
    assert len(raw) > 24_000
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, body = await send(fresh, f"{server.url}/v1/comment", raw, headers)
    assert status == 201 and body["comment"]["message"] == EMOJI_MESSAGE


async def test_the_longest_emoji_message_fits_in_a_query_string(server, fresh):
    """The design's original form puts the whole comment in the request line."""
    query = urllib.parse.urlencode({**COMMENT, "message": EMOJI_MESSAGE})
    assert len(query) > 24_000
    status, body = await send(fresh, f"{server.url}/v1/comment?{query}", b"", {})
    assert status == 201 and body["comment"]["message"] == EMOJI_MESSAGE


# -- item 13: slow senders are cut ------------------------------------------------------------


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_within_the_idle_timeout(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    try:
        for byte in head:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                    break  # closed by the server
            except TimeoutError:
                pass
            assert time.monotonic() - started < 10, "a slow request head is never cut"
    except ConnectionError:
        pass
    finally:
        writer.close()
    # http.idle_timeout is 1 s here (aiohttp's timer fires on its next whole second or so).
    assert time.monotonic() - started < 4


async def test_a_body_sent_a_byte_at_a_time_gets_408_within_the_body_timeout(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    raw = json.dumps(COMMENT).encode()
    writer.write(
        b"POST /v1/comments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(raw)}\r\n\r\n".encode()
    )
    started = time.monotonic()
    response = b""
    for byte in raw:
        writer.write(bytes([byte]))
        try:
            response = await asyncio.wait_for(reader.read(4096), 0.3)
        except TimeoutError:
            continue
        break
    writer.close()
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b'"body_timeout"' in response
    assert time.monotonic() - started < 4
