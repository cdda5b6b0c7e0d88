"""The token issuer's public keys, from its JWKS URL (`auth.jwks_url`), cached by key id.

What `JwksKeys` guarantees:

* Fetched with aiohttp on the event loop (never PyJWKClient, whose urllib fetch blocks), within
  `FETCH_TIMEOUT` seconds and `MAX_BYTES` (decompressed, counted as it arrives); no redirects
  are followed, so an https URL cannot be sent elsewhere.
* Fetched at `start()`, then every `refresh_interval` (an hour) by `_refresh_worker`, which
  retries a failure with backoff and never dies of one. A failed fetch keeps the keys we have.
* A token whose `kid` is not cached fetches again, but at most once per `refetch_interval`
  (30 s) whatever the kids: a client inventing kids cannot make us fetch per request.
  Concurrent lookups share one fetch.
* Only signing keys whose algorithm is configured are kept: never a symmetric (`oct`) key,
  which would let anyone who can read the JWKS sign tokens; never a `use: enc` key. At most
  `MAX_KEYS`. A key without `alg` gets PyJWT's default for its type (RSA: RS256, EC: by curve,
  OKP: EdDSA). Each key is bound to its one algorithm (a `PyJWK`).
* A key that leaves the JWKS is dropped at the next successful fetch (rotation, revocation).

Every fetch is counted in `livecomments_jwks_fetches_total{result}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import jwt
import orjson

from livecomments import metrics
from livecomments.backoff import Backoff

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024
MAX_KEYS = 100
FETCH_TIMEOUT = 5.0
REFRESH_SECONDS = 3600.0
REFETCH_SECONDS = 30.0
# A failed periodic fetch is retried after 1 s, doubling up to the refetch interval.
RETRY_BASE = 1.0


def parse_jwks(body: bytes, algorithms: Sequence[str]) -> list[jwt.PyJWK]:
    """The usable signing keys of a JWKS document; ValueError if it is not one."""
    document = orjson.loads(body)  # orjson.JSONDecodeError is a ValueError
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    keys: list[jwt.PyJWK] = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") == "oct" or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, NotImplementedError) as e:
            # One key we cannot use (an unknown kty or curve) must not cost us the others.
            log.debug("jwks: skipped key %r: %s", jwk.get("kid"), e)
            continue
        if key.Algorithm.check_key_length(key.key) is not None:
            # Too weak to trust (RSA under 2048 bits, an HMAC key), and PyJWT would warn on
            # every token it verified.
            log.warning("jwks: skipped key %r: too short", jwk.get("kid"))
            continue
        if key.algorithm_name in algorithms:
            keys.append(key)
        if len(keys) == MAX_KEYS:
            break
    return keys


class JwksKeys:
    def __init__(
        self,
        url: str,
        algorithms: Sequence[str],
        *,
        refresh_interval: float = REFRESH_SECONDS,
        refetch_interval: float = REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._algorithms = tuple(algorithms)
        self._refresh_interval = refresh_interval
        self._refetch_interval = refetch_interval
        self._clock = clock
        self._by_kid: dict[str, jwt.PyJWK] = {}
        self._keys: list[jwt.PyJWK] = []
        self._lock = asyncio.Lock()  # one fetch at a time; lookups that wait reuse its result
        self._last_attempt: float | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # attempts, successful or not

    def __len__(self) -> int:
        return len(self._keys)

    async def start(self) -> None:
        """Open the HTTP session and start `_refresh_worker` (its first fetch is at once)."""
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._refresh_worker(), name="jwks-refresh-worker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key `kid` names (a token without a kid: the only key, if there is one); None if
        there is no such key, even after the fetch an unknown kid may cause."""
        found = self._find(kid)
        if found is not None:
            return found
        async with self._lock:
            found = self._find(kid)  # the fetch we waited for may have brought it
            if found is None and self._may_refetch():
                await self._fetch()
                found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return self._by_kid.get(kid)

    def _may_refetch(self) -> bool:
        last = self._last_attempt
        return last is None or self._clock() - last >= self._refetch_interval

    async def _refresh_worker(self) -> None:
        backoff = Backoff(base=RETRY_BASE, cap=max(RETRY_BASE, self._refetch_interval))
        while True:
            try:
                async with self._lock:
                    ok = await self._fetch()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug, not the network (_fetch catches that): log it and keep refreshing.
                log.exception("jwks %s: refresh failed", self.url)
                ok = False
            if ok:
                backoff.reset()
            await asyncio.sleep(self._refresh_interval if ok else backoff.next())

    async def _fetch(self) -> bool:
        """Replace the keys with the JWKS's (the lock is held); False, keys kept, if it fails."""
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            keys = parse_jwks(await self._download(), self._algorithms)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            metrics.JWKS_FETCHES.labels("error").inc()
            # At most one line per refetch interval: fetches are rate-limited (see `key`).
            log.warning(
                "jwks %s: fetch failed (%s: %s); keeping the %d keys we have",
                self.url,
                type(e).__name__,
                e,
                len(self._keys),
            )
            return False
        metrics.JWKS_FETCHES.labels("ok").inc()
        if not keys:
            log.warning("jwks %s: no usable signing key for %s", self.url, self._algorithms)
        self._keys = keys
        self._by_kid = {k.key_id: k for k in keys if k.key_id is not None}
        return True

    async def _download(self) -> bytes:
        if self._session is None:
            raise RuntimeError("JwksKeys.start() was not called")
        async with self._session.get(self.url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            if (response.content_length or 0) > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES} bytes")
            body = bytearray()
            async for chunk in response.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > MAX_BYTES:
                    raise ValueError(f"larger than {MAX_BYTES} bytes")
            return bytes(body)
