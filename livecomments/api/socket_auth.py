"""A WebSocket's identity over its life: given at the upgrade or by its first frame, renewed by
`refresh`, ended by its token's expiry.

* At the upgrade: `Authorization` (Bearer or Key) or `?token=`. A refused credential is a 401
  before the upgrade (ws.py).
* Or as the first frame, `{"type":"auth","token":T}`, answered `authenticated`. Needed when
  `auth.read = "token"` and the upgrade carried no credential: until it comes, every other frame
  but `ping` gets an `unauthenticated` error, and a socket that sends none within
  AUTH_TIMEOUT seconds is closed with 4401. A refused token there closes with 4401 too.
* `{"type":"refresh","token":T}` (or a second `auth`) replaces the token by a newer one of the
  same subject, answered `authenticated`; a refused one gets an error event and changes nothing.
* A token's socket is closed with 4401 ("token expired") when the token expires (its `exp`,
  plus `auth.leeway`, as verification allows), unless a refresh came first.

Browsers cannot set headers on a WebSocket, and `?token=` ends up in access logs: the first
frame is the way the page and the README's client use.
"""

from __future__ import annotations

import asyncio
import time

from livecomments.api.auth import ANONYMOUS, Authenticator, AuthError, Identity
from livecomments.api.errors import ApiError
from livecomments.live import events
from livecomments.live.conn import Conn, text_frame

CLOSE_UNAUTHENTICATED = 4401  # no usable credential (missing, refused or expired): get one
AUTH_TIMEOUT = 5.0  # seconds a socket that must authenticate has to send its auth frame


class SocketAuth:
    def __init__(
        self,
        conn: Conn,
        authenticator: Authenticator,
        identity: Identity | None,
        *,
        required: bool,
    ) -> None:
        self._conn = conn
        self._auth = authenticator
        self.identity = identity or ANONYMOUS
        # Still owes its auth frame: `auth.read = "token"` and nothing came with the upgrade.
        self.pending = required and identity is None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm the first deadline: the auth frame's, or the upgrade token's expiry."""
        if self.pending:
            self._arm(AUTH_TIMEOUT, f"no auth frame within {AUTH_TIMEOUT:g} s")
        else:
            self._arm_expiry()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def on_token(self, token: object) -> None:
        """An `auth` or `refresh` frame's token."""
        if not isinstance(token, str) or not token:
            raise ApiError(400, "invalid_request", "token: must be a non-empty string")
        first = self.pending or self.identity is ANONYMOUS
        try:
            identity = await self._auth.identify(None, token)
        except AuthError as e:
            if self.pending:  # the socket cannot be used without it: say why, then close
                self._conn.offer(text_frame(events.error(e.code, e.message)))
                self.close(e.message)
                return
            raise
        if not first and identity.sub != self.identity.sub:
            raise ApiError(403, "forbidden", "a refresh token must be for the same sub")
        self.identity = identity
        self.pending = False
        self.stop()
        self._arm_expiry()
        self._conn.offer(
            text_frame(events.authenticated(identity.sub, identity.moderator, identity.expires_at))
        )

    def close(self, why: str) -> None:
        self._conn.close_soon(CLOSE_UNAUTHENTICATED, why.encode()[:120])

    def _arm_expiry(self) -> None:
        expires_at = self.identity.expires_at
        if expires_at is not None:
            left = expires_at + self._auth.settings.leeway - time.time()
            self._arm(max(0.0, left), "token expired")

    def _arm(self, delay: float, why: str) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire, why)

    def _expire(self, why: str) -> None:
        self._timer = None
        code = "token_expired" if why == "token expired" else "unauthenticated"
        self._conn.offer(text_frame(events.error(code, why)))
        self.close(why)
