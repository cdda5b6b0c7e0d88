"""/openapi.json is true: valid OpenAPI 3.1, every route in it and only those, real answers in it.

What is checked:

* the document: valid against the OpenAPI 3.1 schema, each of its schemas a valid JSON Schema,
  every `$ref` resolving, operation ids unique, the version the package's;
* its limits are config.toml's defaults (ids, messages, pages), and a message's "white space"
  is exactly Python's;
* the routes: every (method, path) aiohttp routes is documented, every documented one is routed
  (HEAD comes with every GET in aiohttp and is not listed; OPTIONS, the CORS preflight, is
  answered for every route by api/origins.py's middleware);
* real answers from a real server, from 201 to 503, the trust answers of issue 11 (401, 403,
  429, preflights) included: each status is one its operation documents, with the documented
  content type, body schema and required headers; every error in the one error shape; an
  undocumented method 405 with `Allow` naming the documented ones.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import signal
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import aiohttp
import jsonschema_rs
import pytest

# The OpenAPI 3.1 schema (https://spec.openapis.org/oas/3.1/schema/2022-10-07), as schemathesis
# ships it; it checks the document's structure, not the JSON Schemas inside (checked below).
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from livecomments.api.app import create_app
from livecomments.config import LimitsSettings, Settings
from tests.support.server import REPO, ServerProcess
from tests.support.tokens import SECRET, SERVER_KEY, bearer, jwt_env, mint

SPEC: dict[str, Any] = json.loads((REPO / "livecomments" / "static" / "openapi.json").read_text())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def resolve(obj: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/components/...`) to what it names."""
    while "$ref" in obj:
        node: Any = SPEC
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        obj = node
    return obj


def validator(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A JSON Schema 2020-12 validator for `schema`, its `#/components/...` refs resolvable."""
    return jsonschema_rs.Draft202012Validator({"allOf": [schema], "components": SPEC["components"]})


# -- the document ---------------------------------------------------------------------------------


def test_the_description_is_valid_openapi_3_1():
    errors = [f"{e.instance_path}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(SPEC)]
    assert errors == []
    assert SPEC["openapi"].startswith("3.1.")
    assert SPEC["info"]["version"] == metadata.version("livecomments")

    schemas: list[dict[str, Any]] = []
    refs: list[str] = []

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            if key == "schema":
                schemas.append(node)
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(SPEC)
    schemas.extend(SPEC["components"]["schemas"].values())
    assert schemas and refs
    for schema in schemas:
        assert jsonschema_rs.meta.is_valid(schema), schema
        validator(schema)  # builds only if every $ref in it resolves
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        resolve({"$ref": ref})  # KeyError if it names nothing
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids)), ids
    for method, path, op in operations():  # a templated path's parameters, on each operation
        declared = SPEC["paths"][path].get("parameters", []) + op.get("parameters", [])
        in_path = {p["name"] for p in map(resolve, declared) if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), (method, path)


def test_its_limits_are_the_configs():
    limits = LimitsSettings()
    schemas = SPEC["components"]["schemas"]
    assert schemas["Id"]["maxLength"] == limits.id_max_chars
    assert schemas["Id"]["pattern"] == f"^[A-Za-z0-9._:-]{{1,{limits.id_max_chars}}}$"
    assert schemas["OptionalId"]["maxLength"] == limits.id_max_chars
    assert schemas["Message"]["maxLength"] == limits.message_max_chars
    limit = next(
        p for p in SPEC["paths"]["/v1/comments"]["get"]["parameters"] if p.get("name") == "limit"
    )
    assert limit["schema"]["maximum"] == limits.page_max
    assert limit["schema"]["default"] == limits.page_default
    assert SPEC["components"]["schemas"]["Page"]["properties"]["comments"]["maxItems"] == (
        limits.page_max
    )

    # A message must hold a character that is neither white space (what str.strip() removes, so
    # str.isspace) nor NUL: the pattern spells that class out, since JSON Schema's `\s` differs.
    message = jsonschema_rs.validator_for(schemas["Message"])
    for code in range(0x3100):
        char = chr(code)
        blank = char.isspace() or char == "\0"
        assert message.is_valid(char) is not blank, hex(code)
    assert not message.is_valid("ok\0") and message.is_valid(" \u3000x\n")


async def test_every_route_is_documented_and_every_documented_route_is_routed():
    app = create_app(Settings())
    routed: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else "?"
        routed.add((route.method, path))
    gets = {path for method, path in routed if method == "GET"}
    # aiohttp answers HEAD for every GET route (add_get's allow_head); the description lists GET.
    routed = {(m, p) for m, p in routed if not (m == "HEAD" and p in gets)}
    documented = {(method, path) for method, path, _ in operations()}
    # OPTIONS is answered for every route by a middleware (api/origins.py), not routed: it is
    # documented on every path, and test_trust_answers_match_the_description asks each.
    preflights = {(method, path) for method, path in documented if method == "OPTIONS"}
    assert preflights == {("OPTIONS", path) for path in SPEC["paths"]}
    assert not any(m == "OPTIONS" for m, _ in routed)
    assert sorted(routed - documented) == [], "routed, not documented"
    assert sorted(documented - preflights - routed) == [], "documented, not routed"


# -- real answers ---------------------------------------------------------------------------------


def check_answer(
    method: str, path: str, status: int, headers: Any, body: bytes, *, want: int | None
) -> Any:
    """The answer is one the description gives for `method path`; returns the parsed body."""
    operation = SPEC["paths"][path][method.lower()]
    documented = operation["responses"]
    assert str(status) in documented, (method, path, status, body[:300])
    if want is not None:
        assert status == want, (method, path, status, body[:300])
    response = resolve(documented[str(status)])
    for name, documented_header in response.get("headers", {}).items():
        header = resolve(documented_header)
        value = headers.get(name)
        if header.get("required"):
            assert value is not None, (method, path, status, f"no {name} header")
        if value is not None:
            assert jsonschema_rs.validator_for(header["schema"]).is_valid(value), (name, value)
    content = response.get("content")
    if not content:
        return None
    media_type = headers.get("Content-Type", "").split(";")[0].strip()
    assert media_type in content, (method, path, status, media_type)
    if media_type != "application/json":
        return body.decode()
    parsed = json.loads(body)
    schema = validator(content[media_type]["schema"])
    errors = [f"{e.instance_path}: {e.message}" for e in schema.iter_errors(parsed)]
    assert not errors, f"{method} {path} {status} {parsed}: " + "; ".join(errors)
    if status >= 400 and path != "/readyz":  # /readyz's 503 is a report, not an error
        assert set(parsed) == {"error"} and set(parsed["error"]) == {"code", "message"}, parsed
    return parsed


class Api:
    """Requests to one server, each answer checked against the description on arrival."""

    def __init__(self, http: aiohttp.ClientSession, server: ServerProcess) -> None:
        self.http, self.server = http, server

    async def call(
        self, method: str, path: str, want: int | None, url_path: str | None = None, **kw: Any
    ) -> Any:
        url = f"{self.server.url}{url_path or path}"
        async with self.http.request(method, url, **kw) as r:
            body = await r.read()
            return check_answer(method, path, r.status, r.headers, body, want=want)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        # Rate limits off: this module posts more than a burst, and 429 is tested on its own.
        "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "0",
        "LIVECOMMENTS_HTTP_BODY_TIMEOUT": "1",  # 408 within a second
        "LIVECOMMENTS_SERVER_DRAIN_SECONDS": "0.5",
    }
    s = ServerProcess(tmp_path_factory.mktemp("openapi"), env=env).start()
    yield s
    assert s.stop() == 0, s.logs()
    assert "Traceback" not in s.logs(), s.logs()


async def test_the_server_serves_the_description(server: ServerProcess, http):
    async with http.get(f"{server.url}/openapi.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.read() == (REPO / "livecomments" / "static" / "openapi.json").read_bytes()


async def test_comments_answers_match_the_description(server: ServerProcess, http):
    api = Api(http, server)
    post, form = "/v1/comments", "/v1/comment"
    first = {"post_id": "oa", "uid": "ann", "message": "hi", "client_msg_id": "m1"}
    created = await api.call("POST", post, 201, json=first)
    assert (await api.call("POST", post, 201, json=first)) == created  # a retry
    await api.call("POST", post, 409, json={**first, "message": "another"})
    await api.call("POST", post, 201, json={**first, "client_msg_id": None, "parent_id": ""})
    await api.call("POST", post, 400, data=b"not json")
    await api.call("POST", post, 400, json=["a list"])
    await api.call("POST", post, 400, json={**first, "message": "x" * 2001})
    await api.call("POST", post, 400, json={**first, "message": " \u3000\n"})
    await api.call("POST", post, 400, json={**first, "uid": "no spaces"})
    await api.call("POST", post, 400, json={"uid": "ann", "message": "no post"})
    await api.call("POST", post, 413, data=b" " * 40_000)
    await api.call("POST", post, 415, data=b"{}", headers={"Content-Encoding": "br"})
    await api.call("POST", post, 400, data=b"{}", headers={"Content-Encoding": "gzip"})
    zipped = gzip.compress(json.dumps({**first, "client_msg_id": "m2"}).encode())
    await api.call("POST", post, 201, data=zipped, headers={"Content-Encoding": "gzip"})
    await api.call(
        "POST", post, 413, data=gzip.compress(b" " * 100_000), headers={"Content-Encoding": "gzip"}
    )

    await api.call("POST", form, 201, params={"post_id": "oa", "uid": "bo", "message": "q"})
    await api.call("POST", form, 201, data={"post_id": "oa", "uid": "bo", "message": "form"})
    fields = {"post_id": "oa", "uid": "bo", "message": "multi"}
    multipart = aiohttp.FormData(fields, default_to_multipart=True)
    await api.call("POST", form, 201, data=multipart)
    await api.call("POST", form, 400, params={"post_id": "oa", "message": "who?"})
    await api.call(
        "POST",
        form,
        415,
        data=b"post_id=oa",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=nope"},
    )

    get = "/v1/comments"
    page = await api.call("GET", get, 200, params={"post_id": "oa"})
    assert [c["message"] for c in page["comments"]][:2] == ["hi", "hi"]
    two = await api.call("GET", get, 200, params={"post_id": "oa", "limit": "2"})
    assert len(two["comments"]) == 2 and two["has_more"] is True
    await api.call("GET", get, 200, params={"post_id": "oa", "after": two["comments"][1]["id"]})
    await api.call("GET", get, 200, params={"post_id": "empty", "before": "0"})
    for bad in (
        {},
        {"post_id": "oa", "limit": "0"},
        {"post_id": "oa", "limit": "201"},
        {"post_id": "oa", "before": "1", "after": "1"},
        {"post_id": "oa", "before": "9223372036854775808"},
    ):
        await api.call("GET", get, 400, params=bad)

    one = "/v1/comments/{id}"
    mine = created["comment"]["id"]
    at = f"/v1/comments/{mine}"
    await api.call("DELETE", one, 403, at, params={"post_id": "oa", "uid": "not-ann"})
    await api.call("DELETE", one, 200, at, params={"post_id": "oa", "uid": "ann"})
    await api.call("DELETE", one, 200, at, params={"post_id": "oa", "uid": "ann"})  # again
    await api.call("DELETE", one, 404, "/v1/comments/12345", params={"post_id": "oa"})
    await api.call("DELETE", one, 400, "/v1/comments/abc", params={"post_id": "oa"})
    await api.call("DELETE", one, 400, at)  # no post_id


async def test_other_answers_match_the_description(server: ServerProcess, http):
    api = Api(http, server)
    for path in ("/", "/favicon.ico", "/openapi.json", "/healthz", "/readyz", "/metrics"):
        await api.call("GET", path, 200)
    await api.call("GET", "/v1/ws", 400)  # not an upgrade
    await api.call("GET", "/v1/ws", 400, params={"post_id": "no spaces", "epoch": "e"})
    assert (await upgrade(server, "/v1/ws?post_id=oa")).startswith("HTTP/1.1 101 ")

    # A body that stops arriving: 408.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/comments HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    head, body = await read_answer(reader)
    writer.close()
    check_answer("POST", "/v1/comments", head.status, head, body, want=408)


async def test_unknown_routes_and_methods_are_errors_in_the_shape(server: ServerProcess, http):
    async with http.get(f"{server.url}/v1/nothing-here") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
    for path, item in SPEC["paths"].items():
        url = server.url + path.replace("{id}", "1")
        documented = {m.upper() for m in METHODS if m in item} - {"OPTIONS"}
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - documented:
            async with http.request(method, url) as r:
                assert r.status == 405, (method, path, r.status)
                body = await r.json()
                assert set(body) == {"error"} and body["error"]["code"] == "method_not_allowed"
                allowed = set(r.headers["Allow"].split(","))
                assert documented <= allowed <= documented | {"HEAD", "OPTIONS"}, (path, allowed)


async def test_a_draining_instance_answers_as_documented(server: ServerProcess, http):
    """Last in this module: the server drains (SIGUSR1) and stays so."""
    api = Api(http, server)
    server.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while (ready := await api.call("GET", "/readyz", None))["status"] != "unavailable":
        assert time.monotonic() < deadline, ready
        await asyncio.sleep(0.05)
    await api.call("GET", "/readyz", 503)
    await api.call("GET", "/v1/ws", 503, params={"post_id": "oa"})
    head, body = await raw_upgrade(server, "/v1/ws?post_id=oa")
    check_answer("GET", "/v1/ws", head.status, head, body, want=503)


# -- trust (issue 11) ------------------------------------------------------------------------------

ALLOWED = "http://allowed.example"
FOREIGN = "http://foreign.example"
MALFORMED = "http://["  # once a plain-text 500 on every route (api/origins.py)


async def test_trust_answers_match_the_description(start_server, http):
    """Open mode with origins and tight limits: one of each answer the trust rules give."""
    env = {
        "LIVECOMMENTS_HTTP_ALLOWED_ORIGINS": ALLOWED,
        "LIVECOMMENTS_AUTH_SECRET": SECRET,
        "LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "1",
        "LIVECOMMENTS_LIMITS_COMMENTS_BURST": "1",
        "LIVECOMMENTS_LIMITS_WS_PER_IP": "1",
    }
    server = start_server(env=env)
    api = Api(http, server)
    post = "/v1/comments"
    comment = {"post_id": "p", "uid": "ann", "message": "hi"}
    await api.call("POST", post, 201, json=comment)
    await api.call("POST", post, 429, json=comment)  # per address: the uid is not verified
    await api.call("POST", post, 401, json=comment, headers=bearer("not-a-token"))
    for origin in (FOREIGN, MALFORMED):
        await api.call("POST", post, 403, json=comment, headers={"Origin": origin})
        await api.call("GET", post, 200, params={"post_id": "p"}, headers={"Origin": origin})
    async with http.get(f"{server.url}{post}?post_id=p", headers={"Origin": ALLOWED}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Origin" in r.headers["Vary"]

    head, body = await raw_upgrade(server, "/v1/ws?post_id=p", origin=FOREIGN)
    check_answer("GET", "/v1/ws", head.status, head, body, want=403)
    head, body = await raw_upgrade(server, "/v1/ws?post_id=p&token=not-a-token")
    check_answer("GET", "/v1/ws", head.status, head, body, want=401)
    async with http.ws_connect(f"{server.ws_url}?post_id=p"):
        head, body = await raw_upgrade(server, "/v1/ws?post_id=p")  # one socket per address
        check_answer("GET", "/v1/ws", head.status, head, body, want=429)

    for path, item in SPEC["paths"].items():
        url_path = path.replace("{id}", "1")
        methods = {m.upper() for m in METHODS if m in item}
        methods |= {"HEAD"} if "GET" in methods else set()  # aiohttp's, with every GET
        for origin, status in ((None, 204), (ALLOWED, 204), (FOREIGN, 403)):
            headers = {"Access-Control-Request-Method": "GET"}
            if origin is not None:
                headers["Origin"] = origin
            async with http.options(f"{server.url}{url_path}", headers=headers) as r:
                check_answer("OPTIONS", path, r.status, r.headers, await r.read(), want=status)
                if status == 204:
                    assert set(r.headers["Allow"].split(", ")) == methods, (path, r.headers)
                cors = r.headers.get("Access-Control-Allow-Origin")
                assert cors == (ALLOWED if origin == ALLOWED else None), (path, r.headers)


async def test_jwt_answers_match_the_description(start_server, http):
    """jwt mode, tokens needed to read too: 401, 403 and 200 as the description has them."""
    env = jwt_env(LIVECOMMENTS_AUTH_READ="token", LIVECOMMENTS_AUTH_DELETE_WINDOW="0.2")
    server = start_server(env=env)
    api = Api(http, server)
    post, one = "/v1/comments", "/v1/comments/{id}"
    ann, elsewhere = bearer(mint("ann")), bearer(mint("ann", posts=["other-*"]))
    comment = {"post_id": "p", "message": "hi"}
    await api.call("POST", post, 401, json=comment)
    await api.call("POST", post, 401, json=comment, headers=bearer(mint("ann", ttl=-60)))
    await api.call("POST", post, 403, json={**comment, "uid": "bo"}, headers=ann)
    await api.call("POST", post, 403, json=comment, headers=elsewhere)
    await api.call("POST", post, 400, json=comment, headers={"Authorization": f"Key {SERVER_KEY}"})
    created = await api.call("POST", post, 201, json=comment, headers=ann)
    await api.call("GET", post, 401, params={"post_id": "p"})
    await api.call("GET", post, 403, params={"post_id": "p"}, headers=elsewhere)
    await api.call("GET", post, 200, params={"post_id": "p"}, headers=ann)
    head, body = await raw_upgrade(server, f"/v1/ws?post_id=p&token={mint('ann', posts=[])}")
    check_answer("GET", "/v1/ws", head.status, head, body, want=403)
    head, body = await raw_upgrade(server, f"/v1/ws?post_id=p&token={mint('ann', ttl=-60)}")
    check_answer("GET", "/v1/ws", head.status, head, body, want=401)

    at = f"/v1/comments/{created['comment']['id']}"
    await api.call("DELETE", one, 401, at, params={"post_id": "p"})
    await api.call("DELETE", one, 403, at, params={"post_id": "p"}, headers=bearer(mint("bo")))
    await asyncio.sleep(0.3)  # past the delete window
    deleted = await api.call("DELETE", one, 403, at, params={"post_id": "p"}, headers=ann)
    assert deleted["error"]["code"] == "delete_window_passed"
    key = {"Authorization": f"Key {SERVER_KEY}"}
    await api.call("DELETE", one, 200, at, params={"post_id": "p"}, headers=key)


# -- raw HTTP -------------------------------------------------------------------------------------


class Head:
    """A response's status line and headers, read off the wire."""

    def __init__(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


async def read_answer(reader: asyncio.StreamReader) -> tuple[Head, bytes]:
    async with asyncio.timeout(10):
        raw = await reader.readuntil(b"\r\n\r\n")
        head = Head(raw[:-4])
        length = int(head.get("Content-Length") or 0)
        body = await reader.readexactly(length) if length else b""
    return head, body


async def raw_upgrade(
    server: ServerProcess, path: str, origin: str | None = None
) -> tuple[Head, bytes]:
    """A WebSocket upgrade on a plain connection: the HTTP answer, whatever it is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await read_answer(reader)
    finally:
        writer.close()


async def upgrade(server: ServerProcess, path: str) -> str:
    head, _ = await raw_upgrade(server, path)
    return head.status_line
