"""`GET /openapi.json`: the API's OpenAPI 3.1 description, livecomments/static/openapi.json.

The description is written by hand, not generated from the handlers. The API is small (a dozen
operations), so a generator would save little; it would add a dependency to the service, and it
would hide the contract: what a client may rely on would be whatever the code happened to do.
Written down, a change to the contract is a change to this file, seen in review. It is kept true
by tests instead: tests/functional/test_openapi_functional.py (every route aiohttp serves is in
it and every path in it is served; real answers validate against its schemas) and
tests/functional/test_schemathesis_functional.py (a fuzzer driven by it, against a live server).

The bytes are read once and served as they are: the document never changes while the process
runs.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web


@cache
def document() -> bytes:
    """The description's bytes, read from the package once."""
    return resources.files("livecomments").joinpath("static/openapi.json").read_bytes()


async def spec(request: web.Request) -> web.Response:
    """The OpenAPI description, as JSON."""
    return web.Response(body=document(), content_type="application/json")
