"""A month of generated traffic through the real rater: the standard tenant's users call
domestic and international numbers and receive toll-free calls, over weeks of a moving
clock, so that every funding source is drawn (the pool until it runs dry, then the
wallet; the add-on, then the wallet; the wallet alone for toll-free inbound) and the
wallet is topped up and recharged on its way."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import uuid

from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater

from .clock import Clock
from .tenant import TENANT, standard_tenant

__all__ = ["Traffic", "month_of_traffic"]

# (caller, dialled) for outbound; ("inbound", dialled number) for the carrier's calls
OUTBOUND = [
    ("alice", "4165550123"),  # domestic: pool, then wallet at domestic_overage
    ("alice", "2125550100"),  # US from Canada: domestic too
    ("bob", "+14165550188"),
    ("bob", "+442079460000"),  # international: bob's add-on, then wallet
    ("bob", "+441612345678"),
    ("alice", "+442079460000"),  # alice has no add-on: wallet at the international rate
    ("dave", "4165550123"),  # partner route: recorded, not rated
    ("carol", "4165550123"),  # no licence: rejected
    ("alice", "+33142685300"),  # no rate for France: rejected
]
INBOUND = ["+18005550199"]  # the toll-free number: wallet at toll_free_inbound


@dataclasses.dataclass
class Traffic:
    calls: list[uuid.UUID]  # every call recorded in the month, in order
    open_calls: list[uuid.UUID]
    outside: list[uuid.UUID]  # recorded in the months before and after


async def _one_call(rater: Rater, rng: random.Random, *, settle: bool = True
                    ) -> tuple[uuid.UUID | None, bool]:
    """One call; its id (None: not recorded) and whether it is still open."""
    if rng.random() < 0.15:
        d = await rater.authorise_inbound(INBOUND[0], "2125550100")
    else:
        caller, dialled = rng.choice(OUTBOUND)
        d = await rater.authorise_outbound(caller, dialled)
    if d.call_id is None or not d.allow:
        return d.call_id, False
    if not settle:
        return d.call_id, True
    if rng.random() < 0.1:  # never answered
        await rater.release(d.call_id)
        return d.call_id, False
    await rater.answered(d.call_id)
    talk = rng.choice([rng.randint(1, 59), rng.randint(60, 400), rng.randint(300, 900)])
    funded = d.funded_seconds
    while funded is not None and funded < talk:
        renewal = await rater.renew(d.call_id)
        if renewal.slice_seconds == 0:
            break
        funded = renewal.funded_seconds
    await rater.settle(d.call_id, talk)
    return d.call_id, False


async def month_of_traffic(admin: Provisioning, rater: Rater, clock: Clock, *,
                           calls: int = 240, seed: int = 11,
                           first: dt.datetime = dt.datetime(2026, 11, 1, 6, tzinfo=dt.UTC),
                           days: int = 29, domestic_minutes: int = 40,
                           international_minutes: int = 15) -> Traffic:
    """The standard tenant (America/Toronto) and ``calls`` calls spread over ``days``
    from ``first`` (November 2026 by default), a call in October and one in December
    around them, and the last three of the month left open (if allowed)."""
    rng = random.Random(seed)
    clock.now = first - dt.timedelta(days=2)  # October, in Toronto
    await standard_tenant(admin, wallet="5.00")
    # small allotments so that the pool and the add-on run dry within the month
    await admin.set_allotment("CA", "domestic", domestic_minutes)
    await admin.set_allotment("CA", "international", international_minutes)
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="2.00", amount="5.00",
                                  monthly_cap=3)
    traffic = Traffic([], [], [])
    d = await rater.authorise_outbound("alice", "4165550123")
    await rater.answered(d.call_id)
    await rater.settle(d.call_id, 125)
    traffic.outside.append(d.call_id)
    step = dt.timedelta(days=days) / calls
    for i in range(calls):
        clock.now = first + step * i + dt.timedelta(seconds=rng.randint(0, 600))
        if i == calls // 2:
            await admin.topup(TENANT, "10.00", "mid-month top-up")
        call_id, still_open = await _one_call(rater, rng, settle=i < calls - 3)
        if call_id is not None:
            traffic.calls.append(call_id)
        if still_open:
            traffic.open_calls.append(call_id)
    # a call authorised late in the month, settled in the next one, is the month's
    clock.now = first + dt.timedelta(days=days, hours=17)  # 30 November, 18:00 Toronto
    d = await rater.authorise_outbound("bob", "+442079460000")
    traffic.calls.append(d.call_id)
    await rater.answered(d.call_id)
    clock.now += dt.timedelta(hours=7)  # 1 December in Toronto
    await rater.settle(d.call_id, 200)
    d = await rater.authorise_outbound("alice", "4165550123")
    await rater.answered(d.call_id)
    await rater.settle(d.call_id, 61)
    traffic.outside.append(d.call_id)
    return traffic
