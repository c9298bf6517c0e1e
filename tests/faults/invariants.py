"""The billing rules' §8 invariants, checked in SQL after a fault."""

from __future__ import annotations

from types import SimpleNamespace

import asyncpg

from tests.support.ledger import ledger_agrees


async def assert_invariants(pool: asyncpg.Pool, *, all_ended: bool = True) -> None:
    """§8: pool used + reserved ≤ capacity; wallet ≥ 0 and equal to its ledger; counters
    equal their ledger rows; each call settled at most once; no call billed past its
    funding; and, once every channel is gone (``all_ended``), nothing reserved and no call
    left open."""
    await ledger_agrees(SimpleNamespace(pool=pool))
    twice = await pool.fetch(
        "SELECT call_id, account, count(*) AS charges FROM ledger WHERE entry = 'charge'"
        " GROUP BY call_id, account HAVING count(*) > 1")
    assert [dict(r) for r in twice] == [], "a call was charged more than once"
    over = await pool.fetch(
        "SELECT id, billed_seconds, funded_seconds FROM calls"
        " WHERE cardinality(sources) > 0 AND billed_seconds > funded_seconds")
    assert [dict(r) for r in over] == [], "a call was billed past its funding"
    if all_ended:
        still_open = await pool.fetch(
            "SELECT id, state, settled_by FROM calls WHERE state IN ('authorised', 'answered')")
        assert [dict(r) for r in still_open] == [], "calls left open after every channel ended"
        reserved = await pool.fetchrow(
            "SELECT (SELECT coalesce(sum(reserved_seconds), 0) FROM pools) AS pool,"
            " (SELECT coalesce(sum(reserved_seconds), 0) FROM addon_usage) AS addon,"
            " (SELECT coalesce(sum(reserved), 0) FROM wallets) AS wallet")
        assert dict(reserved) == {"pool": 0, "addon": 0, "wallet": 0}, "funds left reserved"
