"""Whom the service trusts, as settings: the `[auth]` section and `[http]`'s origins and
proxies, with the rules that tie their keys together.

It extends config.py (which builds the sections, range-checks `leeway` and `delete_window`, and
resolves a relative `public_key` path like `queue.dir`) and lives beside it so that neither
outgrows its room. What the keys do is api/auth.py's, api/origins.py's and api/peer.py's
business; `config.toml` documents each one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

AuthMode = Literal["open", "jwt"]
ReadAccess = Literal["public", "token"]

# Algorithms a token may be signed with; `none` never is.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
KEY_ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)
# Bytes a shared secret or a server key has at least: HS256's own key size (RFC 7518 3.2).
MIN_SECRET_BYTES = 32
# ... and a secret, for the HS* algorithms it verifies: each hash's own size.
HMAC_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class AuthSettings:
    """Who may write and read. Secrets stay out of `repr`, and so out of any log of settings."""

    mode: AuthMode = "open"
    # "token": reading (GET, WebSocket) needs a token too; the API enforces it.
    read: ReadAccess = "public"
    # The ways to verify a token: exactly one in jwt mode, at most one in open mode.
    secret: str = field(default="", repr=False)
    public_key: str = ""  # a PEM file; absolute once loaded
    jwks_url: str = ""
    # Empty: HS256 with a secret, by the key's type with public_key, RS256 and ES256 with a JWKS.
    algorithms: list[str] = field(default_factory=list)
    issuer: str = ""  # empty: not checked
    audience: str = ""  # empty: not checked (and a token that names one is refused)
    leeway: float = 30.0  # seconds of clock skew allowed on exp, nbf, iat
    server_keys: list[str] = field(default_factory=list, repr=False)
    # Seconds after posting during which an author may delete their own comment.
    delete_window: float = 900.0
    scope_claim: str = "posts"  # a list of post id patterns the token is for; absent: all
    roles_claim: str = "roles"  # a list of role names
    moderator_role: str = "moderator"  # the role (in roles_claim) that may delete any comment

    def verifiers(self) -> list[str]:
        """The names of the token-verification keys that are set, in a fixed order."""
        return [k for k in ("secret", "public_key", "jwks_url") if getattr(self, k)]


def check_auth(a: AuthSettings) -> None:
    """Raise ValueError("auth.<key>: why") if the keys do not fit together."""
    verifiers = a.verifiers()
    if a.mode == "jwt" and len(verifiers) != 1:
        raise ValueError("auth.mode: jwt needs exactly one of secret, public_key, jwks_url")
    if len(verifiers) > 1:
        raise ValueError(f"auth.{verifiers[1]}: set together with auth.{verifiers[0]}")
    if a.read == "token" and a.mode != "jwt":
        raise ValueError('auth.read: "token" needs auth.mode = "jwt"')
    # Short secrets fall to an offline brute force of any one token (HS*), or a guess (keys).
    if a.secret:
        needed = max([MIN_SECRET_BYTES] + [HMAC_SECRET_BYTES.get(x, 0) for x in a.algorithms])
        if len(a.secret.encode()) < needed:
            raise ValueError(f"auth.secret: must be at least {needed} bytes for auth.algorithms")
    if any(len(k.encode()) < MIN_SECRET_BYTES for k in a.server_keys):
        raise ValueError(f"auth.server_keys: each must be at least {MIN_SECRET_BYTES} bytes")
    if a.algorithms and not verifiers:
        raise ValueError("auth.algorithms: set without a secret, public_key or jwks_url")
    # HMAC only with the secret, and the secret only with HMAC: a public key used as an HMAC
    # secret is the classic algorithm-confusion forgery.
    allowed = HMAC_ALGORITHMS if a.secret else KEY_ALGORITHMS
    for alg in a.algorithms:
        if alg not in allowed:
            raise ValueError(
                f"auth.algorithms: {alg!r} cannot be used with auth.{verifiers[0]} "
                f"(allowed: {', '.join(allowed)})"
            )
    if a.jwks_url:
        _check_jwks_url(a.jwks_url)
    for name in ("scope_claim", "roles_claim", "moderator_role"):
        if not getattr(a, name):
            raise ValueError(f"auth.{name}: must not be empty")


def _check_jwks_url(jwks_url: str) -> None:
    # Keys fetched over plain HTTP could be anyone's: only a local test server may.
    url = urlsplit(jwks_url)
    local = url.scheme == "http" and url.hostname in LOOPBACK_HOSTS
    if not (url.scheme == "https" and url.hostname) and not local:
        raise ValueError("auth.jwks_url: must be https://host/... (http:// only to localhost)")


def check_origins(origins: list[str]) -> None:
    """`http.allowed_origins`: "*" alone, or origins as browsers send them (scheme://host[:port],
    no path): anything else would never match, silently."""
    if "*" in origins and len(origins) > 1:
        raise ValueError('http.allowed_origins: "*" allows every origin; list nothing beside it')
    for origin in origins:
        if origin == "*":
            continue
        url = urlsplit(origin)
        if (
            url.scheme not in ("http", "https")
            or not url.hostname
            or url.path
            or url.query
            or url.fragment
            or origin != origin.lower()
        ):
            raise ValueError(
                f"http.allowed_origins: expected scheme://host[:port] in lower case, got {origin!r}"
            )


def check_proxies(proxies: list[str]) -> None:
    """`http.trusted_proxies`: addresses or networks (CIDR)."""
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ValueError(
                f"http.trusted_proxies: expected an address or a network, got {proxy!r}"
            ) from None
