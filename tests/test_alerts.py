"""Alerts against the real PostgreSQL: each kind is raised by the movement that crosses
its line, in that movement's transaction, once per crossing (200 concurrent
authorisations crossing 80 % write one alert), and the §8 invariants still hold with
the triggers in place. Operators acknowledge and clear; clearing an international-spend
block lets international calls through again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal

import pytest

from gateway.billing.alerts import Alerts
from gateway.billing.rater import Rater
from gateway.errors import InvalidInput, NotFound
from gateway.store.alerts import AlertStore
from tests.faults.invariants import assert_invariants
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

CALLS = 200


@pytest.fixture
def alerts(repo):
    return Alerts(AlertStore(repo.pool))


async def kinds(alerts, tenant=TENANT) -> list[tuple[str, str, Decimal | None]]:
    return sorted((a.kind, a.subject, a.threshold) for a in await alerts.list(tenant))


async def many_users(admin, n: int) -> None:
    """n Calling Plan users with a 1-minute allotment each: a pool of n (+2) minutes."""
    await standard_tenant(admin, calling_plan_licences=n + 2)
    await admin.set_allotment("CA", "domestic", 1)
    for i in range(n):
        await admin.create_user(f"u{i}", TENANT, f"u{i}", "CA")
        await admin.assign_licence(f"u{i}", "business_voice_calling_plan")


async def test_200_concurrent_authorisations_crossing_80_percent_write_one_alert(
        admin, repo, clock, alerts):
    await many_users(admin, 48)  # + alice and bob: 50 licences, a pool of 3000 s
    hook = await alerts.create_webhook("http://127.0.0.1:9/hook", tenant_id=TENANT,
                                       events=["pool_used"])
    rater = Rater(repo, clock=clock, slice_seconds=60)
    results = await asyncio.gather(
        *(rater.authorise_outbound(f"u{i % 48}", "2125550100") for i in range(CALLS)),
        return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sum(1 for d in results if d.allow) == 50
    pool_alerts = [a for a in await alerts.list(TENANT) if a.kind == "pool_used"]
    assert sorted(a.threshold for a in pool_alerts) == [80, 100]
    assert {a.period for a in pool_alerts} == {"2026-11"}
    assert {a.subject for a in pool_alerts} == {"CA"}
    for a in pool_alerts:
        assert a.details["capacity_seconds"] == 3000
        assert a.details["used_seconds"] + a.details["reserved_seconds"] >= \
            3000 * int(a.threshold) // 100
    # one delivery per alert to the subscription: the outbox has each event once
    deliveries = await alerts.deliveries(webhook_id=hook.id)
    assert sorted(d.alert_id for d in deliveries) == sorted(a.id for a in pool_alerts)
    # 150 NO_BALANCE rejections in one window: one alert of that kind too
    assert [a.threshold for a in await alerts.list(TENANT)
            if a.kind == "no_balance_rejections"] == [5]
    await ledger_agrees(repo)


async def gateway_process(url: str, caller: str, n: int) -> dict:
    """n concurrent authorisations from a gateway process of its own
    (tests/concurrency_worker.py), slices of 60 s."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.concurrency_worker", url, caller, "2125550100", str(n),
        "60", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_two_gateway_processes_crossing_80_percent_write_one_alert(
        admin, repo, alerts, database_url):
    await many_users(admin, 48)
    a, b = await asyncio.gather(gateway_process(database_url, "u{m}", 100),
                                gateway_process(database_url, "alice", 100))
    assert a["errors"] == [] and b["errors"] == []
    assert a["funded"] + b["funded"] == 3000
    assert sorted(x.threshold for x in await alerts.list(TENANT)
                  if x.kind == "pool_used") == [80, 100]
    await ledger_agrees(repo)


async def test_a_pool_below_its_lines_raises_nothing_and_settlements_never_do(
        admin, repo, clock, alerts):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 50)  # two Calling Plan users: 6000 s
    rater = Rater(repo, clock=clock, slice_seconds=600)
    for _ in range(7):  # 4200 s reserved: 70 %
        d = await rater.authorise_outbound("alice", "2125550100")
        assert d.allow
        await rater.settle(d.call_id, 600)
    assert await kinds(alerts) == []
    d = await rater.authorise_outbound("alice", "2125550100")  # 4800 s: 80 %
    assert await kinds(alerts) == [("pool_used", "CA", 80)]
    await rater.settle(d.call_id, 30)  # used + reserved falls: no trigger, no alert
    d = await rater.authorise_outbound("alice", "2125550100")
    assert await kinds(alerts) == [("pool_used", "CA", 80)]  # once per month and line
    await ledger_agrees(repo)


async def test_addon_used_up(admin, repo, clock, alerts):
    await standard_tenant(admin, wallet="5.00")
    await admin.set_allotment("CA", "international", 1)  # bob's add-on: 60 s
    rater = Rater(repo, clock=clock, slice_seconds=60)
    d = await rater.authorise_outbound("bob", "+442079460000")
    assert d.allow
    assert ("addon_used", "bob", 100) in await kinds(alerts)
    [alert] = [a for a in await alerts.list(TENANT) if a.kind == "addon_used"]
    assert alert.details["capacity_seconds"] == 60


async def test_wallet_below_once_per_crossing_rearmed_by_a_topup(admin, repo, clock, alerts):
    await standard_tenant(admin, wallet="10.30")
    await alerts.set_settings(TENANT, wallet_below="10")
    await admin.set_allotment("CA", "international", 0)
    rater = Rater(repo, clock=clock, slice_seconds=1800)

    async def call(minutes: int) -> None:
        d = await rater.authorise_outbound("alice", "+442079460000")  # 0.05 a minute
        assert d.allow
        await rater.settle(d.call_id, 60 * minutes)

    await call(1)  # 10.25: above
    assert await kinds(alerts) == []
    await call(6)  # 9.95: below, one alert
    await call(1)  # 9.90: still below, no second alert
    assert await kinds(alerts) == [("wallet_below", "wallet", 10)]
    await admin.topup(TENANT, "1.00")  # 10.90: above again, re-armed
    await call(1)
    assert await kinds(alerts) == [("wallet_below", "wallet", 10)]
    await call(20)  # 9.85: a second crossing
    assert await kinds(alerts) == [("wallet_below", "wallet", 10)] * 2
    await ledger_agrees(repo)


async def test_auto_recharge_fired_and_monthly_cap_reached(admin, repo, clock, alerts):
    await standard_tenant(admin, wallet="1.00")
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="0.50", amount="2.00",
                                  monthly_cap=2)
    await alerts.set_settings(TENANT, wallet_below=None)
    await admin.set_allotment("CA", "international", 0)
    rater = Rater(repo, clock=clock, slice_seconds=1200)
    for _ in range(3):
        d = await rater.authorise_outbound("alice", "+442079460000")
        await rater.settle(d.call_id, 60 * 20)  # 1.00 a call: below 0.50 each time
    found = await alerts.list(TENANT)
    recharges = [a for a in found if a.kind == "auto_recharge"]
    assert len(recharges) == 2  # the cap: 2 a month
    assert [a.details["recharges_this_month"] for a in reversed(recharges)] == [1, 2]
    assert all(a.details["amount"] == "2.000000" for a in recharges)
    [cap] = [a for a in found if a.kind == "recharge_cap_reached"]
    assert cap.period == "2026-11" and cap.details["monthly_cap"] == 2
    await ledger_agrees(repo)


async def test_no_balance_rejections_within_the_window(admin, repo, clock, alerts):
    await standard_tenant(admin)  # no wallet money: international calls are NO_BALANCE
    await alerts.set_settings(TENANT, no_balance_count=3, no_balance_minutes=10)
    await admin.set_allotment("CA", "international", 0)
    rater = Rater(repo, clock=clock)
    for _ in range(2):
        assert (await rater.authorise_outbound("alice", "+442079460000")).reason.value \
            == "NO_BALANCE"
    assert await kinds(alerts) == []
    clock.advance(minutes=11)  # the first two fall out of the window
    for _ in range(2):
        await rater.authorise_outbound("alice", "+442079460000")
    assert await kinds(alerts) == []
    await rater.authorise_outbound("alice", "+442079460000")  # 3 within 10 minutes
    [alert] = await alerts.list(TENANT)
    assert (alert.kind, alert.threshold, alert.details["rejections"]) == \
        ("no_balance_rejections", 3, 3)
    for _ in range(3):  # the same window: no second alert
        await rater.authorise_outbound("alice", "+442079460000")
    assert len(await alerts.list(TENANT)) == 1


async def test_international_spend_blocks_until_an_operator_clears(admin, repo, clock, alerts,
                                                                  views):
    await standard_tenant(admin, wallet="10.00")
    await alerts.set_settings(TENANT, international_hourly_limit="0.50",
                              international_block=True)
    await admin.set_allotment("CA", "international", 0)
    rater = Rater(repo, clock=clock, slice_seconds=300)  # 0.25 reserved per call
    first = await rater.authorise_outbound("alice", "+442079460000")
    assert first.allow and await kinds(alerts) == []
    second = await rater.authorise_outbound("alice", "+442079460000")  # 0.50 this hour
    assert second.allow  # the call that crossed goes through; the next ones do not
    [alert] = await alerts.list(TENANT)
    assert (alert.kind, alert.blocked, alert.details["reserved"]) == \
        ("international_spend", True, "0.500000")
    assert "international" in (await views.tenant(TENANT)).blocked_classes
    third = await rater.authorise_outbound("alice", "+442079460000")
    assert (third.allow, third.reason.value) == (False, "BLOCKED_DESTINATION")
    domestic = await rater.authorise_outbound("alice", "2125550100")
    assert domestic.allow  # only international calls are blocked
    acknowledged = await alerts.acknowledge(alert.id, note="looking")
    assert acknowledged.state == "acknowledged"
    assert "international" in (await views.tenant(TENANT)).blocked_classes
    cleared = await alerts.clear(alert.id, by="ops", note="customer confirmed")
    assert (cleared.state, cleared.cleared_by, cleared.note) == \
        ("cleared", "ops", "customer confirmed")
    assert "international" not in (await views.tenant(TENANT)).blocked_classes
    fourth = await rater.authorise_outbound("alice", "+442079460000")
    assert fourth.allow  # cleared: the rest of this hour is not blocked again
    assert len(await alerts.list(TENANT)) == 1
    clock.advance(hours=1)  # the next hour has a line of its own
    await rater.authorise_outbound("alice", "+442079460000")
    await rater.authorise_outbound("alice", "+442079460000")
    assert [a.period for a in await alerts.list(TENANT)] == ["2026-11-15T13Z",
                                                             "2026-11-15T12Z"]
    await ledger_agrees(repo)


async def test_operator_actions_and_their_errors(admin, repo, clock, alerts):
    await standard_tenant(admin)
    await alerts.set_settings(TENANT, no_balance_count=1)
    await admin.set_allotment("CA", "international", 0)
    await Rater(repo, clock=clock).authorise_outbound("alice", "+442079460000")
    [alert] = await alerts.list(TENANT, state="active")
    assert (await alerts.acknowledge(alert.id)).state == "acknowledged"
    assert (await alerts.acknowledge(alert.id)).state == "acknowledged"  # idempotent
    assert await alerts.list(TENANT, state="active") == []
    assert (await alerts.clear(alert.id)).state == "cleared"
    assert (await alerts.acknowledge(alert.id)).state == "cleared"  # stays cleared
    assert [a.id for a in await alerts.list(state="cleared")] == [alert.id]
    with pytest.raises(NotFound) as e:
        await alerts.clear(alert.id + 1000)
    assert e.value.code == "UNKNOWN_ALERT"
    with pytest.raises(InvalidInput) as e:
        await alerts.list(TENANT, state="open")
    assert e.value.code == "INVALID_STATE"
    with pytest.raises(InvalidInput) as e:
        await alerts.set_settings(TENANT, pool_percents=[80, 101])
    assert e.value.field == "pool_percents"
    with pytest.raises(InvalidInput) as e:
        await alerts.set_settings(TENANT, wallet_below=1.5)
    assert e.value.code == "INVALID_AMOUNT"
    before = await alerts.settings(TENANT)
    assert before.pool_percents == [80, 100] and before.no_balance_count == 1
    with pytest.raises(NotFound):
        await alerts.set_settings("nobody", no_balance_count=2)


async def test_invariants_hold_with_the_triggers_firing(admin, repo, clock, alerts):
    """A mix of pool, add-on and wallet calls that crosses every line on the way:
    authorise, renew, settle and release concurrently; then billing rules §8."""
    await many_users(admin, 8)  # a pool of 10 minutes
    await admin.topup(TENANT, "3.00")
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="1.00", amount="1.00",
                                  monthly_cap=2)
    await alerts.set_settings(TENANT, wallet_below="2.50", no_balance_count=2,
                              international_hourly_limit="0.20", international_block=True)
    await admin.set_allotment("CA", "international", 1)
    rater = Rater(repo, clock=clock, slice_seconds=60)

    async def cycle(i: int) -> None:
        caller = ("bob", "alice", f"u{i % 8}")[i % 3]
        dialled = "+442079460000" if i % 3 < 2 else "2125550100"
        d = await rater.authorise_outbound(caller, dialled)
        if not d.allow:
            return
        if i % 4 == 0:
            await rater.release(d.call_id)
            return
        await rater.renew(d.call_id)
        await rater.settle(d.call_id, 30 + i % 90)

    results = await asyncio.gather(*(cycle(i) for i in range(60)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    raised = {a.kind for a in await alerts.list(TENANT)}
    assert {"pool_used", "addon_used", "international_spend"} <= raised
    await assert_invariants(repo.pool)


async def test_an_alert_is_part_of_its_movement_rolled_back_with_it(admin, repo, clock,
                                                                    alerts):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 1)  # two users: a pool of 120 s
    await alerts.create_webhook("http://127.0.0.1:9/hook")
    async with repo.one_transaction(rollback=True) as inner:
        d = await Rater(inner, clock=clock, slice_seconds=120).authorise_outbound(
            "alice", "2125550100")
        assert d.allow
        seen = await inner.pool.fetch("SELECT kind, threshold FROM alerts")
        assert sorted((r["kind"], r["threshold"]) for r in seen) == \
            [("pool_used", 80), ("pool_used", 100)]
        assert await inner.pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 2
    # the authorisation did not commit: neither did its alerts nor their deliveries
    assert await alerts.list() == []
    assert await alerts.deliveries() == []
    d = await Rater(repo, clock=clock, slice_seconds=120).authorise_outbound(
        "alice", "2125550100")
    assert sorted(a.threshold for a in await alerts.list()) == [80, 100]


async def test_the_pool_line_follows_licences_assigned_mid_month(admin, repo, clock, alerts):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 1)  # alice and bob: 120 s
    rater = Rater(repo, clock=clock, slice_seconds=60)
    assert (await rater.authorise_outbound("alice", "2125550100")).allow  # 50 %
    await admin.assign_licence("carol", "business_voice_calling_plan")  # 180 s now
    assert (await rater.authorise_outbound("alice", "2125550100")).allow  # 67 %
    assert await kinds(alerts) == []
    assert (await rater.authorise_outbound("alice", "2125550100")).allow  # 100 %
    assert await kinds(alerts) == [("pool_used", "CA", 80), ("pool_used", "CA", 100)]
    [full] = [a for a in await alerts.list() if a.threshold == 100]
    assert full.details["capacity_seconds"] == 180
    await admin.set_allotment("CA", "domestic", 2)  # an allotment change counts at once
    await admin.create_tenant("other", "Other", "CA")
    assert (await alerts.settings("other")).pool_percents == [80, 100]  # shipped defaults
