"""The AMI link cut during a live call (issue 8 item 7): the real PBX, a gateway whose AMI
link goes through a ``CuttableProxy``, funding in 10 s slices (the renewal comes 3 s
before each slice ends).

- A short cut around the renewal, back before the PBX's deadline: the renewal reserved
  the next slice but could not move the deadline; the move is sent again as soon as the
  link is back, so the call is not cut and lasts its intended time.
- A long cut past the deadline: the PBX cuts the call at the deadline it has (the funded
  end it was last told), and the call is billed what it talked, at most its funding.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from gateway.app import Gateway
from gateway.calls.live import LiveCall
from gateway.config import Config
from tests.faults.invariants import assert_invariants
from tests.faults.proxy import CuttableProxy
from tests.support.pbx import CallResult, Pbx, cdr_pgsql, free_port
from tests.support.tenant import standard_tenant
from tests.support.waiting import eventually

pytestmark = [pytest.mark.faults, pytest.mark.pbx, pytest.mark.db]

DOMESTIC = "2125550100"



@pytest.fixture(scope="module")
def agi_port():
    return free_port()


@pytest.fixture(scope="module")
def outage_pbx(pbx_root, agi_port, database_url, db_pool):
    pbx = Pbx(root=pbx_root, gw_agi=f"127.0.0.1:{agi_port}",
              **cdr_pgsql(database_url))
    pbx.start()
    yield pbx
    pbx.stop()


@pytest_asyncio.fixture
async def pbx(outage_pbx: Pbx):
    yield outage_pbx
    await outage_pbx.clear()


@pytest_asyncio.fixture
async def gateway(pbx, admin, repo, database_url, agi_port):
    """A gateway whose AMI link runs through a proxy the test cuts; per-second overage so
    that a slice is really 10 s."""
    await standard_tenant(admin)
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.02", "first_increment": 1,
                            "increment": 1}])
    proxy = await CuttableProxy(pbx.ami_host, pbx.ami_port).start()
    gw = Gateway(Config(database_url=database_url, agi_port=agi_port, http_port=0,
                        ami_host="127.0.0.1", ami_port=proxy.port,
                        ami_username=pbx.ami_user, ami_secret=pbx.ami_secret,
                        reconcile_interval_seconds=3600, slice_seconds=SLICE,
                        log_format="console", log_level="warning"), configure_logs=False)
    await gw.start()
    gw.proxy = proxy  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        await gw.stop()
        await proxy.close()


SLICE = 10


def explain(*results: CallResult) -> str:
    return "\n".join(r.summary() for r in results)


async def answered(gw: Gateway, within: float = 10.0) -> LiveCall:
    """The (only) live call, once the gateway has seen it answered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        for call in gw.calls.live.values():
            if call.answered_mono is not None:
                return call
        await asyncio.sleep(0.02)
    raise AssertionError("the call was not answered")


async def at(call: LiveCall, talk_seconds: float) -> None:
    """Sleep until the call has talked ``talk_seconds`` (the gateway's clock is ours)."""
    assert call.answered_mono is not None
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, call.answered_mono + talk_seconds - loop.time()))


async def settled_call(repo, within: float = 15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        row = await repo.pool.fetchrow("SELECT * FROM calls")
        if row["state"] in ("settled", "released") or loop.time() > deadline:
            return row
        await asyncio.sleep(0.1)


async def test_short_ami_cut_around_the_renewal_does_not_cut_the_funded_call(
        pbx, gateway, repo):
    gw, proxy = gateway, gateway.proxy
    trunk = await pbx.uas("carrier").started()
    phone_task = asyncio.create_task(pbx.call("alice", DOMESTIC, hold=25, max_wait=60))
    call = await answered(gw)
    await at(call, 2.0)
    # what the re-sync relies on: the PBX reads the callee's deadline back as seconds left
    left = float(await gw.ami.getvar(call.dest_channel, "TIMEOUT(absolute)"))
    assert abs(left - (SLICE - 2.0)) < 0.5, left
    await at(call, 5.0)
    proxy.cut()  # down across the renewal at 7 s
    await at(call, 8.5)
    assert call.funded_seconds == 2 * SLICE  # the renewal reserved in the database...
    assert gw.metrics.deadline_moves.labels("failed")._value.get() >= 1  # ...not on the PBX
    proxy.restore()  # back 1.5 s before the PBX's deadline
    phone = await phone_task
    trunk_seen = await trunk.result()
    assert phone.bye_from == "phone" and phone.talk >= 24.5, explain(phone, trunk_seen)
    row = await settled_call(repo)
    assert row["state"] == "settled" and 25 <= row["billed_seconds"] <= 27, dict(row)
    assert gw.ami.reconnects == 1
    await assert_invariants(repo.pool)


async def test_long_ami_cut_past_the_deadline_the_pbx_cuts_at_the_funded_end(
        pbx, gateway, repo):
    gw, proxy = gateway, gateway.proxy
    trunk = await pbx.uas("carrier").started()
    phone_task = asyncio.create_task(pbx.call("alice", DOMESTIC, hold=25, max_wait=60))
    call = await answered(gw)
    await at(call, 5.0)
    proxy.cut()  # down from before the renewal until after the deadline
    phone = await phone_task
    trunk_seen = await trunk.result()
    # the PBX ends the call on its own at the deadline it has: the first slice's end, not
    # the renewed one (under CPU load Asterisk starts the L() timer up to ~2 s late)
    assert phone.bye_from == "pbx", explain(phone, trunk_seen)
    assert SLICE - 0.5 <= phone.talk <= SLICE + 2.5, explain(phone, trunk_seen)
    row = await settled_call(repo)  # the hangup report (AGI) still reaches the gateway
    assert row["state"] == "settled", dict(row)
    assert SLICE - 1 <= row["billed_seconds"] <= SLICE + 2, dict(row)
    assert row["billed_seconds"] <= row["funded_seconds"] == 2 * SLICE, dict(row)
    await at(call, 14.0)
    proxy.restore()
    # nothing waits on the link any more: the back-off (at most 10 s) paces the reconnect
    await eventually(lambda: gw.ami.state == "connected", within=12)
    assert gw.calls.live == {}
    await assert_invariants(repo.pool)


async def test_call_answered_while_the_ami_link_is_down_is_found_and_renewed(
        pbx, gateway, repo):
    gw, proxy = gateway, gateway.proxy
    loop = asyncio.get_running_loop()
    trunk = await pbx.uas("carrier", ring_ms=2000).started()
    phone_task = asyncio.create_task(pbx.call("alice", DOMESTIC, hold=20, max_wait=60))
    await eventually(lambda: len(gw.calls.live) == 1, within=10)
    [call] = gw.calls.live.values()
    decided = loop.time()
    proxy.cut()  # the callee answers ~2 s later: its DialEnd is lost with the link
    await asyncio.sleep(max(0.0, decided + 5.0 - loop.time()))
    assert call.answered_mono is None
    proxy.restore()  # ~3 s into the first 10 s slice: the re-sync finds the answer
    phone = await phone_task
    trunk_seen = await trunk.result()
    assert phone.bye_from == "phone" and phone.talk >= 19.5, explain(phone, trunk_seen)
    row = await settled_call(repo)
    assert row["state"] == "settled" and 20 <= row["billed_seconds"] <= 22, dict(row)
    assert row["funded_seconds"] >= 20
    await assert_invariants(repo.pool)
