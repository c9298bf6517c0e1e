"""Billing rules §8 checked in SQL: counters agree with the ledger."""

from __future__ import annotations

from .tenant import TENANT

__all__ = ["ledger_agrees", "pool_row"]


async def ledger_agrees(repo, capacity: bool = True):
    """Billing rules §8: counters equal the sums of their ledger rows; nothing negative;
    a pool never holds more than its capacity (``capacity=False`` after a licence was
    removed mid-month, which may leave capacity below what was already granted)."""
    bad = await repo.pool.fetch(
        """
        SELECT 'pool' AS what, p.tenant_id FROM pools p
        LEFT JOIN LATERAL (SELECT coalesce(sum(d_used_seconds), 0) u,
                                  coalesce(sum(d_reserved_seconds), 0) r
                           FROM ledger l WHERE l.account = 'pool' AND l.tenant_id = p.tenant_id
                             AND l.country = p.country AND l.month = p.month) s ON true
        WHERE s.u <> p.used_seconds OR s.r <> p.reserved_seconds
           OR $1 AND p.used_seconds + p.reserved_seconds
                     > gw_pool_capacity(p.tenant_id, p.country)
        UNION ALL
        SELECT 'addon', a.tenant_id FROM addon_usage a
        LEFT JOIN LATERAL (SELECT coalesce(sum(d_used_seconds), 0) u,
                                  coalesce(sum(d_reserved_seconds), 0) r
                           FROM ledger l WHERE l.account = 'addon' AND l.user_id = a.user_id
                             AND l.month = a.month) s ON true
        WHERE s.u <> a.used_seconds OR s.r <> a.reserved_seconds
        UNION ALL
        SELECT 'wallet', w.tenant_id FROM wallets w
        LEFT JOIN LATERAL (SELECT coalesce(sum(d_balance), 0) b, coalesce(sum(d_reserved), 0) r
                           FROM ledger l WHERE l.account = 'wallet'
                             AND l.tenant_id = w.tenant_id) s ON true
        WHERE s.b <> w.balance OR s.r <> w.reserved OR w.balance < 0 OR w.balance < w.reserved
        UNION ALL
        -- reserved counters equal the open calls' funding
        SELECT 'open-reservations', p.tenant_id FROM pools p
        WHERE p.reserved_seconds <> (SELECT coalesce(sum(f.reserved_seconds), 0)
                                     FROM call_funding f JOIN calls c ON c.id = f.call_id
                                     WHERE f.source = 'pool' AND c.tenant_id = p.tenant_id
                                       AND c.pool_country = p.country AND c.month = p.month
                                       AND c.state IN ('authorised', 'answered'))
        UNION ALL
        -- billed minutes per pool equal its used minutes
        SELECT 'billed-vs-used', p.tenant_id FROM pools p
        WHERE p.used_seconds <> (SELECT coalesce(sum(f.charged_seconds), 0)
                                 FROM call_funding f JOIN calls c ON c.id = f.call_id
                                 WHERE f.source = 'pool' AND c.tenant_id = p.tenant_id
                                   AND c.pool_country = p.country AND c.month = p.month)
        """,
        capacity,
    )
    assert [dict(r) for r in bad] == []


async def pool_row(repo, tenant=TENANT, country="CA"):
    """(used, reserved) seconds of a tenant's pool for a country; (0, 0) when none."""
    r = await repo.pool.fetchrow(
        "SELECT used_seconds, reserved_seconds FROM pools WHERE tenant_id=$1 AND country=$2",
        tenant, country)
    return (r["used_seconds"], r["reserved_seconds"]) if r else (0, 0)
