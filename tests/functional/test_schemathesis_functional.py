"""schemathesis against a live server, driven by the API's own description (openapi.json).

Every documented operation gets the description's examples, schemathesis's coverage cases
(boundaries, each constraint broken once, undocumented methods) and up to `MAX_EXAMPLES`
generated requests, valid and invalid. Every answer must be: no 5xx; a status the operation
documents; the documented content type, schema and headers; every error in the one error shape
`{"error": {"code", "message"}}`; invalid input refused; an undocumented method 405 with `Allow`.

Reproducible and bounded: the seed is fixed and generation derandomized (the same requests on
every run; none are remembered between runs); each request has a timeout, each operation's test
the file's pytest timeout. One server (SQLite, no Redis, comment rate limits off, so that 429s
do not stand in for the answers under test) serves the whole module. schemathesis's stateful
phase (chains of calls through the description's links) is not run: pytest gets one test per
operation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from livecomments.api.app import MAX_HEADER_BYTES, REQUEST_LINE_OVERHEAD
from livecomments.config import LimitsSettings
from tests.support.server import REPO, ServerProcess

OPENAPI_JSON = REPO / "livecomments" / "static" / "openapi.json"

# Generated requests per operation in the fuzzing phase; the examples and coverage phases add
# their own (a few dozen per operation, fixed by the description).
MAX_EXAMPLES = 30
SEED = 20261127
REQUEST_TIMEOUT = 10.0  # seconds; the slowest answer is DELETE's 404 (it looks for 1 s)
# Bytes of a request line (max_line_size) and of a header line (max_field_size) aiohttp's
# parser takes, as api/app.py's runner_options sets them; beyond, it answers 400 in plain text.
REQUEST_LINE_MAX = LimitsSettings().body_max_bytes + REQUEST_LINE_OVERHEAD
HEADER_LINE_MAX = MAX_HEADER_BYTES
# A DELETE of a comment this instance cannot find looks for it during a second before its 404
# (api/delete.py, FIND_WAIT), and nearly every generated id is one: DELETE gets fewer generated
# requests and no coverage phase (its ~40 boundary cases took 16 s), which keeps the file under
# a minute. Its answers are checked in test_openapi_functional.py as well.
DELETE_MAX_EXAMPLES = 10

pytestmark = pytest.mark.timeout(90)

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "request-timeout": REQUEST_TIMEOUT,
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "operations": [
            {
                "include-method": "DELETE",
                "generation": {"max-examples": DELETE_MAX_EXAMPLES},
                "phases": {"coverage": {"enabled": False}},
            },
        ],
    }
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"LIVECOMMENTS_LIMITS_COMMENTS_PER_MINUTE": "0"}
    s = ServerProcess(tmp_path_factory.mktemp("schemathesis"), env=env).start()
    yield s
    assert s.stop() == 0, s.logs()
    assert "Traceback" not in s.logs(), s.logs()


def error_in_documented_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx is JSON `{"error": {"code": str, "message": str}}` and nothing else.

    The one non-2xx that is not an error is /readyz's 503, a readiness report."""
    if response.status_code < 400 or case.operation.path == "/readyz":
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == "application/json", content_type
    body: Any = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
    error_in_documented_shape,
]
# Not checked: positive_data_acceptance (every request the description allows gets a 2xx). Some
# rules span fields and no schema can say them: `before` and `after` together are 400, `uid` is
# required unless a token names the author, /v1/ws answers 400 to anything but an upgrade.


def checks_for(case: Case) -> list[Any]:
    method, path = case.operation.method.upper(), case.operation.path
    if method == "POST" and path == "/v1/comment":
        # The original form takes each field from the query string or the form body, the body
        # winning: an invalid query `uid` next to a valid body `uid` is rightly accepted.
        return [c for c in CHECKS if c is not negative_data_rejection]
    if method == "OPTIONS":
        # Undeclared methods are sent with the preflight's headers, its `Origin` among them: a
        # write from a foreign origin is refused (403) before routing could say 405, by design
        # (api/origins.py). Other operations declare no Origin and get their 405s checked.
        return [c for c in CHECKS if c is not unsupported_method]
    return CHECKS


# The description as the package ships it: test_openapi_functional.py checks that the server
# serves these very bytes. Loaded at import, so that pytest lists one test per operation.
schema = schemathesis.openapi.from_path(OPENAPI_JSON, config=CONFIG)


def past_the_parsers_limit(response: Response) -> bool:
    """Whether the request had a line (request line or header) longer than aiohttp's parser
    takes, which it answers itself, before the app, with a plain-text 400. The description
    says so; the fuzzer's long query strings (a 2000-character message, percent-encoded) reach
    it on POST /v1/comment."""
    request = response.request

    def size(line: str) -> int:
        return len(line.encode("utf-8", "surrogateescape"))

    headers = [f"{name}: {value}" for name, value in request.headers.items()]
    return size(f"{request.method} {request.path_url} HTTP/1.1") > REQUEST_LINE_MAX or any(
        size(line) > HEADER_LINE_MAX for line in headers
    )


# pytest 9.2 builds an item's id from its function's name and its own parameters, while
# schemathesis 4.32 puts the operation in the item's name only: without a parameter of pytest's,
# every operation's item would have the same id (and `--lf`, `-k` by id and the report could not
# tell them apart). The store is the one the server runs on.
@pytest.mark.parametrize("store", ["sqlite"])
@schema.parametrize()
def test_every_answer_is_documented(case: Case, server: ServerProcess, store: str) -> None:
    response = case.call(base_url=server.url)
    if past_the_parsers_limit(response):
        assert response.status_code == 400, response.status_code
        assert response.headers["content-type"][0].startswith("text/plain"), response.headers
        return
    case.validate_response(
        response, checks=checks_for(case), transport_kwargs={"base_url": server.url}
    )
