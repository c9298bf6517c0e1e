"""The SQL functions mirror the pure rules: same rounding, same money."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.rating import rules

pytestmark = pytest.mark.db


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(seconds=st.integers(-5, 200000), first=st.integers(1, 3600), incr=st.integers(1, 3600),
       price=st.decimals(min_value=0, max_value=1000, places=6))
async def test_sql_rounding_and_cost_match_python(db_pool, seconds, first, incr, price):
    billed, money = await db_pool.fetchrow(
        "SELECT gw_bill_round($1, $2, $3), gw_cost($4, $5)",
        seconds, first, incr, price, max(seconds, 0))
    assert billed == rules.bill_round(seconds, first, incr)
    assert money == rules.cost(price, max(seconds, 0))
    assert isinstance(money, Decimal)
