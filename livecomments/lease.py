"""Instance-id leases: two live instances never issue ids with the same `server.instance_id`.

Comment ids embed the instance id (ids.py), and the store drops an insert whose id it already has,
so two instances sharing an instance id would make comments silently disappear. With Redis on,
each instance holds a lease on its id in one server of `redis.urls` (the smallest URL, so the
same one whatever the list's order: app.lease_server)
(`livecomments:instance:<id>`, a random token, a TTL of `LEASE_TTL` seconds renewed every third of
it):

* `server.instance_id = -1` (the default) claims the first free id from a random starting point,
  so identical config files on every host just work.
* An explicit id that another live instance holds stops start-up with an error naming it.
* An explicit id starts even while that Redis server is down (the lease is a guard, and renewal
  keeps trying); `-1` cannot pick an id without it, so start-up stops with an error.
* If the lease cannot be renewed (Redis down), the instance keeps its id and keeps trying. If it
  lapsed meanwhile (a long outage, Redis restarted empty) and a newcomer took the id, the
  instance refuses new comments (503 `instance_id_conflict`, /readyz not ready) until the id is
  free again, rather than mint ids that may collide. The TTL is long and a newcomer starts from
  a random point, so this is rare.

Without Redis there is one instance, and `-1` means 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from livecomments.ids import MAX_INSTANCE

log = logging.getLogger(__name__)

LEASE_TTL = 60.0  # seconds
KEY = "livecomments:instance:{}"
# Renew only if the lease is still ours: a lapsed lease taken by someone else is not stolen back.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class InstanceIdUnavailable(Exception):
    """The requested instance id is held by another live instance, or none could be claimed."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class InstanceLease:
    def __init__(self, url: str, requested: int, timeout: float) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._requested = requested
        self._token = secrets.token_hex(8)
        self.instance_id: int | None = None
        # Another live instance holds our id: new ids could collide with its ones.
        self.conflict = False

    async def acquire(self) -> int:
        """Claim the requested id (or, for -1, any free one); raise if that cannot be done."""
        ttl_ms = int(LEASE_TTL * 1000)
        try:
            if self._requested >= 0:
                candidates = [self._requested]
            else:
                start = random.randrange(MAX_INSTANCE + 1)
                candidates = [(start + i) % (MAX_INSTANCE + 1) for i in range(MAX_INSTANCE + 1)]
            for candidate in candidates:
                if await self._client.set(KEY.format(candidate), self._token, nx=True, px=ttl_ms):
                    self.instance_id = candidate
                    return candidate
        except (RedisError, OSError) as e:
            raise InstanceIdUnavailable(
                f"cannot reach Redis to claim an instance id: {e}", unreachable=True
            ) from e
        if self._requested >= 0:
            raise InstanceIdUnavailable(
                f"server.instance_id {self._requested} is in use by another running instance; "
                "give each instance its own id, or -1 to pick a free one"
            )
        raise InstanceIdUnavailable("all 1024 instance ids are in use")

    async def renew_worker(self) -> None:
        """Renew every third of the TTL until cancelled; failures are logged and retried."""
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            await self.renew()

    async def renew(self) -> None:
        """One renewal. If the lease lapsed and another instance now holds the id, `conflict`
        is set (the app refuses new comments rather than mint ids that may collide) until the
        id is ours again."""
        assert self.instance_id is not None
        key = KEY.format(self.instance_id)
        ttl_ms = int(LEASE_TTL * 1000)
        try:
            if await self._client.eval(_RENEW, 1, key, self._token, ttl_ms):
                self._set_conflict(False)
                return
            # Lapsed (Redis restarted empty, or a long outage): take it again if it is free.
            again = await self._client.set(key, self._token, nx=True, px=ttl_ms)
            self._set_conflict(not again)
        except (RedisError, OSError) as e:
            log.warning("lease: cannot renew instance id %d: %s", self.instance_id, e)

    def _set_conflict(self, conflict: bool) -> None:
        if conflict != self.conflict:
            if conflict:
                log.error(
                    "lease: instance id %d lapsed and is held by another instance; refusing "
                    "new comments until it is free again",
                    self.instance_id,
                )
            else:
                log.info("lease: instance id %d is ours again", self.instance_id)
        self.conflict = conflict

    async def release(self) -> None:
        try:
            if self.instance_id is not None:
                await self._client.eval(_RELEASE, 1, KEY.format(self.instance_id), self._token)
        except (RedisError, OSError) as e:
            log.warning("lease: could not release instance id %s: %s", self.instance_id, e)
        finally:
            await self._client.aclose()
