"""Pure rules: classification, the decision table without a database, rounding."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.rating import numbers, rules
from gateway.rating.model import (
    CallerContext,
    Classified,
    NumberClass,
    NumberKind,
    Reason,
    Route,
    Sku,
    Source,
    Tenant,
    User,
)


@pytest.mark.parametrize(
    "dialled, country, expected",
    [
        ("911", "US", NumberClass.EMERGENCY),
        ("933", "US", NumberClass.EMERGENCY),
        ("112", "GB", NumberClass.EMERGENCY),
        ("999", "GB", NumberClass.EMERGENCY),
        ("+1 (212) 555-0100", "US", NumberClass.DOMESTIC),
        ("+14165550100", "US", NumberClass.DOMESTIC),  # US -> CA is domestic
        ("2125550100", "CA", NumberClass.DOMESTIC),  # CA -> US is domestic
        ("18005550100", "US", NumberClass.TOLL_FREE),
        ("+19005550100", "US", NumberClass.PREMIUM_RATE),
        ("011442079460000", "US", NumberClass.INTERNATIONAL),
        ("02079460000", "GB", NumberClass.DOMESTIC),
        ("+12125550100", "GB", NumberClass.INTERNATIONAL),
        ("+18765550100", "US", NumberClass.INTERNATIONAL),  # Jamaica shares +1
        ("12", "US", NumberClass.INVALID),
        ("abc", "US", NumberClass.INVALID),
        ("", "US", NumberClass.INVALID),
        ("+1212555010099999999", "US", NumberClass.INVALID),
    ],
)
def test_classify(dialled, country, expected):
    assert numbers.classify(dialled, country).number_class is expected


def test_classify_gives_e164():
    assert numbers.classify("(514) 555-0100", "CA").e164 == "+15145550100"


def test_inbound_e164():
    assert numbers.inbound_e164("18005550199") == "+18005550199"
    assert numbers.inbound_e164("+18005550199") == "+18005550199"
    assert numbers.inbound_e164("s") is None
    assert numbers.inbound_e164("0123") is None


@pytest.mark.parametrize(
    "seconds, first, incr, billed",
    [(0, 60, 60, 0), (1, 60, 60, 60), (60, 60, 60, 60), (61, 60, 60, 120),
     (119, 60, 60, 120), (31, 30, 6, 36), (30, 30, 6, 30), (7, 1, 1, 7), (-5, 60, 60, 0)],
)
def test_bill_round(seconds, first, incr, billed):
    assert rules.bill_round(seconds, first, incr) == billed


@given(st.integers(0, 100000), st.integers(1, 3600), st.integers(1, 3600))
def test_bill_round_properties(seconds, first, incr):
    billed = rules.bill_round(seconds, first, incr)
    assert billed >= seconds
    if seconds > 0:
        assert billed >= first
        assert (billed - first) % incr == 0
        assert billed - seconds < max(first, incr)


def test_cost_rounds_up_to_six_decimals():
    assert rules.cost(Decimal("0.07"), 1) == Decimal("0.001167")
    assert rules.cost(Decimal("0.10"), 120) == Decimal("0.200000")


def test_month_in_tenant_timezone():
    moment = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)  # still 30 Nov in Toronto
    assert rules.month_of(moment, "America/Toronto") == dt.date(2026, 11, 1)
    assert rules.month_of(moment, "UTC") == dt.date(2026, 12, 1)


def ctx(licences=(Sku.CALLING_PLAN,), internal=None, blocked=("premium_rate",)):
    tenant = Tenant("t", "US", blocked_classes=frozenset(blocked))
    user = User("u", "t", "u", "US", "101", frozenset(licences))
    return CallerContext(user, tenant, internal)


def ruling_for(c, dialled):
    return rules.decide_outbound(c, dialled, numbers.classify(dialled, "US"))


def test_decide_rows_in_order():
    # row 1 beats everything, even an unknown caller
    assert ruling_for(None, "911").route is Route.EMERGENCY
    # row 2 beats the missing licence
    r = ruling_for(ctx(licences=(), internal="bob"), "102")
    assert (r.allow, r.route, r.target) == (True, Route.INTERNAL, "bob")
    assert ruling_for(None, "2125550100").reason is Reason.UNKNOWN_CALLER
    assert ruling_for(ctx(licences=()), "garbage").reason is Reason.NO_LICENSE
    assert ruling_for(ctx(), "garbage").reason is Reason.INVALID_NUMBER
    assert ruling_for(ctx(), "+19005550100").reason is Reason.BLOCKED_DESTINATION
    assert ruling_for(ctx(blocked=()), "+19005550100").allow
    r = ruling_for(ctx(licences=(Sku.BUSINESS_VOICE,)), "+442079460000")
    assert (r.route, r.rated) == (Route.PARTNER, False)
    r = ruling_for(ctx(), "18005550100")
    assert (r.reason, r.rated) == (Reason.TOLL_FREE_FREE, False)
    r = ruling_for(ctx(), "2125550100")
    assert r.sources == (Source.POOL, Source.WALLET) and r.pool_country == "US"
    r = ruling_for(ctx(), "+442079460000")
    assert r.sources == (Source.WALLET,)
    r = ruling_for(ctx(licences=(Sku.CALLING_PLAN, Sku.ADDON)), "+442079460000")
    assert r.sources == (Source.ADDON, Source.WALLET)


def test_decide_inbound():
    assert rules.decide_inbound(None, None, None).reason is Reason.UNKNOWN_NUMBER
    r = rules.decide_inbound("+18005550199", NumberKind.TOLL_FREE, "alice")
    assert r.sources == (Source.WALLET,) and r.target == "alice"
    r = rules.decide_inbound("+15145550100", NumberKind.USER, "alice")
    assert r.allow and not r.rated


@given(st.text(max_size=40), st.sampled_from(["US", "CA", "GB", "FR"]))
def test_classify_never_raises(text, country):
    c = numbers.classify(text, country)
    assert isinstance(c, Classified)
    if c.e164 is not None:
        assert c.e164.startswith("+")
