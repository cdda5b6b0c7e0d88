"""Tokens as a site's login would mint them (PyJWT, HS256), for servers in jwt mode."""

from __future__ import annotations

import time
from typing import Any

import jwt

SECRET = "test-secret-of-at-least-32-bytes-0123456789"
SERVER_KEY = "server-key-of-at-least-32-bytes-0123456789"


def jwt_env(**extra: str) -> dict[str, str]:
    """A server's environment for jwt mode with SECRET and SERVER_KEY."""
    return {
        "LIVECOMMENTS_AUTH_MODE": "jwt",
        "LIVECOMMENTS_AUTH_SECRET": SECRET,
        "LIVECOMMENTS_AUTH_SERVER_KEYS": SERVER_KEY,
        **extra,
    }


def mint(sub: str, ttl: float = 300, secret: str = SECRET, **claims: Any) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": int(now), "exp": now + ttl, **claims}, secret, "HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
