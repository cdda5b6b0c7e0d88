"""Who is asking: an `Identity` from a request's credentials, by the `[auth]` settings.

Credentials (`Authenticator.identify(authorization, token)`):

* `Authorization: Key <k>`: one of `auth.server_keys` (compared in constant time): the site's
  own backend, which may act for any uid (`Identity.server`). Only in the header: a key in a
  URL would end up in access logs.
* `Authorization: Bearer <jwt>`, or a raw `token` (the WebSocket's `?token=` or its first auth
  frame); the header wins when both are given.

A token is verified with PyJWT against the one key configured (`secret`, `public_key` or the
JWKS), with `algorithms` pinned to the configured ones: `none` never, HS* only with the secret,
a JWKS key only for the algorithm it is bound to (jwks.py). `exp` and `sub` are required, `iss`
and `aud` when configured, with `leeway` seconds of clock skew. The claims then say:

* `sub`: the author (`Identity.sub`), a non-empty string.
* `auth.roles_claim` (default `roles`): a list of role names (or one space-separated string);
  `auth.moderator_role` (default `moderator`) among them makes a moderator.
* `auth.scope_claim` (default `posts`): the post id patterns the token may read and comment
  on, a list (or one space-separated string; post ids have no spaces) of at most
  `MAX_SCOPE_PATTERNS`; `*` matches any run of characters, `?` one, nothing else is special.
  Absent: every post.
* `exp`: `Identity.expires_at`, for closing sockets whose token has run out.

Modes: `open` needs no credential (`ANONYMOUS`), `jwt` refuses a request without one
(`unauthenticated`). In both, a credential that is sent must be valid: a wrong or expired one is
refused (`invalid_token`, `token_expired`), never taken as anonymous, since its sender believes
it is someone. Refusals are `AuthError`s, an `ApiError` with status 401 and a
`WWW-Authenticate` header (RFC 6750). Every outcome is counted: `livecomments_auth_total{result}`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from livecomments import metrics
from livecomments.api.errors import ApiError
from livecomments.api.jwks import JwksKeys
from livecomments.config import AuthSettings, ConfigError

log = logging.getLogger(__name__)

AuthErrorCode = Literal["unauthenticated", "invalid_token", "token_expired"]

# Characters of a token we look at: real ones are well under 4 KiB; a larger one is refused
# before any parsing.
MAX_TOKEN_CHARS = 8 * 1024
MAX_SCOPE_PATTERNS = 100
# Smaller RSA keys are factorable (NIST SP 800-131A); PyJWT also warns on each use of one.
MIN_RSA_BITS = 2048
MAX_PATTERN_CHARS = 256
# Used when `auth.algorithms` is empty, by the verifier configured.
SECRET_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = ("RS256", "ES256")
_RSA: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVES: dict[str, tuple[str, ...]] = {
    "secp256r1": ("ES256",),
    "secp384r1": ("ES384",),
    "secp521r1": ("ES512",),
}


class AuthError(ApiError):
    """Refused credentials: 401 with `code` (unauthenticated, invalid_token, token_expired)."""

    def __init__(self, code: AuthErrorCode, message: str) -> None:
        challenge = "Bearer" if code == "unauthenticated" else 'Bearer error="invalid_token"'
        super().__init__(401, code, message, {"WWW-Authenticate": challenge})
        self.code: AuthErrorCode = code


def matches(pattern: str, post_id: str) -> bool:
    """`*` matches any run of characters, `?` any one; the rest only itself. Linear-time-ish
    (at worst pattern x id steps): no regex, so no pattern can make it backtrack for ages."""
    p = i = 0
    star, resume = -1, 0  # the last `*` seen, and where in post_id it started matching
    while i < len(post_id):
        if p < len(pattern) and pattern[p] in ("?", post_id[i]) and pattern[p] != "*":
            p, i = p + 1, i + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume, p = p, i, p + 1
        elif star >= 0:  # backtrack: the last `*` takes one more character
            resume += 1
            p, i = star + 1, resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request comes from. `sub`: the author, None for the anonymous and for a server
    key. `server`: came with a server key, may act for any uid. `scope`: post id patterns
    (see `matches`), None for every post. `expires_at`: Unix seconds its token expires."""

    sub: str | None
    moderator: bool = False
    server: bool = False
    scope: tuple[str, ...] | None = None
    expires_at: float | None = None

    def may_access(self, post_id: str) -> bool:
        """Whether this identity may read and comment on `post_id`."""
        return self.scope is None or any(matches(p, post_id) for p in self.scope)


ANONYMOUS = Identity(None)
# The counters of a successful identification, looked up once: every request counts one, and
# prometheus-client's labels() takes a lock and builds a key each time.
_AUTHENTICATED = {
    r: metrics.AUTHENTICATIONS.labels(r) for r in ("server_key", "token", "anonymous")
}
SERVER = Identity(None, server=True)


def load_public_key(path: str, algorithms: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """The PEM public key (or certificate's key) at `path`, and the algorithms to verify
    with: `algorithms` if given and fit for the key, else the key type's default.
    ConfigError naming `auth.public_key` or `auth.algorithms` if not."""
    try:
        data = Path(path).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"auth.public_key: cannot load {path}: {e}") from None
    fit: tuple[str, ...] = ()
    if isinstance(key, rsa.RSAPublicKey):
        fit = _RSA
    elif isinstance(key, ec.EllipticCurvePublicKey):
        fit = _CURVES.get(key.curve.name, ())
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        fit = ("EdDSA",)
    if not fit:
        raise ConfigError(f"auth.public_key: {path}: not an RSA, EC (P-256/384/521) or EdDSA key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"auth.public_key: {path}: RSA keys need {MIN_RSA_BITS} bits at least")
    for alg in algorithms:
        if alg not in fit:
            raise ConfigError(f"auth.algorithms: {alg} does not fit the key in {path}")
    return key, tuple(algorithms) or fit[:1]


class Authenticator:
    """`identify()` per request; `start()`/`close()` around the app's life (the JWKS's worker
    and HTTP session; nothing to do for a secret or a public key)."""

    def __init__(
        self, settings: AuthSettings, *, jwks_clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        # Compared as digests: equal lengths, so compare_digest leaks nothing about the keys.
        self._server_keys = [hashlib.sha256(k.encode()).digest() for k in settings.server_keys]
        self._key: Any = None
        self._jwks: JwksKeys | None = None
        self.algorithms: tuple[str, ...] = ()
        if settings.secret:
            self.algorithms = tuple(settings.algorithms) or SECRET_ALGORITHMS
            self._key = settings.secret
        elif settings.public_key:
            self._key, self.algorithms = load_public_key(settings.public_key, settings.algorithms)
        elif settings.jwks_url:
            self.algorithms = tuple(settings.algorithms) or JWKS_ALGORITHMS
            self._jwks = JwksKeys(settings.jwks_url, self.algorithms, clock=jwks_clock)
        required = ["exp", "sub"]
        required += ["iss"] if settings.issuer else []
        required += ["aud"] if settings.audience else []
        self._options: dict[str, Any] = {"require": required}

    async def start(self) -> None:
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def identify(self, authorization: str | None, token: str | None) -> Identity:
        """The identity the credentials prove; AuthError if they prove nothing (see the module
        docstring for what is accepted in each mode)."""
        try:
            identity = await self._identify(authorization, token)
        except AuthError as e:
            metrics.AUTHENTICATIONS.labels(e.code).inc()
            raise
        result = "server_key" if identity.server else "token" if identity.sub else "anonymous"
        _AUTHENTICATED[result].inc()
        return identity

    async def _identify(self, authorization: str | None, token: str | None) -> Identity:
        if authorization:
            scheme, _, credentials = authorization.strip().partition(" ")
            credentials = credentials.strip()
            if scheme.lower() == "key":
                return self._server(credentials)
            if scheme.lower() != "bearer":
                raise AuthError("invalid_token", "Authorization: expected Bearer or Key")
            if not credentials:
                raise AuthError("invalid_token", "Authorization: Bearer without a token")
            return await self._verify(credentials)
        if token:
            return await self._verify(token)
        if self.settings.mode == "open":
            return ANONYMOUS
        raise AuthError("unauthenticated", "a token is required")

    def _server(self, key: str) -> Identity:
        digest = hashlib.sha256(key.encode()).digest()
        found = False
        for known in self._server_keys:  # every key, found or not: the time tells nothing
            found |= hmac.compare_digest(digest, known)
        if not found:
            raise AuthError("invalid_token", "unknown server key")
        return SERVER

    async def _verify(self, token: str) -> Identity:
        if self._key is None and self._jwks is None:
            raise AuthError("invalid_token", "this server verifies no tokens (auth: no key)")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid_token", f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "malformed token") from None
        alg = header.get("alg")
        # Before any key is looked up: a token that could never pass costs no JWKS fetch.
        if alg not in self.algorithms:
            raise AuthError("invalid_token", "token algorithm not accepted")
        key = self._key
        if self._jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise AuthError("invalid_token", "malformed token: kid")
            key = await self._jwks.key(kid)
            if key is None:
                raise AuthError("invalid_token", "unknown signing key (kid)")
            # PyJWT checks this too (2.15); checked here so no version's default matters.
            if key.algorithm_name != alg:
                raise AuthError("invalid_token", "token algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                issuer=self.settings.issuer or None,
                audience=self.settings.audience or None,
                leeway=self.settings.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "token expired") from None
        except jwt.PyJWTError as e:
            raise AuthError("invalid_token", f"invalid token: {e}") from None
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid_token", "invalid token: sub must be a non-empty string")
        roles = _names(claims.get(self.settings.roles_claim, []), self.settings.roles_claim)
        scope = claims.get(self.settings.scope_claim)
        if scope is not None:
            scope = _names(scope, self.settings.scope_claim)
            if len(scope) > MAX_SCOPE_PATTERNS or any(len(p) > MAX_PATTERN_CHARS for p in scope):
                raise AuthError(
                    "invalid_token",
                    f"invalid token: {self.settings.scope_claim}: at most {MAX_SCOPE_PATTERNS} "
                    f"patterns of {MAX_PATTERN_CHARS} characters",
                )
        return Identity(
            sub,
            moderator=self.settings.moderator_role in roles,
            scope=scope,
            expires_at=float(claims["exp"]),
        )


def _names(value: Any, claim: str) -> tuple[str, ...]:
    """A claim that lists names: a list of strings, or one string of space-separated names."""
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AuthError("invalid_token", f"invalid token: {claim} must be a list of strings")
