"""Request bodies: bounded in bytes and in time, decoded by us, and every failure a 4xx.

aiohttp is told not to decompress (`auto_decompress=False` in cli.serve), because what its
parser does with a body it cannot decode is a plain-text 400 (or, for gzip, an exception from
`request.read()` that reached clients as a 500), and an encoding it does not know it passes
through as if it were plain bytes. Here:

* `Content-Encoding` is `identity`, `gzip` or `deflate`; anything else is 415.
* The body on the wire is at most `limits.body_max_bytes` (aiohttp's `client_max_size`: 413),
  and so is the body once decompressed: a small gzip bomb is 413 too, found after decompressing
  at most one byte more than the limit.
* The whole body must arrive within `http.body_timeout` seconds of the request head: a client
  sending one byte a second is answered 408, not waited for.
* A body that is not what its `Content-Encoding` says is 400; a form in a charset Python does
  not know is 415, one that is not valid in its charset 400.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import zlib
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from livecomments.api.errors import ApiError, invalid

ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")
# zlib's window bits: 32 + 15 accepts a gzip or a zlib header; -15 is raw deflate, which some
# clients send as "deflate" although RFC 9110 says zlib.
_AUTO_HEADER = 32 + zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
# Fields one form may carry; ours has seven.
MAX_FORM_FIELDS = 64


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request bodies are limited to {limit} bytes")


def _encoding(request: web.Request) -> str:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in ENCODINGS:
        raise ApiError(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding[:40]!r} is not supported; use gzip, deflate or none",
        )
    return encoding


async def read_body(request: web.Request, limit: int, within: float) -> bytes:
    """The decoded body, or an ApiError (408, 413, 415, 400)."""
    encoding = _encoding(request)
    raw = await _read_raw(request, within)
    if encoding == "identity":
        return raw
    return decompress(raw, limit, raw_deflate_too=encoding == "deflate")


async def _read_raw(request: web.Request, within: float) -> bytes:
    try:
        async with asyncio.timeout(within):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the request body did not arrive within {within:g}s"
        ) from None
    except RequestPayloadError as e:  # the body was cut off or malformed in transfer
        raise invalid("body", f"could not be read: {e}") from None


def decompress(data: bytes, limit: int, *, raw_deflate_too: bool = False) -> bytes:
    """Inflate a gzip or zlib body (and raw deflate if asked), never past `limit` bytes."""
    try:
        return _inflate(data, limit, _AUTO_HEADER)
    except zlib.error:
        if not raw_deflate_too:
            raise invalid("body", "is not valid for its Content-Encoding") from None
    try:
        return _inflate(data, limit, _RAW_DEFLATE)
    except zlib.error:
        raise invalid("body", "is not valid for its Content-Encoding") from None


def _inflate(data: bytes, limit: int, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit:
        raise too_large(limit)
    if not inflater.eof:
        raise zlib.error("truncated stream")
    return out


async def read_form(request: web.Request, limit: int, within: float) -> Mapping[str, str]:
    """The fields of a form body (urlencoded or multipart); none for other content types."""
    if request.content_type == FORM:
        body = await read_body(request, limit, within)
        return _parse_urlencoded(body, request.charset or "utf-8")
    if request.content_type == MULTIPART:
        if _encoding(request) != "identity":
            raise ApiError(415, "unsupported_encoding", "multipart bodies cannot be compressed")
        return await _read_multipart(request, within)
    return {}


def _parse_urlencoded(body: bytes, charset: str) -> Mapping[str, str]:
    try:
        text = body.decode(charset)  # percent-escapes are ASCII; a raw form may not be
    except LookupError:
        raise ApiError(
            415, "unsupported_charset", f"charset {charset[:40]!r} is not supported"
        ) from None
    except UnicodeDecodeError:
        raise invalid("body", f"is not valid {charset}") from None
    try:
        pairs = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
            encoding=charset,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid("body", f"is not a valid form: {e}") from None
    return dict(pairs)


async def _read_multipart(request: web.Request, within: float) -> Mapping[str, str]:
    try:
        async with asyncio.timeout(within):
            form = await request.post()
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the request body did not arrive within {within:g}s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise
    except (
        ValueError,
        LookupError,
        AssertionError,
        RuntimeError,
        RequestPayloadError,
        HttpProcessingError,
    ) as e:
        # aiohttp's multipart reader asserts, raises ValueError, RuntimeError (an unknown
        # Content-Transfer-Encoding) or its header parser's errors on malformed input.
        raise invalid("body", f"is not a valid multipart form: {str(e)[:80]}") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}
