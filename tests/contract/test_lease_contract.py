"""Instance-id leases held in the store, on SQLite and PostgreSQL: no two live instances sharing
a store share an id, with Redis or without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from livecomments.storage import lease as lease_module
from livecomments.storage import open_store
from livecomments.storage.base import LeasingStore
from livecomments.storage.lease import InstanceIdUnavailable, InstanceLease
from tests.support.pg_cluster import pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]  # fixtures, imported for pytest


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeasingStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/c.db"
    else:
        url = request.getfixturevalue("pg_url")
    s = open_store(url)
    await s.open()
    yield s
    await s.close()


async def test_auto_leases_pick_distinct_ids(store: LeasingStore):
    leases = [InstanceLease(store, -1, remembered=None) for _ in range(5)]
    ids = [await lease.acquire(store_open=True) for lease in leases]
    assert len(set(ids)) == 5 and all(0 <= i <= 1023 for i in ids)
    for lease in leases:
        await lease.release()
    _, rows = await store.read_leases()
    assert rows == {}  # released leases are gone


async def test_an_explicit_id_held_by_a_live_instance_is_refused(store: LeasingStore):
    first = InstanceLease(store, 7, remembered=None)
    second = InstanceLease(store, 7, remembered=None)
    assert await first.acquire(store_open=True) == 7
    with pytest.raises(InstanceIdUnavailable, match=r"server\.instance_id 7 is in use"):
        await second.acquire(store_open=True)
    now, rows = await store.read_leases()
    assert 0 < rows[7] - now <= 60_000
    await second.release()  # not its lease: must not drop the first's
    assert 7 in (await store.read_leases())[1]
    await first.release()
    third = InstanceLease(store, 7, remembered=None)
    assert await third.acquire(store_open=True) == 7  # free again once released
    await third.release()


async def test_the_id_remembered_from_last_time_comes_first(store: LeasingStore):
    lease = InstanceLease(store, -1, remembered=612)
    assert await lease.acquire(store_open=True) == 612
    await lease.release()


async def test_a_lapsed_lease_taken_by_another_instance_is_a_conflict(
    store: LeasingStore, monkeypatch: pytest.MonkeyPatch
):
    mine = InstanceLease(store, 3, remembered=None)
    assert await mine.acquire(store_open=True) == 3
    monkeypatch.setattr(mine, "_ttl_ms", -1)
    await mine.renew()  # an instance cut off from the store: its lease runs out
    newcomer = InstanceLease(store, 3, remembered=None)
    assert await newcomer.acquire(store_open=True) == 3
    monkeypatch.setattr(mine, "_ttl_ms", 60_000)
    await mine.renew()
    assert mine.conflict, "kept minting ids another live instance mints too"
    await newcomer.release()
    await mine.renew()
    assert not mine.conflict  # free again: re-claimed
    await mine.release()


async def test_with_the_store_down_only_a_known_id_starts(store: LeasingStore):
    assert await InstanceLease(store, -1, remembered=None).acquire(store_open=False) is None
    remembered = InstanceLease(store, -1, remembered=41)
    assert await remembered.acquire(store_open=False) == 41
    assert not remembered.confirmed
    await remembered.renew()  # the store answers again: the id is claimed
    assert remembered.confirmed and not remembered.conflict
    assert 41 in (await store.read_leases())[1]
    await remembered.release()


def test_lease_renewal_is_well_inside_its_ttl():
    # renew_worker sleeps a third of the TTL: two renewals can fail before a lease lapses.
    assert lease_module.LEASE_TTL >= 30
