"""Fixtures of the fleet suite: two named PBXs started once per module (cdr_pgsql into
the session's database, migrated first), gateway processes per test, and a tenant
whose users are the phones of both PBXs.

Gateway ``gw-a`` listens for AGI where PBX 1 asks first (``GW_AGI``) and PBX 2 asks
second (``GW_AGI_BACKUP``); ``gw-b`` the other way round. Both processes are
configured with both PBXs; the lease decides which one serves each."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_asyncio

from tests.support.fleet import (
    GATEWAYS,
    LEASE,
    PHONES,
    SLICE,
    FleetGateway,
    FleetPbx,
    fleet_ports,
)
from tests.support.pbx import cdr_pgsql
from tests.support.tenant import TENANT, standard_tenant


@pytest.fixture(scope="module")
def agi_ports() -> dict[str, int]:
    return fleet_ports(GATEWAYS)


@pytest.fixture(scope="module")
def fleet_pbxes(pbx_root, agi_ports, database_url, db_pool):
    # db_pool has run the migrations: cdr_pgsql must find its table when it loads
    a, b = (f"127.0.0.1:{agi_ports[name]}" for name in GATEWAYS)
    common = dict(root=pbx_root, trunks=("carrier",), partner_trunk="carrier",
                  emergency_trunk="carrier", **cdr_pgsql(database_url))
    pbxes = {"pbx1": FleetPbx("pbx1", gw_agi=a, gw_agi_backup=b, phones=PHONES["pbx1"],
                              **common),
             "pbx2": FleetPbx("pbx2", gw_agi=b, gw_agi_backup=a, phones=PHONES["pbx2"],
                              **common)}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: p.start(), pbxes.values()))
        yield pbxes
    finally:
        for pbx in pbxes.values():
            pbx.stop()


@pytest_asyncio.fixture
async def pbxes(fleet_pbxes, repo):
    """Both PBXs, idle; the lease table empty (``repo`` emptied the others)."""
    if await repo.pool.fetchval("SELECT to_regclass('pbx_leases') IS NOT NULL"):
        await repo.pool.execute("DELETE FROM pbx_leases")
    yield fleet_pbxes
    await asyncio.gather(*(p.clear() for p in fleet_pbxes.values() if p.running))


@pytest_asyncio.fixture
async def gateways(pbxes, database_url, agi_ports):
    """``make(name, serves=(...), **config)``: a gateway process (not started) serving
    the PBXs named in ``serves`` (default: both) as instance ``name`` on its AGI port;
    every one is killed at the end."""
    made: list[FleetGateway] = []

    def make(name: str, serves: tuple[str, ...] = ("pbx1", "pbx2"),
             **overrides) -> FleetGateway:
        config = dict(database_url=database_url, slice_seconds=SLICE,
                      reconcile_interval_seconds=3600, db_pool_size=4)
        config.update(overrides)
        gw = FleetGateway(name, agi_port=agi_ports[name], pbxes=[pbxes[n] for n in serves],
                          lease_seconds=LEASE, **config)
        made.append(gw)
        return gw

    yield make
    await asyncio.gather(*(gw.close() for gw in made))


@pytest_asyncio.fixture
async def tenant(admin):
    """Every phone of both PBXs is a user with a Calling Plan; per-second increments,
    so a 10 s slice is 10 s of funding."""
    phones = [p for names in PHONES.values() for p in names]
    await standard_tenant(admin, calling_plan_licences=len(phones) + 2)
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.02", "first_increment": 1,
                            "increment": 1}])
    for name in phones:
        await admin.create_user(name, TENANT, name, "CA")
        await admin.assign_licence(name, "business_voice_calling_plan")
    return TENANT
