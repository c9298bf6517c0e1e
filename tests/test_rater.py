"""The rater against the real PostgreSQL: every row of billing rules §6, reservations,
settlement, periods and the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg
import pytest

from gateway.billing.rater import Rater
from gateway.billing.views import as_dict
from gateway.errors import Conflict, InvalidInput, NotFound, Unavailable
from gateway.rating.model import Reason, Route, Source
from gateway.store.pool import open_pool
from gateway.store.repository import Repository, translate_errors
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.tenant import TENANT, standard_tenant
from tests.support.waiting import eventually

pytestmark = pytest.mark.db


async def wallet(repo, tenant=TENANT):
    r = await repo.get_wallet(tenant)
    return r["balance"], r["reserved"]


# ---- billing rules §6, outbound, one test per row -----------------------------------------

async def test_row1_emergency_allowed_without_licence_or_money(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("carol", "911")
    assert (d.allow, d.reason, d.route, d.funded_seconds) == (
        True, Reason.EMERGENCY, Route.EMERGENCY, None)


async def test_row1_emergency_allowed_when_the_database_is_gone(rater):
    class Broken:
        async def find_caller(self, *a):
            raise OSError("database down")

    rater.repo = Broken()
    d = await rater.authorise_outbound("whoever", "112")
    assert d.allow and d.route is Route.EMERGENCY


async def test_row2_internal_extension_sip_user_and_number(admin, rater, repo):
    await standard_tenant(admin)
    for dialled, target in (("102", "bob"), ("bob", "bob"), ("+15145550100", "alice"),
                            ("5145550100", "alice"), ("+15145550111", "bob")):
        d = await rater.authorise_outbound("carol", dialled)  # carol holds no licence
        assert (d.allow, d.reason, d.route, d.target) == (True, Reason.INTERNAL, Route.INTERNAL,
                                                          target), dialled
        assert d.funded_seconds is None
    assert await pool_row(repo) == (0, 0)


async def test_row2_sip_user_names_with_dot_or_dash_are_internal(admin, rater, repo):
    # issue 8 item 9: the dialled name was normalised like a phone number ("front.desk"
    # became "frontdesk") before it was compared with endpoint names
    await standard_tenant(admin)
    await admin.create_user("front", TENANT, sip_endpoint="maple.front-desk",
                            usage_location="CA")
    await admin.create_user("lab", TENANT, sip_endpoint="lab-2", usage_location="CA")
    await admin.create_user("frontdesk", TENANT, sip_endpoint="frontdesk",
                            usage_location="CA")
    for caller in ("carol", "alice"):  # no licence, and a Calling Plan licence
        for dialled, target in (("maple.front-desk", "maple.front-desk"),
                                ("lab-2", "lab-2"), ("frontdesk", "frontdesk")):
            d = await rater.authorise_outbound(caller, dialled)
            assert (d.allow, d.reason, d.route, d.target) == (
                True, Reason.INTERNAL, Route.INTERNAL, target), (caller, dialled)
            assert d.funded_seconds is None
            call = await repo.find_call(d.call_id)
            assert (call["destination"], call["route"], call["state"]) == (
                dialled, "internal", "authorised")
    # a name that is nobody's is not internal, and separators still do not make one
    d = await rater.authorise_outbound("alice", "front.desk")
    assert (d.allow, d.reason) == (False, Reason.INVALID_NUMBER)
    assert await pool_row(repo) == (0, 0)


async def test_row2_other_tenants_extension_is_not_internal(admin, rater):
    await standard_tenant(admin)
    await standard_tenant(admin, tenant="other", prefix="o-")
    d = await rater.authorise_outbound("o-carol", "+15145550100")  # acme's number
    assert d.reason is Reason.NO_LICENSE


async def test_row3_unknown_caller(admin, rater):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("mallory", "2125550100")
    assert (d.allow, d.reason, d.call_id) == (False, Reason.UNKNOWN_CALLER, None)


async def test_row4_no_licence(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("carol", "2125550100")
    assert (d.allow, d.reason) == (False, Reason.NO_LICENSE)
    row = await repo.find_call(d.call_id)
    assert (row["decision"], row["reason"], row["state"]) == ("REJECT", "NO_LICENSE", "rejected")


async def test_row5_invalid_number(admin, rater):
    await standard_tenant(admin)
    for dialled in ("12", "abc", "+99912", "5" * 80):
        d = await rater.authorise_outbound("alice", dialled)
        assert (d.allow, d.reason) == (False, Reason.INVALID_NUMBER), dialled


async def test_row6_blocked_premium_rate_by_default_and_policy(admin, rater):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "+19005550100")
    assert (d.allow, d.reason) == (False, Reason.BLOCKED_DESTINATION)
    await admin.update_tenant(TENANT, blocked_classes=["premium_rate", "international"])
    d = await rater.authorise_outbound("bob", "+442079460000")
    assert d.reason is Reason.BLOCKED_DESTINATION


async def test_row7_business_voice_goes_to_partner_unrated(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("dave", "+442079460000")
    assert (d.allow, d.reason, d.route, d.funded_seconds) == (True, Reason.PARTNER,
                                                              Route.PARTNER, None)
    s = await rater.settle(d.call_id, 61)
    assert (s.outcome, s.billed_seconds, s.charged) == ("settled", 120, 0)
    assert await pool_row(repo) == (0, 0)
    assert await wallet(repo) == (0, 0)


async def test_row8_domestic_toll_free_is_free(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "1-800-555-0100")
    assert (d.allow, d.reason, d.route, d.funded_seconds) == (True, Reason.TOLL_FREE_FREE,
                                                              Route.PSTN, None)
    await rater.settle(d.call_id, 300)
    assert await pool_row(repo) == (0, 0)


async def test_row9_domestic_from_pool_then_wallet_else_no_balance(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "2125550100")
    assert (d.allow, d.reason, d.route, d.funded_seconds) == (True, Reason.FUNDED, Route.PSTN,
                                                              300)
    assert d.sources == (Source.POOL, Source.WALLET)
    assert await pool_row(repo) == (0, 300)
    s = await rater.settle(d.call_id, 61)
    assert (s.outcome, s.billed_seconds) == ("settled", 120)
    assert await pool_row(repo) == (120, 0)
    await ledger_agrees(repo)


async def test_row10_international_without_rate(admin, rater, repo):
    await standard_tenant(admin, wallet="50")
    for user in ("alice", "bob"):  # bob holds the add-on: still no rate, still rejected
        d = await rater.authorise_outbound(user, "+33142685300")
        assert (d.allow, d.reason) == (False, Reason.NO_RATE)
    assert await wallet(repo) == (Decimal(50), 0)


async def test_row11_international_wallet_at_longest_prefix(admin, rater, repo):
    await standard_tenant(admin, wallet="10")
    d = await rater.authorise_outbound("alice", "+442079460000")  # 4420 at 0.05 beats 44
    assert d.allow and d.price_per_minute == Decimal("0.05")
    assert d.sources == (Source.WALLET,)
    assert await wallet(repo) == (Decimal(10), Decimal("0.25"))  # 300 s at 0.05 reserved
    s = await rater.settle(d.call_id, 90)
    assert (s.billed_seconds, s.charged) == (120, Decimal("0.1"))
    assert await wallet(repo) == (Decimal("9.9"), 0)
    d = await rater.authorise_outbound("alice", "+441612345678")
    assert d.price_per_minute == Decimal("0.10")
    await ledger_agrees(repo)


async def test_row11_international_addon_first_then_wallet(admin, rater, repo):
    await standard_tenant(admin, wallet="10")
    await admin.set_allotment("CA", "international", 3)  # 180 s of add-on minutes
    d = await rater.authorise_outbound("bob", "+442079460000")
    assert d.sources == (Source.ADDON, Source.WALLET) and d.funded_seconds == 300
    funding = {r["source"]: r["reserved_seconds"] for r in await repo.call_funding(d.call_id)}
    assert funding == {"addon": 180, "wallet": 120}
    s = await rater.settle(d.call_id, 200)  # 240 billed: 180 add-on + 60 wallet
    assert (s.billed_seconds, s.charged) == (240, Decimal("0.05"))
    usage = await repo.addon_usage(TENANT, dt.date(2026, 11, 1))
    assert [(u["user_id"], u["used_seconds"]) for u in usage] == [("bob", 180)]
    await ledger_agrees(repo)


async def test_row11_international_no_balance(admin, rater):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "+442079460000")
    assert (d.allow, d.reason, d.route) == (False, Reason.NO_BALANCE, None)


# ---- inbound ----------------------------------------------------------------------------

async def test_inbound_toll_free_charges_wallet(admin, rater, repo):
    await standard_tenant(admin, wallet="1")
    d = await rater.authorise_inbound("18005550199", "+442071234567")
    assert (d.allow, d.reason, d.target, d.funded_seconds) == (True, Reason.FUNDED, "alice", 300)
    s = await rater.settle(d.call_id, 30)
    assert (s.billed_seconds, s.charged) == (60, Decimal("0.03"))
    assert await wallet(repo) == (Decimal("0.97"), 0)


async def test_inbound_toll_free_empty_wallet_rejected(admin, rater):
    await standard_tenant(admin)
    d = await rater.authorise_inbound("+18005550199", "2125550100")
    assert (d.allow, d.reason) == (False, Reason.NO_BALANCE)


async def test_inbound_user_number_not_rated(admin, rater):
    await standard_tenant(admin)
    d = await rater.authorise_inbound("+15145550100", "2125550100")
    assert (d.allow, d.reason, d.target, d.funded_seconds) == (
        True, Reason.INBOUND_USER_NUMBER, "alice", None)


async def test_inbound_unknown_number(admin, rater):
    await standard_tenant(admin)
    for called in ("+15145559999", "s", ""):
        d = await rater.authorise_inbound(called, "2125550100")
        assert (d.allow, d.reason) == (False, Reason.UNKNOWN_NUMBER)


# ---- the article's example, pools, wallet -----------------------------------------------

async def test_article_example_ten_bought_three_assigned(admin, repo, views):
    await admin.create_tenant("north", "North Inc", "CA")
    await admin.set_subscription("north", "business_voice_calling_plan", 10)
    for i in range(3):
        await admin.create_user(f"u{i}", "north", f"u{i}", "CA")
        await admin.assign_licence(f"u{i}", "business_voice_calling_plan")
    usage = as_dict(await views.usage("north"))
    assert [(p["country"], p["capacity_minutes"]) for p in usage["pools"]] == [("CA", 9000)]


async def test_assignment_cannot_exceed_purchase(admin, repo):
    await standard_tenant(admin, calling_plan_licences=2)  # alice and bob use both
    await admin.create_user("erin", TENANT, "erin", "CA")
    with pytest.raises(Conflict) as e:
        await admin.assign_licence("erin", "business_voice_calling_plan")
    assert e.value.code == "LICENCE_LIMIT"
    assert (await admin.get_user("erin"))["licences"] == []
    with pytest.raises(Conflict) as e:
        await admin.set_subscription(TENANT, "business_voice_calling_plan", 1)
    assert e.value.code == "LICENCES_IN_USE"


async def test_pool_drains_mid_call_and_wallet_takes_over(admin, rater, repo):
    await standard_tenant(admin, wallet="1")
    await admin.set_allotment("CA", "domestic", 1)  # 2 users x 1 min = 120 s
    d = await rater.authorise_outbound("alice", "2125550100")
    assert d.funded_seconds == 300
    funding = {r["source"]: r["reserved_seconds"] for r in await repo.call_funding(d.call_id)}
    assert funding == {"pool": 120, "wallet": 180}
    r = await rater.renew(d.call_id)
    assert (r.slice_seconds, r.funded_seconds, r.open) == (300, 600, True)
    s = await rater.settle(d.call_id, 400)  # 420 billed: 120 pool + 300 wallet
    assert (s.billed_seconds, s.charged) == (420, Decimal("0.1"))
    assert await pool_row(repo) == (120, 0)
    assert await wallet(repo) == (Decimal("0.9"), 0)
    await ledger_agrees(repo)


async def test_partial_slice_and_cut_at_funded_end(admin, rater, repo):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 1)  # 120 s, no wallet
    d = await rater.authorise_outbound("alice", "2125550100")
    assert d.funded_seconds == 120
    r = await rater.renew(d.call_id)
    assert (r.slice_seconds, r.funded_seconds) == (0, 120)
    s = await rater.settle(d.call_id, 121)  # PBX cut a little late: never billed past funding
    assert s.billed_seconds == 120
    d2 = await rater.authorise_outbound("bob", "2125550100")
    assert (d2.allow, d2.reason) == (False, Reason.NO_BALANCE)
    await ledger_agrees(repo)


async def test_empty_pool_and_wallet_rejects_then_topup_succeeds(admin, rater, repo):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 0)
    d = await rater.authorise_outbound("alice", "2125550100")
    assert d.reason is Reason.NO_BALANCE
    await admin.topup(TENANT, "0.02")  # one minute of overage
    d = await rater.authorise_outbound("alice", "2125550100")
    assert (d.allow, d.funded_seconds) == (True, 60)
    await ledger_agrees(repo)


async def test_mid_month_assignment_grows_pool_at_once(admin, rater, repo, views):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 1)
    before = (as_dict(await views.usage(TENANT)))["pools"][0]["capacity_minutes"]
    await admin.create_user("erin", TENANT, "erin", "CA")
    await admin.assign_licence("erin", "business_voice_calling_plan")
    after = (as_dict(await views.usage(TENANT)))["pools"][0]["capacity_minutes"]
    assert (before, after) == (2, 3)


async def test_removing_a_licence_shrinks_the_pool_for_new_calls_only(admin, rater, repo):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 5)  # alice + bob: 600 s
    d = await rater.authorise_outbound("alice", "2125550100")
    assert d.funded_seconds == 300
    await admin.unassign_licence("bob", "international_calling_plan")
    await admin.unassign_licence("bob", "business_voice_calling_plan")  # capacity now 300
    d2 = await rater.authorise_outbound("alice", "2125550100")
    assert d2.reason is Reason.NO_BALANCE  # 300 of 300 already reserved
    s = await rater.settle(d.call_id, 200)
    assert s.billed_seconds == 240  # what was granted stays billable
    assert await pool_row(repo) == (240, 0)
    await ledger_agrees(repo)


async def test_settle_is_idempotent(admin, rater, repo):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "2125550100")
    first = await rater.settle(d.call_id, 65)
    second = await rater.settle(d.call_id, 500, by="cdr")
    third = await rater.release(d.call_id)
    assert first.outcome == "settled" and first.first_time
    assert (second.outcome, second.billed_seconds) == ("already_settled", 120)
    assert not second.first_time and third.outcome == "already_settled"
    assert await pool_row(repo) == (120, 0)
    await ledger_agrees(repo)


async def test_release_unanswered_call(admin, rater, repo):
    await standard_tenant(admin, wallet="5")
    d = await rater.authorise_outbound("alice", "+442079460000")
    assert await wallet(repo) == (Decimal(5), Decimal("0.25"))
    s = await rater.release(d.call_id)
    assert (s.outcome, s.billed_seconds, s.charged) == ("released", 0, 0)
    assert await wallet(repo) == (Decimal(5), 0)
    row = await repo.find_call(d.call_id)
    assert row["state"] == "released"
    await ledger_agrees(repo)


async def test_short_slices_reach_the_billing_boundary(admin, rater, repo):
    await standard_tenant(admin, wallet="5")
    rater.slice_seconds = 10
    d = await rater.authorise_outbound("alice", "+442079460000")
    assert d.funded_seconds == 60  # first increment is 60 s: a 10 s slice funds 60
    r = await rater.renew(d.call_id)
    assert r.funded_seconds == 120


# ---- periods -------------------------------------------------------------------------------

async def test_month_rollover_in_tenant_timezone(admin, rater, repo, clock, views):
    # 30 Nov 23:30 in Toronto is 1 Dec 04:30 UTC
    clock.now = dt.datetime(2026, 12, 1, 4, 30, tzinfo=dt.UTC)
    await standard_tenant(admin, wallet="5")
    await admin.set_allotment("CA", "domestic", 1)
    await admin.set_allotment("CA", "international", 1)
    d = await rater.authorise_outbound("alice", "2125550100")
    await rater.settle(d.call_id, 120)
    d = await rater.authorise_outbound("bob", "+442079460000")
    await rater.settle(d.call_id, 60)
    nov = as_dict(await views.usage(TENANT))
    assert nov["month"] == dt.date(2026, 11, 1)
    assert nov["pools"][0]["used_seconds"] == 120
    assert nov["international_addon"][0]["used_seconds"] == 60
    balance = nov["wallet"]["balance"]

    clock.now = dt.datetime(2026, 12, 1, 5, 1, tzinfo=dt.UTC)  # 00:01 on 1 Dec in Toronto
    dec = as_dict(await views.usage(TENANT))
    assert dec["month"] == dt.date(2026, 12, 1)
    assert dec["pools"][0]["used_seconds"] == 0 and dec["pools"][0]["capacity_seconds"] == 120
    assert dec["international_addon"][0]["used_seconds"] == 0
    assert dec["wallet"]["balance"] == balance  # the wallet carries over
    d = await rater.authorise_outbound("bob", "+442079460000")
    assert d.funded_seconds == 300
    funding = {r["source"]: r["reserved_seconds"] for r in await repo.call_funding(d.call_id)}
    assert funding["addon"] == 60  # December's add-on minutes are fresh
    await ledger_agrees(repo)


async def test_call_charged_to_month_it_was_authorised_in(admin, rater, repo, clock, views):
    clock.now = dt.datetime(2026, 12, 1, 4, 59, tzinfo=dt.UTC)  # 23:59 on 30 Nov in Toronto
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "2125550100")
    clock.advance(minutes=5)
    await rater.settle(d.call_id, 240)
    nov = as_dict(await views.usage(TENANT, dt.date(2026, 11, 1)))
    dec = as_dict(await views.usage(TENANT, dt.date(2026, 12, 1)))
    assert nov["pools"][0]["used_seconds"] == 240 and dec["pools"][0]["used_seconds"] == 0


# ---- auto-recharge ---------------------------------------------------------------------------

async def recharges(repo):
    return await repo.pool.fetch(
        "SELECT d_balance, month FROM ledger WHERE entry = 'recharge' ORDER BY id")


PARIS = "+33142685300"  # at 0.25 / min below: a 300 s slice reserves 1.25


async def paris_rate(admin):
    await admin.set_rates([{"kind": "international", "prefix": "33",
                            "price_per_minute": "0.25"}])


async def test_auto_recharge_when_a_reservation_crosses_the_threshold(admin, rater, repo):
    # billing rules §5: "whenever the available balance falls below the threshold";
    # this reservation leaves 4.00 available under a 5.00 threshold
    await standard_tenant(admin, wallet="5.25")
    await paris_rate(admin)
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="5", amount="10",
                                  monthly_cap=3)
    d = await rater.authorise_outbound("alice", PARIS)
    assert d.allow and d.funded_seconds == 300
    assert [r["d_balance"] for r in await recharges(repo)] == [Decimal(10)]
    assert await wallet(repo) == (Decimal("15.25"), Decimal("1.25"))
    await ledger_agrees(repo)


async def test_auto_recharge_when_a_renewal_crosses_the_threshold(admin, rater, repo):
    await standard_tenant(admin, wallet="7.50")
    await paris_rate(admin)
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="5", amount="10",
                                  monthly_cap=3)
    d = await rater.authorise_outbound("alice", PARIS)  # 6.25 available
    assert (await rater.renew(d.call_id)).slice_seconds == 300  # 5.00: not below
    assert await recharges(repo) == []
    assert (await rater.renew(d.call_id)).slice_seconds == 300  # 3.75: below
    rows = await repo.pool.fetch("SELECT call_id FROM ledger WHERE entry = 'recharge'")
    assert [r["call_id"] for r in rows] == [d.call_id]
    assert await wallet(repo) == (Decimal("17.50"), Decimal("3.75"))
    await rater.settle(d.call_id, 800)
    await ledger_agrees(repo)


async def test_auto_recharge_once_per_crossing_with_monthly_cap(admin, rater, repo, clock):
    await standard_tenant(admin, wallet="5.25")
    await paris_rate(admin)
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="5", amount="0.50",
                                  monthly_cap=2)
    calls = []

    async def reserve():
        d = await rater.authorise_outbound("alice", PARIS)
        assert d.allow
        calls.append(d.call_id)

    await reserve()  # 5.25 -> 4.00: a crossing -> recharge -> 4.50, still below
    assert len(await recharges(repo)) == 1
    await reserve()  # 4.50 -> 3.25: the same crossing, no second recharge
    assert len(await recharges(repo)) == 1
    for call_id in calls:  # back above the threshold (5.75): the next fall is a crossing
        await rater.release(call_id)
    await reserve()  # 5.75 -> 4.50 -> recharge (cap 2) -> 5.00: not below
    assert len(await recharges(repo)) == 2
    await reserve()  # 5.00 -> 3.75: a crossing, but the month's cap is reached
    assert len(await recharges(repo)) == 2
    clock.now = dt.datetime(2026, 12, 15, tzinfo=dt.UTC)  # a new month: the cap resets
    await reserve()  # 3.75 -> 2.50: the crossing the cap held back is recharged now
    assert [r["month"] for r in await recharges(repo)] == [
        dt.date(2026, 11, 1), dt.date(2026, 11, 1), dt.date(2026, 12, 1)]
    for call_id in calls[2:]:
        await rater.release(call_id)
    assert await wallet(repo) == (Decimal("6.75"), 0)
    await ledger_agrees(repo)


async def test_fifty_concurrent_reservations_crossing_recharge_at_most_the_cap(
        admin, rater, repo):
    await standard_tenant(admin, wallet="20")
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="15", amount="1",
                                  monthly_cap=3)
    # each reserves 0.25: 50 of them cross the threshold again after each recharge
    decisions = await asyncio.gather(*(rater.authorise_outbound("alice", "+442079460000")
                                       for _ in range(50)))
    assert all(d.allow for d in decisions)
    assert len(await recharges(repo)) == 3
    assert await wallet(repo) == (Decimal(23), Decimal("12.5"))
    await ledger_agrees(repo)


async def test_auto_recharge_refills_an_empty_wallet_at_authorisation(admin, rater, repo):
    await standard_tenant(admin)
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="1", amount="5",
                                  monthly_cap=1)
    d = await rater.authorise_outbound("alice", "+442079460000")
    assert d.allow and d.funded_seconds == 300
    assert await wallet(repo) == (Decimal(5), Decimal("0.25"))
    await ledger_agrees(repo)


# ---- an authorisation whose answer was lost (issue 8 item 2) --------------------------------
# The PBX is told GATEWAY_ERROR when the database does not answer in time, but the
# statement may still commit there: the rater voids the call id until the database agrees.

class LosesAnswers(Repository):
    """The authorisation reaches the database (``commits``) or not, and its answer is lost."""

    def __init__(self, pool, *, commits: bool):
        super().__init__(pool)
        self.commits = commits
        self.sent: dict = {}

    async def authorise(self, **kw):
        self.sent = kw
        if self.commits:
            await super().authorise(**kw)
        raise Unavailable("database unavailable: timeout", code="DATABASE_UNAVAILABLE")


async def voided(rater_):
    async with asyncio.timeout(10):
        await rater_.wait_voided()


async def test_a_lost_authorisation_that_committed_is_released(admin, repo, clock):
    await standard_tenant(admin)
    lossy = LosesAnswers(repo.pool, commits=True)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100", pbx_uniqueid="1700000000.9")
    await voided(r)
    row = await repo.find_call(lossy.sent["call_id"])
    # what the PBX was told, and nothing held
    assert (row["decision"], row["reason"], row["state"], row["settled_by"]) == (
        "REJECT", "GATEWAY_ERROR", "released", "void")
    assert await pool_row(repo) == (0, 0)
    await ledger_agrees(repo)


async def test_a_lost_authorisation_committing_late_takes_no_effect(admin, repo, clock):
    await standard_tenant(admin)
    lossy = LosesAnswers(repo.pool, commits=False)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100", pbx_uniqueid="1700000000.9")
    await voided(r)
    # the statement the client gave up on reaches the server only now
    with pytest.raises(Conflict):
        await repo.authorise(**lossy.sent)
    row = await repo.find_call(lossy.sent["call_id"])
    assert (row["decision"], row["reason"], row["state"]) == ("REJECT", "GATEWAY_ERROR",
                                                              "rejected")
    assert await pool_row(repo) == (0, 0)
    await ledger_agrees(repo)


async def test_a_lost_authorisation_is_voided_on_its_own_pbx(admin, repo, clock):
    """The void names the call's PBX: its tombstone holds the channel on that PBX only,
    and the same channel on another PBX is another call, left alone."""
    await standard_tenant(admin)
    other = await Rater(repo, clock=clock).authorise_outbound(
        "bob", "2125550100", pbx_uniqueid="1700000000.9", pbx="pbx1")
    for commits in (True, False):
        lossy = LosesAnswers(repo.pool, commits=commits)
        r = Rater(lossy, clock=clock)
        with pytest.raises(Unavailable):
            await r.authorise_outbound("alice", "2125550100", pbx_uniqueid=f"17.{commits}",
                                       pbx="pbx2")
        await voided(r)
        assert lossy.sent["pbx"] == "pbx2"
        row = await repo.find_call(lossy.sent["call_id"])
        assert (row["pbx"], row["pbx_uniqueid"], row["reason"], row["state"]) == (
            "pbx2", f"17.{commits}", "GATEWAY_ERROR", "released" if commits else "rejected")
    lossy = LosesAnswers(repo.pool, commits=False)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100", pbx_uniqueid="1700000000.9",
                                   pbx="pbx2")
    await voided(r)
    assert (await repo.find_call(lossy.sent["call_id"]))["pbx"] == "pbx2"  # a tombstone
    with pytest.raises(Conflict):  # the late authorisation takes no effect
        await repo.authorise(**lossy.sent)
    row = await repo.find_call_by_uniqueid("pbx1", "1700000000.9")
    assert (row["id"], row["state"]) == (other.call_id, "authorised")
    assert await pool_row(repo) == (0, 300)  # bob's call only
    await ledger_agrees(repo)


class InFlight(LosesAnswers):
    """The authorisation runs on ``conn`` in a transaction the test ends later."""

    def __init__(self, pool, conn):
        super().__init__(pool, commits=False)
        self.conn = conn

    async def authorise(self, **kw):
        self.sent = kw
        await self.conn.fetchrow(
            "SELECT * FROM gw_authorise($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, $15, $16, $17)", kw["call_id"], kw["tenant_id"], kw["user_id"],
            kw["direction"], kw["caller"], kw["destination"], kw["number_class"],
            kw["decision"], kw["reason"], kw["route"], kw["pbx_uniqueid"], kw["linkedid"],
            kw["rate_kind"], list(kw["sources"]), kw["pool_country"], kw["slice_seconds"],
            kw["now"])
        raise Unavailable("database unavailable: timeout", code="DATABASE_UNAVAILABLE")


@pytest.mark.parametrize("late_outcome", ["commit", "rollback"])
async def test_void_waits_for_an_authorisation_still_in_flight(admin, repo, clock,
                                                               late_outcome):
    """The void and the authorisation serialise on the call id: whichever way the one in
    flight ends, the call ends holding nothing and says what the PBX was told."""
    await standard_tenant(admin)
    async with repo.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        lossy = InFlight(repo.pool, conn)
        r = Rater(lossy, clock=clock)
        with pytest.raises(Unavailable):
            await r.authorise_outbound("alice", "2125550100", pbx_uniqueid="1700000000.9")
        await asyncio.sleep(0.5)
        assert r.voids_pending == 1  # waiting on the row the authorisation inserted
        await (tx.commit() if late_outcome == "commit" else tx.rollback())
    await voided(r)
    row = await repo.find_call(lossy.sent["call_id"])
    assert (row["decision"], row["reason"]) == ("REJECT", "GATEWAY_ERROR")
    assert row["state"] == ("released" if late_outcome == "commit" else "rejected")
    assert await pool_row(repo) == (0, 0)
    await ledger_agrees(repo)


async def test_void_is_retried_until_the_database_answers(admin, repo, clock):
    await standard_tenant(admin)

    class Flaky(LosesAnswers):
        failures = 2

        async def void_authorisation(self, **kw):
            if self.failures:
                self.failures -= 1
                raise Unavailable("database unavailable: refused",
                                  code="DATABASE_UNAVAILABLE")
            return await super().void_authorisation(**kw)

    lossy = Flaky(repo.pool, commits=True)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100")
    await voided(r)
    assert lossy.failures == 0
    assert (await repo.find_call(lossy.sent["call_id"]))["state"] == "released"
    assert await pool_row(repo) == (0, 0)


@pytest.mark.parametrize("error", [
    # a standby refusing the write while Patroni promotes it (through the repository's
    # error translation, as the running gateway meets it)
    "standby",
    # an error the database may not give twice: before, the void gave up on it and the
    # call stayed ALLOW, funded, while the PBX had been told GATEWAY_ERROR
    "deadlock",
])
async def test_void_is_retried_through_any_error_that_may_pass(admin, repo, clock, error):
    await standard_tenant(admin)

    class Refuses(LosesAnswers):
        failures = 2

        async def void_authorisation(self, **kw):
            if self.failures:
                self.failures -= 1
                if error == "standby":
                    async with self.pool.acquire() as conn, conn.transaction(readonly=True):
                        with translate_errors():
                            await conn.execute("INSERT INTO pbx_leases (pbx) VALUES ('x')")
                raise asyncpg.DeadlockDetectedError("deadlock detected")
            return await super().void_authorisation(**kw)

    lossy = Refuses(repo.pool, commits=True)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100")
    await voided(r)
    assert lossy.failures == 0
    row = await repo.find_call(lossy.sent["call_id"])
    assert (row["decision"], row["state"]) == ("REJECT", "released")
    assert await pool_row(repo) == (0, 0)


async def test_void_gives_up_only_on_a_definite_refusal(admin, repo, clock):
    await standard_tenant(admin)

    class TenantGone(LosesAnswers):
        tries = 0

        async def void_authorisation(self, **kw):
            self.tries += 1
            raise NotFound("unknown tenant acme", code="UNKNOWN_CALL")

    lossy = TenantGone(repo.pool, commits=False)
    r = Rater(lossy, clock=clock)
    with pytest.raises(Unavailable):
        await r.authorise_outbound("alice", "2125550100")
    await voided(r)
    assert lossy.tries == 1 and r.voids_pending == 0


async def test_a_lost_renewal_holds_its_slice_only_until_the_call_is_settled(
        admin, repo, clock):
    """The renewal committed but its answer was lost: the PBX's deadline stayed at the
    first slice, so the call ends there; its settlement releases the slice in vain."""
    await standard_tenant(admin)

    class LosesRenewals(Repository):
        async def renew(self, *a, **kw):
            await super().renew(*a, **kw)
            raise Unavailable("database unavailable: timeout", code="DATABASE_UNAVAILABLE")

    r = Rater(LosesRenewals(repo.pool), clock=clock)
    d = await r.authorise_outbound("alice", "2125550100")
    with pytest.raises(Unavailable):
        await r.renew(d.call_id)
    assert await pool_row(repo) == (0, 600)  # held while the call may be up
    await r.settle(d.call_id, 300)  # cut by the PBX at the deadline it had
    assert await pool_row(repo) == (300, 0)
    await ledger_agrees(repo)


# ---- bad input: typed errors, no partial writes ------------------------------------------

async def count_rows(repo):
    return await repo.pool.fetchval(
        "SELECT (SELECT count(*) FROM tenants) + (SELECT count(*) FROM users)"
        " + (SELECT count(*) FROM licence_assignments) + (SELECT count(*) FROM ledger)"
        " + (SELECT count(*) FROM rates) + (SELECT count(*) FROM phone_numbers)")


@pytest.mark.parametrize(
    "op, exc, code",
    [
        (lambda a: a.create_tenant("x", "X", "ZZ"), InvalidInput, "UNKNOWN_COUNTRY"),
        (lambda a: a.create_tenant("x", "X", "CA", timezone="Mars/Base"), InvalidInput,
         "INVALID_TIMEZONE"),
        (lambda a: a.create_tenant("bad id!", "X", "CA"), InvalidInput, "INVALID_ID"),
        (lambda a: a.create_tenant(TENANT, "Again", "CA"), Conflict, "DUPLICATE"),
        (lambda a: a.create_user("zed", "nope", "zed", "CA"), NotFound, "UNKNOWN_TENANT"),
        (lambda a: a.create_user("alice", TENANT, "alice2", "CA"), Conflict, "DUPLICATE"),
        (lambda a: a.create_user("zed", TENANT, "alice", "CA"), Conflict, "DUPLICATE"),
        (lambda a: a.create_user("zed", TENANT, "zed", "XX"), InvalidInput, "UNKNOWN_COUNTRY"),
        (lambda a: a.assign_licence("nobody", "business_voice"), NotFound, "UNKNOWN_USER"),
        (lambda a: a.assign_licence("carol", "gold_plan"), InvalidInput, "UNKNOWN_SKU"),
        (lambda a: a.assign_licence("carol", "international_calling_plan"), Conflict,
         "ADDON_REQUIRES_CALLING_PLAN"),
        (lambda a: a.assign_licence("dave", "business_voice_calling_plan"), Conflict,
         "LICENCE_CONFLICT"),
        (lambda a: a.topup(TENANT, "-5"), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup(TENANT, "0"), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup(TENANT, "1e12"), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup(TENANT, "NaN"), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup(TENANT, 1.5), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup(TENANT, "0.0000001"), InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.topup("nope", "5"), NotFound, "UNKNOWN_TENANT"),
        (lambda a: a.add_number("12345", TENANT, "user", user_id="alice"), InvalidInput,
         "INVALID_NUMBER"),
        (lambda a: a.add_number("+15145550100", TENANT, "user", user_id="alice"), Conflict,
         "DUPLICATE"),
        (lambda a: a.add_number("+15145550177", TENANT, "user", user_id="ghost"), NotFound,
         "UNKNOWN_USER"),
        (lambda a: a.set_rates([{"kind": "international", "prefix": "33",
                                 "price_per_minute": "0.1"},
                                {"kind": "intl", "prefix": "34", "price_per_minute": "0.1"}]),
         InvalidInput, "INVALID_KIND"),
        (lambda a: a.import_rates_csv("kind,prefix,price_per_minute\n"
                                      "international,33,0.1\ninternational,34,-1\n"),
         InvalidInput, "INVALID_AMOUNT"),
        (lambda a: a.set_subscription(TENANT, "business_voice", -1), InvalidInput,
         "INVALID_QUANTITY"),
    ],
)
async def test_bad_input_is_a_typed_error_and_writes_nothing(admin, repo, op, exc, code):
    await standard_tenant(admin)
    before = await count_rows(repo)
    with pytest.raises(exc) as e:
        await op(admin)
    assert e.value.code == code
    assert await count_rows(repo) == before


async def test_calls_api_bad_input(admin, rater, repo):
    await standard_tenant(admin)
    with pytest.raises(NotFound) as e:
        await rater.settle(uuid.uuid4(), 10)
    assert e.value.code == "UNKNOWN_CALL"
    d = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid="1700000000.1")
    for bad in (-1, 10**9, "12", 1.5, True):
        with pytest.raises(InvalidInput):
            await rater.settle(d.call_id, bad)
    with pytest.raises(Conflict) as e:
        await rater.authorise_outbound("bob", "2125550100", pbx_uniqueid="1700000000.1")
    assert e.value.code == "DUPLICATE"
    assert await pool_row(repo) == (0, 300)  # the duplicate reserved nothing
    await ledger_agrees(repo)


async def test_inbound_number_whose_user_was_deleted_is_unallocated(admin, rater):
    await standard_tenant(admin)
    await admin.deactivate_user("alice")  # +15145550100 was alice's
    d = await rater.authorise_inbound("+15145550100", "2125550100")
    assert (d.allow, d.reason) == (False, Reason.UNKNOWN_NUMBER)


# ---- one pool's requests coalesced into one statement (issue 10, the hot pool) ---------------
# The authorisations and settlements of one pool that arrive while one of that pool's
# statements is in the database leave together as the next one (gw_pool_batch): each is
# decided as alone, in a subtransaction of its own, and they share one commit. A test
# holds the pool row's lock from another connection so that the requests queue up and
# go in one statement, whatever the machine's speed.

DOMESTIC = "2125550123"  # not like any of the tenant's numbers: one round trip


@contextlib.asynccontextmanager
async def pool_row_held(repo, tenant=TENANT, country="CA"):
    """The pool row locked by another transaction until the block ends."""
    async with repo.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM pools WHERE tenant_id = $1 AND country = $2"
                           " FOR UPDATE", tenant, country)
        yield conn


async def one_then_together(rater_, first, rest):
    """Start coroutine ``first``; once its statement is sent (it then waits for the held
    lock), start the coroutines ``rest``, and return the tasks once every one of them
    waits for it: they go together in the next statement."""
    batches = rater_.coalesced["batches"]
    first_task = asyncio.create_task(first)
    await eventually(lambda: rater_.coalesced["batches"] > batches, within=10)
    rest_tasks = [asyncio.create_task(c) for c in rest]
    await eventually(lambda: rater_.coalesced["queued"] == len(rest_tasks), within=10)
    return first_task, rest_tasks


async def known_callers(rater_, *callers: str) -> None:
    """Each caller's context kept (one call each, released), and the pool row there."""
    for caller in callers:
        d = await rater_.authorise_outbound(caller, DOMESTIC)
        await rater_.release(d.call_id)


async def test_one_pools_concurrent_requests_go_in_one_statement(admin, rater, repo):
    await standard_tenant(admin)
    await known_callers(rater, "alice", "bob")
    before = rater.coalesced
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.authorise_outbound("alice", DOMESTIC),
            [rater.authorise_outbound("alice" if i % 2 else "bob", DOMESTIC,
                                      pbx_uniqueid=f"17.{i}") for i in range(9)])
    decisions = [await first, *[await t for t in rest]]
    assert all((d.allow, d.reason, d.funded_seconds) == (True, Reason.FUNDED, 300)
               for d in decisions)
    after = rater.coalesced
    assert (after["batches"] - before["batches"], after["requests"] - before["requests"]) == (
        2, 10)  # the first alone, then the nine together
    assert await pool_row(repo) == (0, 3000)
    rows = await repo.pool.fetch("SELECT pbx_uniqueid, state, funded_seconds FROM calls"
                                 " WHERE pbx_uniqueid LIKE '17.%' ORDER BY pbx_uniqueid")
    assert [tuple(r) for r in rows] == [(f"17.{i}", "authorised", 300) for i in range(9)]

    # settled together, each once; a second report of three of them (alone: the first
    # took the call's pool) says so, whichever of the two the database saw first
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.settle(decisions[0].call_id, 61),
            [rater.settle(d.call_id, 61) for d in decisions[1:]])
        again = [asyncio.create_task(rater.settle(d.call_id, 61)) for d in decisions[:3]]
        await asyncio.sleep(0.1)
    reports = [await first, *[await t for t in rest]] + [await t for t in again]
    assert {(s.outcome, s.billed_seconds) for s in reports} == {
        ("settled", 120), ("already_settled", 120)}
    firsts = [s.outcome for s in reports].count("settled")
    assert firsts == 10
    assert rater.coalesced["batches"] - after["batches"] == 2
    assert await pool_row(repo) == (1200, 0)
    charges = await repo.pool.fetchval("SELECT count(*) FROM ledger WHERE entry = 'charge'")
    assert charges == 10
    await ledger_agrees(repo)


# The columns a call row takes from its decision (not its id, channel or times).
DECIDED = ("user_id", "direction", "caller", "destination", "number_class", "decision",
           "reason", "route", "pbx", "rate_kind", "rate_prefix", "price_per_minute",
           "first_increment", "increment", "sources", "month", "pool_country",
           "funded_seconds")


async def rows_written(repo, uniqueids: list[str]) -> dict[str, tuple]:
    """Per channel: its call row's decided columns, its funding rows and its ledger rows
    (each as the columns a request chose), and the transaction id that wrote the call row."""
    out = {}
    for u in uniqueids:
        call = await repo.pool.fetchrow(
            f"SELECT id, xmin::text AS writer, {', '.join(DECIDED)} FROM calls"
            " WHERE pbx_uniqueid = $1", u)
        funding = await repo.pool.fetch(
            "SELECT source, position, reserved_seconds, reserved_amount FROM call_funding"
            " WHERE call_id = $1 ORDER BY position", call["id"])
        ledger = await repo.pool.fetch(
            "SELECT entry, account, country, month, d_reserved_seconds, d_reserved,"
            " d_balance FROM ledger WHERE call_id = $1 ORDER BY id", call["id"])
        out[u] = (tuple(call[c] for c in DECIDED), [tuple(f) for f in funding],
                  [tuple(e) for e in ledger], call["writer"])
    return out


async def settlements_written(repo, call_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple]:
    """Per call: what its settlement wrote to its call row, its funding rows and the
    ledger (the entries of its end, in order), and the transaction id that wrote the
    call row last."""
    out = {}
    for call_id in call_ids:
        call = await repo.pool.fetchrow(
            "SELECT xmin::text AS writer, state, billable_seconds, billed_seconds,"
            " charged_amount, settled_by FROM calls WHERE id = $1", call_id)
        funding = await repo.pool.fetch(
            "SELECT source, charged_seconds, charged_amount FROM call_funding"
            " WHERE call_id = $1 ORDER BY position", call_id)
        ledger = await repo.pool.fetch(
            "SELECT entry, account, d_used_seconds, d_reserved_seconds, d_balance FROM ledger"
            " WHERE call_id = $1 AND entry <> 'reserve' ORDER BY id", call_id)
        out[call_id] = (tuple(call)[1:], [tuple(f) for f in funding],
                        [tuple(e) for e in ledger], call["writer"])
    return out


async def test_one_pools_batch_is_written_together_as_each_would_be_alone(admin, rater, repo):
    """A batch whose requests all take the pool's fast path, with the pool free for all
    of them, is written in one go (gw_authorise_together: one subtransaction writes every
    call row) and writes exactly the rows each request writes alone, in request order."""
    await standard_tenant(admin)
    await known_callers(rater, "alice", "bob")
    alone = Rater(repo, clock=rater.clock, batch_limit=1)
    for i, caller in enumerate(("alice", "bob")):
        await alone.authorise_outbound(caller, DOMESTIC, pbx_uniqueid=f"alone.{i}")
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="17.first"),
            [rater.authorise_outbound(("alice", "bob")[i % 2], DOMESTIC,
                                      pbx_uniqueid=f"17.{i}") for i in range(6)])
    await first
    decisions = [await t for t in rest]
    assert [(d.allow, d.reason, d.funded_seconds, d.price_per_minute) for d in decisions] == [
        (True, Reason.FUNDED, 300, Decimal("0.02"))] * 6
    written = await rows_written(repo, ["alone.0", "alone.1"] + [f"17.{i}" for i in range(6)])
    for i in range(6):
        assert written[f"17.{i}"][:3] == written[f"alone.{i % 2}"][:3], i
    assert len({written[f"17.{i}"][3] for i in range(6)}) == 1  # one writer for the six
    assert written["alone.0"][3] != written["alone.1"][3]
    # the ledger's reservations follow the requests' order
    order = await repo.pool.fetch(
        "SELECT c.pbx_uniqueid FROM ledger l JOIN calls c ON c.id = l.call_id"
        " WHERE c.pbx_uniqueid LIKE '17.%' ORDER BY l.id")
    assert [r["pbx_uniqueid"] for r in order] == ["17.first"] + [f"17.{i}" for i in range(6)]
    assert await pool_row(repo) == (0, 9 * 300)
    await ledger_agrees(repo)

    # settled together (gw_settle_together), as each alone: nothing, 61 s, past the slice
    billables = (0, 61, 400)
    alone_ids = [r["id"] for r in await repo.pool.fetch(
        "SELECT id FROM calls WHERE pbx_uniqueid LIKE 'alone.%' ORDER BY pbx_uniqueid")]
    alone_ids.append((await alone.authorise_outbound("alice", DOMESTIC,
                                                      pbx_uniqueid="alone.2")).call_id)
    alone_settled = [await alone.settle(c, b) for c, b in zip(alone_ids, billables, strict=True)]
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.release((await first).call_id),
            [rater.settle(d.call_id, billables[i % 3]) for i, d in enumerate(decisions)])
    await first
    settled = [await t for t in rest]
    assert [(s.outcome, s.billed_seconds, s.charged) for s in settled] == [
        (s.outcome, s.billed_seconds, s.charged) for s in alone_settled] * 2
    assert [(s.outcome, s.billed_seconds) for s in alone_settled] == [
        ("released", 0), ("settled", 120), ("settled", 300)]
    ended = await settlements_written(repo, [d.call_id for d in decisions] + alone_ids)
    for i, d in enumerate(decisions):
        assert ended[d.call_id][:3] == ended[alone_ids[i % 3]][:3], i
    assert len({ended[d.call_id][3] for d in decisions}) == 1  # one writer for the six
    assert await pool_row(repo) == (3 * 420, 0)
    await ledger_agrees(repo)


async def test_a_batch_the_pool_cannot_fund_whole_is_decided_one_by_one(admin, rater, repo):
    """The pool has room for two slices and a part of a third (two Calling Plan users of
    6 minutes: 720 s): the batch of three after the first is decided one by one, as
    alone: the second from the pool, the third the pool's last 120 s and the rest from
    the wallet, the fourth the wallet alone."""
    await standard_tenant(admin, wallet="5.00")
    await admin.set_allotment("CA", "domestic", 6)
    await known_callers(rater, "alice", "bob")
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="18.first"),
            [rater.authorise_outbound(("alice", "bob")[i % 2], DOMESTIC,
                                      pbx_uniqueid=f"18.{i}") for i in range(3)])
    decisions = [await first] + [await t for t in rest]
    assert [(d.allow, d.funded_seconds) for d in decisions] == [(True, 300)] * 4
    written = await rows_written(repo, ["18.first"] + [f"18.{i}" for i in range(3)])
    # the three together were decided one by one: each its own writer
    assert len({written[f"18.{i}"][3] for i in range(3)}) == 3
    assert [[(f[0], f[2]) for f in w[1]] for w in written.values()] == [
        [("pool", 300)], [("pool", 300)], [("pool", 120), ("wallet", 180)],
        [("wallet", 300)]]
    assert await pool_row(repo) == (0, 720)  # the pool spent exactly, never past
    await ledger_agrees(repo)

    # settled together: one of them is funded by the wallet too, so they are settled
    # one by one (each its own writer), as alone
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.settle(decisions[0].call_id, 61),
            [rater.settle(d.call_id, 250) for d in decisions[1:]])
    assert (await first).billed_seconds == 120
    settled = [await t for t in rest]
    assert [(s.outcome, s.billed_seconds, s.charged) for s in settled] == [
        ("settled", 300, Decimal(0)), ("settled", 300, Decimal("0.060000")),
        ("settled", 300, Decimal("0.100000"))]
    ended = await settlements_written(repo, [d.call_id for d in decisions[1:]])
    assert len({e[3] for e in ended.values()}) == 3
    assert await pool_row(repo) == (120 + 300 + 120, 0)
    await ledger_agrees(repo)


async def test_a_batch_made_from_a_context_that_moved_on_is_decided_again(admin, rater,
                                                                          repo):
    """The tenant's context changes while the batch waits (a number added that the dialled
    string is): the batch is not written together; each request, decided one by one,
    finds its context stale, and is decided again from the current one: the call to the
    tenant's own new number is internal, the others go out as before."""
    await standard_tenant(admin)
    await known_callers(rater, "alice", "bob")
    async with pool_row_held(repo):
        first, rest = await one_then_together(
            rater, rater.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="19.first"),
            [rater.authorise_outbound(caller, dialled, pbx_uniqueid=f"19.{i}")
             for i, (caller, dialled) in enumerate((("alice", DOMESTIC), ("bob", "5145550177"),
                                                    ("bob", DOMESTIC)))])
        await admin.add_number("+15145550177", TENANT, "user", user_id="bob")
    decisions = [await first] + [await t for t in rest]
    assert [(d.allow, d.route) for d in decisions] == [
        (True, Route.PSTN), (True, Route.PSTN), (True, Route.INTERNAL), (True, Route.PSTN)]
    rows = await repo.pool.fetch("SELECT pbx_uniqueid, route, funded_seconds FROM calls"
                                 " WHERE pbx_uniqueid LIKE '19.%' ORDER BY pbx_uniqueid")
    assert [tuple(r) for r in rows] == [("19.0", "pstn", 300), ("19.1", "internal", 0),
                                        ("19.2", "pstn", 300), ("19.first", "pstn", 300)]
    await ledger_agrees(repo)


async def test_a_request_failing_in_a_batch_takes_none_of_the_others(admin, rater, repo):
    await standard_tenant(admin)
    await known_callers(rater, "alice", "bob")
    async with pool_row_held(repo):
        # the same channel twice: the second is refused, the others go on
        first, tasks = await one_then_together(
            rater, rater.authorise_outbound("alice", DOMESTIC),
            [rater.authorise_outbound(caller, DOMESTIC, pbx_uniqueid=uniqueid)
             for caller, uniqueid in (("alice", "17.1"), ("bob", "17.2"), ("bob", "17.1"),
                                      ("alice", "17.3"))])
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], Conflict) and results[2].code == "DUPLICATE"
    assert [(d.allow, d.funded_seconds) for d in (results[0], results[1], results[3])] == [
        (True, 300)] * 3
    assert await repo.pool.fetchval("SELECT count(*) FROM calls WHERE state = 'authorised'") == 4
    assert await pool_row(repo) == (0, 1200)  # the refused one reserved nothing
    assert rater.voids_pending == 0  # a definite refusal: nothing to void
    await ledger_agrees(repo)


async def gateway_errors_hold_nothing(repo, uniqueids: list[str], used: int = 0) -> None:
    """Authorisations the rater could not answer: each ended as what the PBX was told (a
    GATEWAY_ERROR rejection, released if it had committed), and nothing is held."""
    rows = await repo.pool.fetch("SELECT decision, reason, state FROM calls"
                                 " WHERE pbx_uniqueid = ANY($1)", uniqueids)
    assert len(rows) == len(uniqueids)
    assert {(r["decision"], r["reason"]) for r in rows} == {("REJECT", "GATEWAY_ERROR")}
    assert {r["state"] for r in rows} <= {"rejected", "released"}
    assert await pool_row(repo) == (used, 0)
    await ledger_agrees(repo)


LOST = [f"lost.{i}" for i in range(6)]


@contextlib.asynccontextmanager
async def channel_held(repo, uniqueid: str):
    """Another transaction holds channel ``uniqueid`` (an uncommitted call row of its
    own) until the block ends, then rolls back: an authorisation of that channel waits."""
    async with repo.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "INSERT INTO calls (id, tenant_id, direction, caller, destination,"
                " number_class, decision, reason, pbx_uniqueid, month, state, authorised_at)"
                " VALUES (gen_random_uuid(), $1, 'outbound', 'test', 'test', 'domestic',"
                " 'REJECT', 'TEST', $2, '2026-11-01', 'rejected', now())", TENANT, uniqueid)
            yield conn
        finally:
            await tx.rollback()


async def lost_batch(rater_, repo, cut) -> list:
    """Six authorisations of one pool: the first alone, then five in one statement that
    waits for another transaction holding the channel of one of them; ``cut(conn)``
    (``conn``: that transaction's) is the test's way to fail that statement."""
    async with channel_held(repo, "lost.1") as conn:
        async with pool_row_held(repo):
            first, rest = await one_then_together(
                rater_, rater_.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="lost.0"),
                [rater_.authorise_outbound("alice" if i % 2 else "bob", DOMESTIC,
                                           pbx_uniqueid=f"lost.{i}") for i in range(1, 6)])
        decided = await first  # the five leave now, together, and wait for lost.1
        assert decided.allow
        await cut(conn)
    results = await asyncio.gather(*rest, return_exceptions=True)
    await rater_.release(decided.call_id)
    return results


async def test_a_batch_cut_by_the_statement_timeout_is_voided_whole(admin, repo, clock,
                                                                   database_url):
    await standard_tenant(admin)
    # the server cancels a statement after 1.2 s (open_pool: a fifth under the client's)
    short = await open_pool(database_url, min_size=2, max_size=4, command_timeout=1.5,
                            run_migrations=False)
    try:
        r = Rater(Repository(short), clock=clock)
        await known_callers(r, "alice", "bob")

        async def outlast(conn):  # hold the channel past the statement's timeout
            await asyncio.sleep(2.0)

        before = r.coalesced["batches"]
        results = await lost_batch(r, repo, outlast)
        assert all(isinstance(x, Unavailable) for x in results), results
        assert r.coalesced["batches"] - before == 3  # the first, the five, the release
        await voided(r)
    finally:
        await short.close()
    await gateway_errors_hold_nothing(repo, LOST[1:])


async def test_a_batch_whose_connection_is_killed_is_voided_whole(admin, repo, clock,
                                                                  database_url):
    await standard_tenant(admin)
    own = await open_pool(database_url, min_size=2, max_size=4, run_migrations=False)
    try:
        r = Rater(Repository(own), clock=clock)
        await known_callers(r, "alice", "bob")

        async def kill(conn):  # the statement of the five, once it waits
            for _ in range(500):  # 10 s
                waiting = [row["pid"] for row in await conn.fetch(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND wait_event_type = 'Lock'")]
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert len(waiting) == 1
            await conn.execute("SELECT pg_terminate_backend($1)", waiting[0])

        results = await lost_batch(r, repo, kill)
        assert all(isinstance(x, Unavailable) for x in results), results
        await voided(r)
    finally:
        await own.close()
    await gateway_errors_hold_nothing(repo, LOST[1:])


async def test_requests_waiting_for_a_statement_without_answer_fail_with_it(
        admin, repo, clock, database_url):
    """A statement of a pool gets no answer: the requests that waited for it fail at once,
    unsent, instead of waiting as long again (a frozen database answers each caller within
    one statement's timeout); each is voided as its own would be."""
    await standard_tenant(admin)
    short = await open_pool(database_url, min_size=2, max_size=4, command_timeout=1.5,
                            run_migrations=False)
    try:
        r = Rater(Repository(short), clock=clock)
        await known_callers(r, "alice", "bob")
        before = r.coalesced["batches"]
        async with pool_row_held(repo):
            first, rest = await one_then_together(
                r, r.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="lost.0"),
                [r.authorise_outbound("bob", DOMESTIC, pbx_uniqueid=f"lost.{i}")
                 for i in range(1, 6)])
            results = await asyncio.gather(first, *rest, return_exceptions=True)
        assert all(isinstance(x, Unavailable) for x in results), results
        assert r.coalesced["batches"] - before == 1  # the five were never sent
        await voided(r)
    finally:
        await short.close()
    await gateway_errors_hold_nothing(repo, LOST)


class LosesBatchAnswers(Repository):
    """A batch reaches the database and commits, and its answer is lost."""

    async def pool_batch(self, settlements, authorisations):
        await super().pool_batch(settlements, authorisations)
        raise Unavailable("database unavailable: timeout", code="DATABASE_UNAVAILABLE")


async def test_a_committed_batch_whose_answer_was_lost_is_released_whole(admin, repo, clock):
    await standard_tenant(admin)
    r = Rater(LosesBatchAnswers(repo.pool), clock=clock)
    await known_callers(r, "alice", "bob")

    async def let_go(conn):
        pass

    results = await lost_batch(r, repo, let_go)
    assert all(isinstance(x, Unavailable) for x in results), results
    await voided(r)
    rows = await repo.pool.fetch("SELECT state FROM calls WHERE pbx_uniqueid = ANY($1)",
                                 LOST[1:])
    assert [row["state"] for row in rows] == ["released"] * 5  # they had committed
    await gateway_errors_hold_nothing(repo, LOST[1:])


async def test_settlements_waiting_for_a_statement_without_answer_are_sent(
        admin, repo, clock, database_url):
    """The settlements that waited for a statement that got no answer are sent after it
    (to a server that may have taken over meanwhile): they do not fail with it."""
    await standard_tenant(admin)
    short = await open_pool(database_url, min_size=2, max_size=4, command_timeout=1.5,
                            run_migrations=False)
    try:
        r = Rater(Repository(short), clock=clock)
        await known_callers(r, "alice", "bob")
        call = await r.authorise_outbound("alice", DOMESTIC)
        async with pool_row_held(repo):
            first, (settling, authorising) = await one_then_together(
                r, r.authorise_outbound("bob", DOMESTIC, pbx_uniqueid="lost.0"),
                [r.settle(call.call_id, 61),
                 r.authorise_outbound("alice", DOMESTIC, pbx_uniqueid="lost.1")])
            await eventually(first.done, within=10)  # the server cancelled it
            assert isinstance(first.exception(), Unavailable)
            await eventually(authorising.done)  # failed with it, unsent
            assert isinstance(authorising.exception(), Unavailable)
            assert not settling.done()  # sent again: waits for the lock
        s = await settling
        assert (s.outcome, s.billed_seconds) == ("settled", 120)
        await voided(r)
    finally:
        await short.close()
    await gateway_errors_hold_nothing(repo, LOST[:2], used=120)  # the settled call's
