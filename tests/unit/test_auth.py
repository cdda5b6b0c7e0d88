"""Identities from credentials: tokens signed with a secret or a public key, server keys, the
open and jwt modes, the claims, and the forgeries that must fail (alg none, HS/RS confusion,
algorithms not configured, expired or foreign tokens). JWKS: test_jwks.py."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from livecomments.api.auth import (
    ANONYMOUS,
    MAX_SCOPE_PATTERNS,
    MAX_TOKEN_CHARS,
    SERVER,
    Authenticator,
    AuthError,
    Identity,
    load_public_key,
    matches,
)
from livecomments.config import AuthSettings, ConfigError

SECRET = "a-secret-of-at-least-32-bytes-long!"
SERVER_KEY = "server-key-of-at-least-32-bytes-long"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 300, **extra}


def hs256(payload: dict[str, Any] | None = None, secret: str = SECRET, **kw: Any) -> str:
    return jwt.encode(claims() if payload is None else payload, secret, algorithm="HS256", **kw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token PyJWT would refuse to make: `sign(signing_input) -> bytes`, or unsigned."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    signature = b64(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


def authenticator(**settings: Any) -> Authenticator:
    return Authenticator(AuthSettings(**{"mode": "jwt", "secret": SECRET, **settings}))


async def refused(auth: Authenticator, code: str, authorization: str | None, token=None) -> str:
    with pytest.raises(AuthError) as e:
        await auth.identify(authorization, token)
    assert (e.value.code, e.value.status) == (code, 401)
    return e.value.message


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("livecomments_auth_total", {"result": result}) or 0.0


# -- post patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "post_id", "match"),
    [
        ("*", "anything", True),
        ("*", "", True),
        ("news-*", "news-2024-01", True),
        ("news-*", "sports-1", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("*-2024-*", "news-2024-01", True),
        ("*-2024-*", "news-2023-01", False),
        ("post1", "post1", True),
        ("post1", "post10", False),
        ("[ab]", "a", False),  # only * and ? are special
        ("[ab]", "[ab]", True),
        ("a*b*c", "aXXbYYc", True),
        ("a*b*c", "aXXbYY", False),
        ("", "", True),
        ("", "x", False),
    ],
)
def test_matches(pattern: str, post_id: str, match: bool):
    assert matches(pattern, post_id) is match


def test_a_pattern_cannot_make_matching_slow():
    started = time.perf_counter()
    assert not matches("*a*a*a*a*a*a*a*a*b", "a" * 256)
    assert time.perf_counter() - started < 0.5


def test_may_access():
    assert Identity("u").may_access("any")
    assert not Identity("u", scope=()).may_access("any")
    scoped = Identity("u", scope=("news-*", "p1"))
    assert scoped.may_access("news-7") and scoped.may_access("p1")
    assert not scoped.may_access("p2")
    assert SERVER.may_access("any") and ANONYMOUS.may_access("any")


# -- modes --------------------------------------------------------------------------------------


async def test_open_mode_needs_nothing_but_checks_what_is_sent():
    auth = Authenticator(AuthSettings(secret=SECRET, server_keys=[SERVER_KEY]))
    assert await auth.identify(None, None) == ANONYMOUS
    assert await auth.identify("", "") == ANONYMOUS
    assert (await auth.identify(f"Bearer {hs256()}", None)).sub == "alice"
    assert await auth.identify(f"Key {SERVER_KEY}", None) == SERVER
    await refused(auth, "invalid_token", "Bearer nonsense")
    await refused(auth, "token_expired", None, hs256(claims(exp=int(time.time()) - 3600)))


async def test_open_mode_without_a_key_refuses_tokens_it_cannot_check():
    auth = Authenticator(AuthSettings())
    assert await auth.identify(None, None) == ANONYMOUS
    message = await refused(auth, "invalid_token", f"Bearer {hs256()}")
    assert "verifies no tokens" in message


async def test_jwt_mode_needs_a_credential():
    auth = authenticator()
    with pytest.raises(AuthError) as e:
        await auth.identify(None, None)
    assert e.value.code == "unauthenticated"
    assert e.value.headers == {"WWW-Authenticate": "Bearer"}
    assert e.value.body() == {"error": {"code": "unauthenticated", "message": e.value.message}}
    with pytest.raises(AuthError) as e:
        await auth.identify("Bearer x.y.z", None)
    assert e.value.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}


async def test_a_token_identifies_its_sub_until_its_exp():
    auth = authenticator()
    exp = int(time.time()) + 120
    identity = await auth.identify(f"Bearer {hs256(claims(exp=exp))}", None)
    assert identity == Identity("alice", expires_at=float(exp))
    assert await auth.identify(None, hs256(claims(exp=exp))) == identity  # ?token=
    assert await auth.identify(f"bearer  {hs256(claims(exp=exp))} ", None) == identity


async def test_the_header_wins_over_the_token():
    auth = authenticator()
    identity = await auth.identify(f"Bearer {hs256(claims(sub='bob'))}", hs256())
    assert identity.sub == "bob"


# -- forgeries and expiry -----------------------------------------------------------------------


async def test_alg_none_is_refused():
    auth = authenticator()
    token = handmade({"alg": "none", "typ": "JWT"}, claims())
    assert "algorithm" in await refused(auth, "invalid_token", f"Bearer {token}")
    token = handmade({"alg": "None"}, claims())
    await refused(auth, "invalid_token", f"Bearer {token}")


async def test_only_the_configured_algorithms_are_accepted():
    auth = authenticator()  # HS256
    token = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    await refused(auth, "invalid_token", f"Bearer {token}")
    both = authenticator(secret=SECRET * 2, algorithms=["HS256", "HS512"])
    token = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    assert (await both.identify(f"Bearer {token}", None)).sub == "alice"
    assert await both.identify(f"Bearer {hs256(secret=SECRET * 2)}", None)


async def test_a_wrong_signature_is_refused():
    auth = authenticator()
    token = hs256(secret="another-secret-of-at-least-32-bytes")
    assert "Signature" in await refused(auth, "invalid_token", f"Bearer {token}")
    head, _, sig = hs256().split(".")
    forged = f"{head}.{b64(orjson.dumps(claims(sub='root')))}.{sig}"
    await refused(auth, "invalid_token", f"Bearer {forged}")


async def test_the_public_key_is_never_an_hmac_secret(tmp_path: Path, rsa_key):
    """The classic confusion: an HS256 token signed with the (public) PEM as its secret."""
    path = tmp_path / "key.pem"
    path.write_bytes(pem(rsa_key))
    auth = Authenticator(AuthSettings(mode="jwt", public_key=str(path)))
    forged = handmade(
        {"alg": "HS256", "typ": "JWT"},
        claims(),
        lambda data: hmac.new(pem(rsa_key), data, hashlib.sha256).digest(),
    )
    await refused(auth, "invalid_token", f"Bearer {forged}")
    good = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await auth.identify(f"Bearer {good}", None)).sub == "alice"


async def test_expiry_leeway_and_required_claims():
    auth = authenticator(leeway=30)
    now = int(time.time())
    assert await auth.identify(None, hs256(claims(exp=now - 10)))  # within the leeway
    assert await refused(auth, "token_expired", None, hs256(claims(exp=now - 60)))
    await refused(auth, "invalid_token", None, hs256({"sub": "alice"}))  # no exp
    await refused(auth, "invalid_token", None, hs256({"exp": now + 60}))  # no sub
    await refused(auth, "invalid_token", None, hs256(claims(sub="")))
    await refused(auth, "invalid_token", None, hs256(claims(nbf=now + 600)))  # not yet


async def test_a_sub_that_is_not_a_string_is_refused():
    auth = authenticator()
    # PyJWT will not encode it; a token from elsewhere could carry it.
    token = handmade(
        {"alg": "HS256", "typ": "JWT"},
        claims(sub=42),
        lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest(),
    )
    await refused(auth, "invalid_token", None, token)


async def test_issuer_and_audience():
    auth = authenticator(issuer="https://idp.example", audience="comments")
    good = hs256(claims(iss="https://idp.example", aud="comments"))
    assert (await auth.identify(None, good)).sub == "alice"
    await refused(auth, "invalid_token", None, hs256(claims(iss="https://evil", aud="comments")))
    await refused(auth, "invalid_token", None, hs256(claims(iss="https://idp.example", aud="x")))
    await refused(auth, "invalid_token", None, hs256(claims(aud="comments")))  # no iss
    await refused(auth, "invalid_token", None, hs256(claims(iss="https://idp.example")))
    # Without an audience configured, a token meant for some audience is not for us.
    await refused(authenticator(), "invalid_token", None, hs256(claims(aud="billing")))


async def test_an_oversized_or_malformed_token_is_refused_before_parsing():
    auth = authenticator()
    message = await refused(auth, "invalid_token", None, "a" * (MAX_TOKEN_CHARS + 1))
    assert "longer" in message
    assert await refused(auth, "invalid_token", None, "not-a-jwt") == "malformed token"
    await refused(auth, "invalid_token", "Basic dXNlcjpwYXNz")
    await refused(auth, "invalid_token", "Bearer")


# -- claims -------------------------------------------------------------------------------------


async def test_roles_and_scope_claims():
    auth = authenticator()
    token = hs256(claims(roles=["editor", "moderator"], posts=["news-*", "p1"]))
    identity = await auth.identify(None, token)
    assert identity.moderator and identity.scope == ("news-*", "p1")
    assert identity.may_access("news-1") and not identity.may_access("p2")
    spaced = await auth.identify(None, hs256(claims(roles="moderator x", posts="a b")))
    assert spaced.moderator and spaced.scope == ("a", "b")
    plain = await auth.identify(None, hs256(claims(roles=["editor"])))
    assert not plain.moderator and plain.scope is None
    nothing = await auth.identify(None, hs256(claims(posts=[])))
    assert nothing.scope == () and not nothing.may_access("p1")


async def test_claim_names_are_configurable():
    auth = authenticator(
        scope_claim="https://site.example/posts",
        roles_claim="https://site.example/roles",
        moderator_role="mod",
    )
    token = hs256(
        claims(**{"https://site.example/posts": ["p*"], "https://site.example/roles": ["mod"]})
    )
    identity = await auth.identify(None, token)
    assert identity.moderator and identity.scope == ("p*",)
    assert not (await auth.identify(None, hs256(claims(roles=["mod"])))).moderator


@pytest.mark.parametrize(
    "extra",
    [
        {"posts": 7},
        {"posts": ["ok", 7]},
        {"posts": [f"p{i}" for i in range(MAX_SCOPE_PATTERNS + 1)]},
        {"posts": ["x" * 300]},
        {"roles": {"moderator": True}},
    ],
)
async def test_malformed_claims_are_refused(extra: dict[str, Any]):
    await refused(authenticator(), "invalid_token", None, hs256(claims(**extra)))


# -- server keys --------------------------------------------------------------------------------


async def test_server_keys():
    auth = authenticator(server_keys=["other-key-of-at-least-32-bytes-long", SERVER_KEY])
    assert await auth.identify(f"Key {SERVER_KEY}", None) == SERVER
    assert await auth.identify(f"key   {SERVER_KEY}", None) == SERVER
    assert SERVER.server and SERVER.sub is None
    await refused(auth, "invalid_token", f"Key {SERVER_KEY}x")
    await refused(auth, "invalid_token", "Key ")
    # Never from a URL: as ?token= it is just a malformed JWT.
    await refused(auth, "invalid_token", None, SERVER_KEY)
    await refused(authenticator(), "invalid_token", f"Key {SERVER_KEY}")  # none configured


# -- public keys --------------------------------------------------------------------------------


async def test_rsa_and_ec_public_keys(tmp_path: Path, rsa_key, ec_key):
    rsa_path, ec_path = tmp_path / "rsa.pem", tmp_path / "ec.pem"
    rsa_path.write_bytes(pem(rsa_key))
    ec_path.write_bytes(pem(ec_key))
    by_rsa = Authenticator(AuthSettings(mode="jwt", public_key=str(rsa_path)))
    by_ec = Authenticator(AuthSettings(mode="jwt", public_key=str(ec_path)))
    assert (by_rsa.algorithms, by_ec.algorithms) == (("RS256",), ("ES256",))
    assert await by_ec.identify(None, jwt.encode(claims(), ec_key, algorithm="ES256"))
    await refused(by_rsa, "invalid_token", None, jwt.encode(claims(), ec_key, algorithm="ES256"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await refused(by_rsa, "invalid_token", None, jwt.encode(claims(), other, algorithm="RS256"))
    ps = Authenticator(AuthSettings(mode="jwt", public_key=str(rsa_path), algorithms=["PS256"]))
    assert await ps.identify(None, jwt.encode(claims(), rsa_key, algorithm="PS256"))
    await refused(ps, "invalid_token", None, jwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_a_certificate_is_read_for_its_key(tmp_path: Path, ec_key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(ec_key, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _, algorithms = load_public_key(str(path), [])
    assert algorithms == ("ES256",)


def test_a_public_key_that_does_not_fit_is_a_config_error(tmp_path: Path, ec_key):
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(ec_key))
    with pytest.raises(ConfigError, match=r"^auth\.algorithms: RS256"):
        load_public_key(str(path), ["RS256"])
    with pytest.raises(ConfigError, match=r"^auth\.algorithms: ES384"):
        load_public_key(str(path), ["ES384"])  # a P-256 key signs ES256 only
    path.write_text("not a key")
    with pytest.raises(ConfigError, match=r"^auth\.public_key"):
        Authenticator(AuthSettings(mode="jwt", public_key=str(path)))
    with pytest.raises(ConfigError, match=r"^auth\.public_key"):
        load_public_key(str(tmp_path / "missing.pem"), [])
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path.write_bytes(pem(weak))
    with pytest.raises(ConfigError, match=r"^auth\.public_key: .* 2048 bits"):
        load_public_key(str(path), [])


# -- metrics ------------------------------------------------------------------------------------


async def test_every_outcome_is_counted():
    auth = authenticator(mode="open", server_keys=[SERVER_KEY])
    results = ("anonymous", "token", "server_key", "invalid_token", "token_expired")
    before = {r: counted(r) for r in (*results, "unauthenticated")}
    await auth.identify(None, None)
    await auth.identify(None, hs256())
    await auth.identify(f"Key {SERVER_KEY}", None)
    await refused(auth, "invalid_token", None, "x")
    await refused(auth, "token_expired", None, hs256(claims(exp=1)))
    await refused(authenticator(), "unauthenticated", None)
    assert all(counted(r) == before[r] + 1 for r in before)
