"""The one error shape of the API: `{"error": {"code": str, "message": str}}`.

Handlers raise `ApiError`; the app's middleware renders it (and any aiohttp HTTP error) in that
shape, and the WebSocket handler turns it into an `{"type": "error", ...}` event.
"""

from __future__ import annotations


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
