"""Instance-id leases: two live instances sharing a store never issue ids with the same
`server.instance_id`.

Comment ids embed the instance id (ids.py), and the store keeps one comment per id, so two
instances sharing an instance id would mint the same ids and the store could keep only one of
each pair. The lease lives where the collision would happen: in the store itself (a row of
`instance_leases` per id: a random holder token and an expiry, `LEASE_TTL` seconds ahead,
renewed every third of it), so it holds whatever else is configured, Redis or not, one host
sharing a SQLite file or many sharing PostgreSQL. The expiry is on the store's clock
(PostgreSQL's; for SQLite, the one host's).

* `server.instance_id = -1` (the default) claims a free id: the one this queue directory used
  last if it is free, else a never-used one from a random starting point, else the one that
  lapsed longest ago. Identical config files on every host just work.
* An explicit id that another live instance holds stops start-up with an error naming it.
* If the store is down at start-up, an explicit id, or for `-1` the id this queue directory used
  last (the queue remembers it), starts unchecked with a warning, and the renewal claims it as
  soon as the store answers. `-1` with no id remembered starts without an id: it serves readers
  and refuses new comments (503 `instance_id_pending`, /readyz not ready) until the store
  answers and a free id is claimed.
* If the lease cannot be renewed (store down), the instance keeps its id and keeps trying. If it
  lapsed meanwhile and another instance took the id, the instance refuses new comments
  (503 `instance_id_conflict`, /readyz not ready) until the id is free again, rather than mint
  ids that may collide. Comments minted in such a window that do collide are caught when stored
  (DurableLog counts them, logs each whole, and /readyz says so).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from livecomments.model.ids import MAX_INSTANCE, SnowflakeGenerator
from livecomments.storage.base import LeaseStore
from livecomments.storage.queue import WriteAheadQueue

log = logging.getLogger(__name__)

LEASE_TTL = 60.0  # seconds
ALL_IDS = range(MAX_INSTANCE + 1)


class InstanceIdUnavailable(Exception):
    """The requested instance id is held by another live instance, or none could be claimed."""


class InstanceLease:
    def __init__(
        self,
        store: LeaseStore,
        requested: int,
        remembered: int | None,
        on_claimed: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._on_claimed = on_claimed
        self._requested = requested
        self._remembered = remembered
        self._holder = secrets.token_hex(8)
        self._ttl_ms = int(LEASE_TTL * 1000)
        self.instance_id: int | None = None
        # Claimed in the store, or started unchecked (store down) and not yet confirmed.
        self.confirmed = False
        # Another live instance holds our id: new ids could collide with its ones.
        self.conflict = False

    async def acquire(self, store_open: bool) -> int | None:
        """Claim the requested id (or, for -1, a free one); raise if that cannot be done. None:
        the store is down and no id is known; renew_worker claims one once it answers."""
        if not store_open:
            return self._start_unchecked()
        return await self._claim()

    async def _claim(self) -> int:
        if self._requested >= 0:
            if not await self._store.take_lease(self._requested, self._holder, self._ttl_ms):
                raise InstanceIdUnavailable(
                    f"server.instance_id {self._requested} is in use by another running "
                    "instance; give each instance its own id, or -1 to pick a free one"
                )
            return self._claimed(self._requested)
        now, leases = await self._store.read_leases()
        for candidate in self._candidates(now, leases):
            if await self._store.take_lease(candidate, self._holder, self._ttl_ms):
                return self._claimed(candidate)
        raise InstanceIdUnavailable(f"all {len(ALL_IDS)} instance ids are in use")

    def _candidates(self, now: int, leases: dict[int, int]) -> list[int]:
        """Free ids in the order we prefer them: ours from last time, never used (from a random
        point, so instances starting together rarely race for one), lapsed longest ago."""
        start = random.randrange(len(ALL_IDS))
        never_used = [i for i in (*ALL_IDS[start:], *ALL_IDS[:start]) if i not in leases]
        lapsed = sorted((i for i, expiry in leases.items() if expiry < now), key=leases.__getitem__)
        ours = [self._remembered] if self._remembered is not None else []
        return list(dict.fromkeys(ours + never_used + lapsed))

    def _start_unchecked(self) -> int | None:
        chosen = self._requested if self._requested >= 0 else self._remembered
        if chosen is None:
            log.warning(
                "lease: the store is unreachable, so no free instance id can be claimed yet; "
                "refusing new comments until it answers (or set server.instance_id)"
            )
            return None
        log.warning(
            "lease: the store is unreachable; starting as instance %d unchecked, claiming it "
            "as soon as the store answers",
            chosen,
        )
        self.instance_id = chosen
        return chosen

    def _claimed(self, instance_id: int) -> int:
        self.instance_id = instance_id
        self.confirmed = True
        return instance_id

    async def renew_worker(self, store_ready: Callable[[], Awaitable[object]]) -> None:
        """Renew every third of the TTL until cancelled (after the store first opened);
        failures are logged and retried."""
        await store_ready()
        while True:
            if self.instance_id is None:
                await self._claim_late()
            else:
                await self.renew()
            await asyncio.sleep(LEASE_TTL / 3 if self.instance_id is not None else 1.0)

    async def _claim_late(self) -> None:
        """Started without an id (store down): claim one now that the store answers."""
        try:
            instance_id = await self._claim()
        except Exception as e:  # all taken, or the store went away again: keep trying
            log.warning("lease: cannot claim an instance id yet: %s", e)
            return
        log.info("lease: claimed instance id %d; taking comments", instance_id)
        if self._on_claimed is not None:
            await self._on_claimed(instance_id)

    async def renew(self) -> None:
        """One renewal. If another instance now holds the id, `conflict` is set (the app
        refuses new comments rather than mint ids that may collide) until it is ours again."""
        assert self.instance_id is not None
        try:
            ours = await self._store.take_lease(self.instance_id, self._holder, self._ttl_ms)
        except Exception as e:  # the store is down: keep the id, keep trying
            log.warning("lease: cannot renew instance id %d: %s", self.instance_id, e)
            return
        if ours and not self.confirmed:
            log.info("lease: instance id %d claimed in the store", self.instance_id)
        self.confirmed = self.confirmed or ours
        self._set_conflict(not ours)

    def _set_conflict(self, conflict: bool) -> None:
        if conflict != self.conflict:
            if conflict:
                log.error(
                    "lease: instance id %d is held by another instance; refusing new comments "
                    "until it is free again",
                    self.instance_id,
                )
            else:
                log.info("lease: instance id %d is ours again", self.instance_id)
        self.conflict = conflict

    async def release(self) -> None:
        if self.instance_id is None or not self.confirmed:
            return
        try:
            await self._store.release_lease(self.instance_id, self._holder)
        except Exception as e:
            log.warning("lease: could not release instance id %d: %s", self.instance_id, e)


@asynccontextmanager
async def run_instance_ids(
    store: LeaseStore,
    queue: WriteAheadQueue,
    store_open: bool,
    store_ready: Callable[[], Awaitable[object]],
    requested: int,
) -> AsyncIterator[tuple[SnowflakeGenerator, InstanceLease]]:
    """This instance's id generator, its instance id leased in `store` and renewed while the
    context lasts, released at its end. The id used is remembered in the queue for next time."""
    ids = SnowflakeGenerator(None)
    ids.seed(queue.last_id)

    async def use(instance_id: int) -> None:
        ids.assign(instance_id)
        await queue.remember_instance_id(instance_id)

    lease = InstanceLease(store, requested, queue.remembered_instance_id, on_claimed=use)
    instance_id = await lease.acquire(store_open)
    try:
        if instance_id is not None:
            await use(instance_id)
        renewer = asyncio.create_task(lease.renew_worker(store_ready), name="lease-renew-worker")
        try:
            yield ids, lease
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
    finally:
        await lease.release()
