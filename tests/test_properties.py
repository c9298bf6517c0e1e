"""Property tests: random sequences of authorise / renew / settle / release / top-up /
assign keep the invariants of billing rules §8 at every step."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from tests.support.clock import Clock
from tests.support.database import TABLES
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

DESTINATIONS = ["2125550100", "+442079460000", "+441612345678", "18005550100", "102"]
CALLERS = ["alice", "bob", "carol", "dave", "erin"]

operation = st.one_of(
    st.tuples(st.just("authorise"), st.sampled_from(CALLERS), st.sampled_from(DESTINATIONS)),
    st.tuples(st.just("inbound"), st.sampled_from(["+18005550199", "+15145550100"])),
    st.tuples(st.just("renew"), st.integers(0, 20), st.integers(1, 400)),
    st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, 900)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("topup"), st.decimals("0.01", "3", places=2)),
    st.tuples(st.just("assign"), st.sampled_from(["erin", "carol"])),
    st.tuples(st.just("unassign"), st.sampled_from(["erin", "carol"])),
    st.tuples(st.just("clock"), st.integers(1, 20)),
    # calls of one pool at once: their requests share statements (gw_pool_batch)
    st.tuples(st.just("burst"), st.lists(st.sampled_from(CALLERS), min_size=2, max_size=6),
              st.sampled_from(DESTINATIONS[:2] + ["2125550123"]), st.integers(0, 400),
              st.booleans()),
)


# bursts of one pool's calls, with what moves the pool and the wallet between them
burst_operation = st.one_of(
    operation.filter(lambda op: op[0] in ("burst", "renew", "release", "topup", "clock")),
    st.tuples(st.just("burst"), st.lists(st.sampled_from(["alice", "bob", "erin"]),
                                         min_size=3, max_size=8),
              st.just("2125550123"), st.integers(0, 400), st.booleans()),
)

EXAMPLES = int(os.environ.get("GATEWAY_PROPERTY_EXAMPLES", "30"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(operation, min_size=1, max_size=25),
       slice_seconds=st.sampled_from([10, 60, 300]),
       domestic_minutes=st.integers(0, 4), intl_minutes=st.integers(0, 3),
       recharge=st.booleans())
async def test_random_sequences_keep_the_invariants(db_pool, ops, slice_seconds,
                                                    domestic_minutes, intl_minutes, recharge):
    await keeps_the_invariants(db_pool, ops, slice_seconds, domestic_minutes, intl_minutes,
                               recharge)


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(ops=st.lists(burst_operation, min_size=1, max_size=10),
       slice_seconds=st.sampled_from([10, 60, 300]),
       domestic_minutes=st.integers(0, 6), recharge=st.booleans())
async def test_bursts_on_one_pool_keep_the_invariants(db_pool, ops, slice_seconds,
                                                      domestic_minutes, recharge):
    """Calls of one pool at once: their requests go in shared statements, and a pool of
    a few minutes runs dry in the middle of a statement."""
    await keeps_the_invariants(db_pool, ops, slice_seconds, domestic_minutes, 0, recharge)


async def keeps_the_invariants(db_pool, ops, slice_seconds, domestic_minutes, intl_minutes,
                               recharge):
    from gateway.store.repository import Repository

    await db_pool.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    repo = Repository(db_pool)
    clock = Clock(dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC))  # near a month's end
    admin = Provisioning(repo, clock=clock)
    rater = Rater(repo, clock=clock, slice_seconds=slice_seconds)
    await standard_tenant(admin, wallet="0.50")
    await admin.set_allotment("CA", "domestic", domestic_minutes)
    await admin.set_allotment("CA", "international", intl_minutes)
    await admin.create_user("erin", TENANT, "erin", "CA")
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.013", "first_increment": 30,
                            "increment": 6}])
    if recharge:
        await admin.set_auto_recharge(TENANT, enabled=True, threshold="0.30", amount="0.25",
                                      monthly_cap=3)
    calls = []
    settled: dict = {}
    unassigned = False
    for op in ops:
        kind = op[0]
        if kind == "authorise":
            d = await rater.authorise_outbound(op[1], op[2])
            if d.call_id:
                calls.append(d.call_id)
        elif kind == "inbound":
            d = await rater.authorise_inbound(op[1], "2125550100")
            if d.call_id:
                calls.append(d.call_id)
        elif kind in ("renew", "settle", "release") and calls:
            call_id = calls[op[1] % len(calls)]
            if kind == "renew":
                r = await rater.renew(call_id, op[2])
                assert r.slice_seconds >= 0
            else:
                s = (await rater.settle(call_id, op[2]) if kind == "settle"
                     else await rater.release(call_id))
                if call_id in settled:
                    assert not s.first_time  # exactly once
                    assert s.billed_seconds == settled[call_id]
                elif s.first_time:
                    settled[call_id] = s.billed_seconds
                row = await repo.find_call(call_id)
                if row["billed_seconds"] is not None and row["sources"]:
                    assert row["billed_seconds"] <= row["funded_seconds"]
        elif kind == "topup":
            await admin.topup(TENANT, op[1])
        elif kind == "assign":
            try:
                await admin.assign_licence(op[1], "business_voice_calling_plan")
            except Exception as exc:  # the purchase may be used up: a typed refusal
                assert getattr(exc, "code", None) == "LICENCE_LIMIT"
        elif kind == "unassign":
            try:
                await admin.unassign_licence(op[1], "business_voice_calling_plan")
                unassigned = True
            except Exception as exc:
                assert getattr(exc, "code", None) == "LICENCE_NOT_ASSIGNED"
        elif kind == "clock":
            clock.advance(minutes=op[1])
        elif kind == "burst":
            _, callers, dialled, billable, settle_twice = op
            decisions = await asyncio.gather(
                *(rater.authorise_outbound(c, dialled) for c in callers))
            opened = [d.call_id for d in decisions if d.call_id]
            calls.extend(opened)
            # each call ended at once, some reported twice: each is settled once
            reports = [(call_id, rater.settle(call_id, billable))
                       for call_id in opened for _ in range(2 if settle_twice else 1)]
            results = await asyncio.gather(*(r for _, r in reports))
            for call_id in opened:
                mine = [s for (c, _), s in zip(reports, results, strict=True) if c == call_id]
                firsts = [s for s in mine if s.first_time]
                if call_id in settled:
                    assert firsts == []
                else:
                    assert len(firsts) <= 1
                    if firsts:
                        settled[call_id] = firsts[0].billed_seconds
                    assert {s.billed_seconds for s in mine} <= {settled.get(call_id, 0)}
        await ledger_agrees(repo, capacity=not unassigned)
    # every ended call settles: releasing what is still open leaves nothing reserved
    for call_id in calls:
        await rater.release(call_id)
    await ledger_agrees(repo, capacity=not unassigned)
    left = await db_pool.fetchval(
        "SELECT (SELECT coalesce(sum(reserved_seconds), 0) FROM pools)"
        " + (SELECT coalesce(sum(reserved_seconds), 0) FROM addon_usage)")
    assert left == 0
    assert (await repo.get_wallet(TENANT))["reserved"] == 0
