"""Tokens verified with the keys of a JWKS served by an in-process aiohttp server: keys by kid,
rotation, the bounded refetch on unknown kids, the periodic refresh, and what a JWKS may not do
(symmetric keys, keys for another algorithm, oversized or redirected documents)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from livecomments.api.auth import Authenticator, AuthError
from livecomments.api.jwks import MAX_BYTES, REFETCH_SECONDS, JwksKeys, parse_jwks
from livecomments.config import AuthSettings
from tests.support.wait import wait_for
from tests.unit.test_ratelimit import FakeClock

DEADLINE = 5.0


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    key = algorithm.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        key["kid"] = kid
    return {**key, **extra}


def token(private: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    payload = {"sub": "alice", "exp": int(time.time()) + 300, **claims}
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, private, algorithm=alg, headers=headers)


class Issuer:
    """The JWKS endpoint: serves `document` (or `body`, or `status`), counts requests."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.body: bytes | None = None
        self.chunked = False
        self.status = 200
        self.requests = 0
        self.url = ""
        self.gate: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.status in (301, 302):
            raise web.HTTPFound("/elsewhere")
        if self.status != 200:
            return web.Response(status=self.status)
        if self.body is not None and self.chunked:  # no Content-Length: counted as it comes
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(self.body), 4096):
                await response.write(self.body[i : i + 4096])
            await response.write_eof()
            return response
        return web.Response(
            body=self.body or orjson.dumps(self.document), content_type="application/json"
        )

    async def elsewhere(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.document), content_type="application/json")


@pytest.fixture
async def issuer(aiohttp_server: Any) -> Issuer:
    issuer = Issuer()
    app = web.Application()
    app.router.add_get("/jwks.json", issuer.handle)
    app.router.add_get("/elsewhere", issuer.elsewhere)
    server = await aiohttp_server(app)
    issuer.url = str(server.make_url("/jwks.json"))
    return issuer


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def auth(issuer: Issuer, clock: FakeClock) -> AsyncIterator[Authenticator]:
    authenticator = Authenticator(AuthSettings(mode="jwt", jwks_url=issuer.url), jwks_clock=clock)
    yield authenticator
    await authenticator.close()


async def started(auth: Authenticator, issuer: Issuer) -> Authenticator:
    """Start, and let the refresh worker's first fetch finish."""
    await auth.start()
    await wait_for(lambda: issuer.requests >= 1, DEADLINE, "the first JWKS fetch")
    await wait_for(lambda: auth._jwks is not None and auth._jwks.fetches >= 1, DEADLINE, "it")
    return auth


async def refused(auth: Authenticator, text: str) -> str:
    with pytest.raises(AuthError) as e:
        await auth.identify(f"Bearer {text}", None)
    assert e.value.code == "invalid_token"
    return e.value.message


async def test_tokens_are_verified_by_the_key_their_kid_names(auth, issuer, rsa_keys, ec_key):
    issuer.document = {"keys": [jwk(rsa_keys[0], "r1"), jwk(ec_key, "e1")]}
    await started(auth, issuer)
    assert (await auth.identify(None, token(rsa_keys[0], "r1"))).sub == "alice"
    assert (await auth.identify(None, token(ec_key, "e1", "ES256"))).sub == "alice"
    # Signed by another key than the kid names:
    await refused(auth, token(rsa_keys[1], "r1"))
    # The kid names an ES256 key, the header says RS256: the key decides.
    assert "does not match" in await refused(auth, token(rsa_keys[0], "e1"))
    assert issuer.requests == 1


async def test_an_unknown_kid_fetches_again_at_most_once_per_interval(
    auth, issuer, clock, rsa_keys
):
    issuer.document = {"keys": [jwk(rsa_keys[0], "old")]}
    await started(auth, issuer)
    issuer.document = {"keys": [jwk(rsa_keys[0], "old"), jwk(rsa_keys[1], "new")]}
    # Just fetched (by the worker): the new key is not there yet and is not fetched for.
    assert "unknown signing key" in await refused(auth, token(rsa_keys[1], "new"))
    for i in range(50):  # a client inventing kids
        await refused(auth, token(rsa_keys[1], f"random{i}"))
    assert issuer.requests == 1
    clock.advance(REFETCH_SECONDS)
    assert (await auth.identify(None, token(rsa_keys[1], "new"))).sub == "alice"
    assert issuer.requests == 2
    await refused(auth, token(rsa_keys[1], "random-again"))
    assert issuer.requests == 2


async def test_concurrent_unknown_kids_share_one_fetch(auth, issuer, clock, rsa_keys):
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0")]}
    await started(auth, issuer)
    clock.advance(REFETCH_SECONDS)
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0"), jwk(rsa_keys[1], "k1")]}
    issuer.gate = asyncio.Event()  # hold the fetch until every request waits on it
    requests = [
        asyncio.create_task(auth.identify(None, token(rsa_keys[1], "k1"))) for _ in range(20)
    ]
    await wait_for(lambda: issuer.requests == 2, DEADLINE, "the refetch to arrive")
    issuer.gate.set()
    identities = await asyncio.wait_for(asyncio.gather(*requests), DEADLINE)
    assert {i.sub for i in identities} == {"alice"}
    assert issuer.requests == 2


async def test_a_key_that_leaves_the_jwks_is_dropped(auth, issuer, clock, rsa_keys):
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0"), jwk(rsa_keys[1], "k1")]}
    await started(auth, issuer)
    assert await auth.identify(None, token(rsa_keys[0], "k0"))
    issuer.document = {"keys": [jwk(rsa_keys[1], "k1")]}  # k0 revoked
    clock.advance(REFETCH_SECONDS)
    await refused(auth, token(rsa_keys[1], "unknown"))  # triggers the refetch
    await refused(auth, token(rsa_keys[0], "k0"))
    assert await auth.identify(None, token(rsa_keys[1], "k1"))


async def test_a_token_without_kid_uses_the_only_key(auth, issuer, clock, rsa_keys):
    issuer.document = {"keys": [jwk(rsa_keys[0], None)]}
    await started(auth, issuer)
    assert await auth.identify(None, token(rsa_keys[0], None))
    issuer.document = {"keys": [jwk(rsa_keys[0], "a"), jwk(rsa_keys[1], "b")]}
    clock.advance(REFETCH_SECONDS)
    await refused(auth, token(rsa_keys[1], "c"))  # refetch
    await refused(auth, token(rsa_keys[0], None))  # two keys: which one?


async def test_tokens_for_algorithms_not_configured_cost_no_fetch(auth, issuer, clock, rsa_keys):
    secret = "k" * 32
    issuer.document = {"keys": [{"kty": "oct", "k": jwt.utils.base64url_encode(secret.encode())}]}
    await started(auth, issuer)
    clock.advance(REFETCH_SECONDS)
    hs = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert "algorithm" in await refused(auth, hs)
    none = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, None, algorithm="none")
    await refused(auth, none)
    assert issuer.requests == 1
    assert auth._jwks is not None and len(auth._jwks) == 0  # the oct key was not kept


def test_parse_keeps_only_usable_signing_keys(rsa_keys, ec_key):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = {
        "keys": [
            jwk(rsa_keys[0], "sig"),
            jwk(rsa_keys[1], "enc", use="enc"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "broken"},
            {"kty": "unknown", "kid": "x"},
            "not a key",
            jwk(ec_key, "ec"),
            jwk(weak, "weak"),
            jwk(rsa_keys[1], "ps", alg="PS256"),
            jwk(rsa_keys[1], "none", alg="none"),  # PyJWK raises NotImplementedError on it
        ]
    }
    keys = parse_jwks(orjson.dumps(document), ["RS256", "ES256"])
    assert [(k.key_id, k.algorithm_name) for k in keys] == [("sig", "RS256"), ("ec", "ES256")]
    for bad in (b"[]", b"{}", b'{"keys": 1}', b"not json"):
        with pytest.raises(ValueError):
            parse_jwks(bad, ["RS256"])


@pytest.mark.parametrize(
    "failure", ["status", "too_large", "too_large_chunked", "not_json", "redirect"]
)
async def test_a_failed_fetch_keeps_the_keys_we_have(auth, issuer, clock, rsa_keys, failure):
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0")]}
    await started(auth, issuer)
    if failure == "status":
        issuer.status = 500
    elif failure.startswith("too_large"):
        issuer.body = b'{"keys": [], "pad": "' + b"x" * MAX_BYTES + b'"}'
        issuer.chunked = failure.endswith("chunked")
    elif failure == "not_json":
        issuer.body = b"<html>"
    else:
        issuer.status = 302
    issuer.document = {"keys": []}
    clock.advance(REFETCH_SECONDS)
    await refused(auth, token(rsa_keys[1], "k1"))
    assert issuer.requests == 2
    assert await auth.identify(None, token(rsa_keys[0], "k0"))


async def test_the_keys_are_refreshed_periodically(issuer, rsa_keys):
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0")]}
    keys = JwksKeys(issuer.url, ["RS256"], refresh_interval=0.05)
    await keys.start()
    try:
        await wait_for(lambda: keys.fetches >= 3, DEADLINE, "three periodic fetches")
        issuer.document = {"keys": [jwk(rsa_keys[1], "k1")]}
        await wait_for(lambda: keys._find("k1") is not None, DEADLINE, "the rotated key")
    finally:
        await keys.close()


async def test_the_refresh_worker_survives_a_bug(issuer, rsa_keys, monkeypatch):
    issuer.document = {"keys": [jwk(rsa_keys[0], "k0")]}
    keys = JwksKeys(issuer.url, ["RS256"], refresh_interval=0.05, refetch_interval=0.05)
    calls = 0
    real_fetch = keys._fetch

    async def buggy_once() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return await real_fetch()

    monkeypatch.setattr(keys, "_fetch", buggy_once)
    await keys.start()
    try:
        await wait_for(lambda: keys._find("k0") is not None, DEADLINE, "a fetch after the bug")
        assert calls >= 2
    finally:
        await keys.close()
