"""The one error shape of the API: `{"error": {"code": str, "message": str}}`.

Handlers raise `ApiError`; `error_middleware` renders it, and any aiohttp HTTP error, in that
shape (the WebSocket handler turns an ApiError into an `error` event instead). Every error
response is counted by code (`livecomments_http_errors_total`). A bug is logged with its
traceback and answered 500 in the same shape; it is never bad input's fault.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from livecomments import metrics

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying, by why it was refused.
RETRY_AFTER_QUEUE_FULL = 5  # the database is behind: give the backlog time to drain
RETRY_AFTER_QUEUE_UNAVAILABLE = 2  # the queue cannot write: it tries again every second
RETRY_AFTER_INSTANCE_ID = 5  # no usable instance id here: another instance can take it
RETRY_AFTER_STORE_UNAVAILABLE = 2  # a GET the database could not answer

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class ApiError(Exception):
    """A request the service refuses, with the HTTP status and a stable machine-readable code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def invalid(field: str, why: str) -> ApiError:
    return ApiError(400, "invalid_request", f"{field}: {why}")


def retry_after(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    metrics.HTTP_ERRORS.labels(code).inc()
    response = json_response({"error": {"code": code, "message": message}}, status)
    response.headers.update(headers or {})
    return response


def render(e: ApiError) -> web.Response:
    """An ApiError as its response, for the middlewares outside this one."""
    return _error_response(e.status, e.code, e.message, e.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as e:
        return _error_response(e.status, e.code, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return _error_response(e.status, _HTTP_CODES.get(e.status, "http_error"), e.reason, headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # A bug, not bad input: log it with the traceback, answer in the API's error shape.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "internal server error")
