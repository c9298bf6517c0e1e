"""SQL of alerts and webhooks (migration 011). The alerts themselves are written by the
database's triggers, in the transaction of the movement that caused them; this module
reads them, lets an operator acknowledge and clear them, keeps the webhook
subscriptions, and claims and records webhook deliveries for the delivery worker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from ..errors import NotFound
from .repository import PoolStore, translate_errors

#: the settings columns an operator may change (alert_settings)
SETTINGS = ("pool_percents", "addon_percents", "wallet_below", "auto_recharge",
            "recharge_cap", "no_balance_count", "no_balance_minutes",
            "international_hourly_limit", "international_block")
#: the webhook columns an operator may change
WEBHOOK_FIELDS = ("url", "events", "secret", "enabled", "description")


class AlertStore(PoolStore):
    # ---- alerts ----------------------------------------------------------------------

    async def alerts(self, tenant_id: str | None, states: Sequence[str] | None,
                     limit: int) -> list[asyncpg.Record]:
        """Alerts, newest first, of one tenant (None: every tenant), in ``states``
        (None: any)."""
        return await self._fetch(
            "SELECT * FROM alerts WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::text[] IS NULL OR state = ANY ($2)) ORDER BY id DESC LIMIT $3",
            tenant_id, None if states is None else list(states), limit)

    async def find_alert(self, alert_id: int) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM alerts WHERE id = $1", alert_id)

    async def acknowledge(self, alert_id: int, by: str, note: str) -> asyncpg.Record:
        """An active alert becomes acknowledged; an acknowledged or cleared one is
        left as it is. Returns the alert."""
        r = await self._fetchrow(
            "WITH a AS (UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(),"
            " acknowledged_by = $2, note = CASE WHEN $3 = '' THEN note ELSE $3 END"
            " WHERE id = $1 AND state = 'active' RETURNING *)"
            " SELECT * FROM a UNION ALL SELECT * FROM alerts WHERE id = $1"
            " AND NOT EXISTS (SELECT 1 FROM a)", alert_id, by, note)
        if r is None:
            raise NotFound(f"no such alert: {alert_id}", code="UNKNOWN_ALERT")
        return r

    async def clear(self, alert_id: int, by: str, note: str) -> asyncpg.Record:
        """The alert is cleared (resolved). One that blocked the tenant's international
        calls lifts the block, unless another uncleared alert of the tenant holds it
        too. Clearing a cleared alert changes nothing. Returns the alert."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                r = await conn.fetchrow(
                    "UPDATE alerts SET state = 'cleared', cleared_at = now(), cleared_by = $2,"
                    " note = CASE WHEN $3 = '' THEN note ELSE $3 END"
                    " WHERE id = $1 AND state <> 'cleared' RETURNING *", alert_id, by, note)
                if r is None:
                    r = await conn.fetchrow("SELECT * FROM alerts WHERE id = $1", alert_id)
                    if r is None:
                        raise NotFound(f"no such alert: {alert_id}", code="UNKNOWN_ALERT")
                    return r
                if r["blocked"]:
                    await conn.execute(
                        "UPDATE tenants SET blocked_classes ="
                        " array_remove(blocked_classes, 'international')"
                        " WHERE id = $1 AND 'international' = ANY (blocked_classes)"
                        " AND NOT EXISTS (SELECT 1 FROM alerts WHERE tenant_id = $1"
                        "  AND blocked AND state <> 'cleared')", r["tenant_id"])
                return r

    # ---- settings --------------------------------------------------------------------

    async def settings(self, tenant_id: str) -> asyncpg.Record:
        r = await self._fetchrow("SELECT * FROM alert_settings WHERE tenant_id = $1",
                                 tenant_id)
        if r is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")
        return r

    async def set_settings(self, tenant_id: str, fields: dict[str, Any]) -> None:
        cols = [c for c in SETTINGS if c in fields]  # names from SETTINGS only
        if not cols:
            return
        sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
        r = await self._fetchrow(
            f"UPDATE alert_settings SET {sets} WHERE tenant_id = $1 RETURNING tenant_id",
            tenant_id, *(fields[c] for c in cols))
        if r is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")

    # ---- webhook subscriptions ---------------------------------------------------------

    async def create_webhook(self, tenant_id: str | None, url: str, events: list[str],
                             secret: str, enabled: bool, description: str) -> asyncpg.Record:
        r = await self._fetchrow(
            "INSERT INTO webhooks (tenant_id, url, events, secret, enabled, description)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            tenant_id, url, events, secret, enabled, description)
        assert r is not None
        return r

    async def webhooks(self, tenant_id: str | None) -> list[asyncpg.Record]:
        """Every subscription (None), or those that get a tenant's events: its own and
        the global ones."""
        return await self._fetch(
            "SELECT * FROM webhooks WHERE $1::text IS NULL OR tenant_id = $1"
            " OR tenant_id IS NULL ORDER BY id", tenant_id)

    async def find_webhook(self, webhook_id: int) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM webhooks WHERE id = $1", webhook_id)

    async def update_webhook(self, webhook_id: int, fields: dict[str, Any]) -> None:
        cols = [c for c in WEBHOOK_FIELDS if c in fields]  # names from WEBHOOK_FIELDS only
        if not cols:
            return
        sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
        r = await self._fetchrow(f"UPDATE webhooks SET {sets} WHERE id = $1 RETURNING id",
                                 webhook_id, *(fields[c] for c in cols))
        if r is None:
            raise NotFound(f"no such webhook: {webhook_id}", code="UNKNOWN_WEBHOOK")

    async def delete_webhook(self, webhook_id: int) -> None:
        """The subscription goes, and its deliveries and their log with it."""
        r = await self._fetchrow("DELETE FROM webhooks WHERE id = $1 RETURNING id",
                                 webhook_id)
        if r is None:
            raise NotFound(f"no such webhook: {webhook_id}", code="UNKNOWN_WEBHOOK")

    # ---- deliveries ------------------------------------------------------------------

    async def deliveries(self, *, webhook_id: int | None, tenant_id: str | None,
                         states: Sequence[str] | None, limit: int) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT d.*, w.url FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
            " WHERE ($1::bigint IS NULL OR d.webhook_id = $1)"
            " AND ($2::text IS NULL OR d.tenant_id = $2)"
            " AND ($3::text[] IS NULL OR d.state = ANY ($3))"
            " ORDER BY d.created_at DESC, d.id LIMIT $4",
            webhook_id, tenant_id, None if states is None else list(states), limit)

    async def find_delivery(self, delivery_id: uuid.UUID) -> asyncpg.Record | None:
        return await self._fetchrow(
            "SELECT d.*, w.url FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
            " WHERE d.id = $1", delivery_id)

    async def attempts(self, delivery_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id", delivery_id)

    async def retry_delivery(self, delivery_id: uuid.UUID) -> None:
        """A dead delivery is pending again, due now, with its attempts counted afresh
        (its log keeps the old ones). A pending or delivered one is left as it is."""
        r = await self._fetchrow(
            "UPDATE webhook_deliveries SET state = CASE WHEN state = 'dead' THEN 'pending'"
            " ELSE state END, attempts = CASE WHEN state = 'dead' THEN 0 ELSE attempts END,"
            " next_attempt_at = CASE WHEN state = 'dead' THEN now() ELSE next_attempt_at END"
            " WHERE id = $1 RETURNING id", delivery_id)
        if r is None:
            raise NotFound(f"no such delivery: {delivery_id}", code="UNKNOWN_DELIVERY")

    async def claim_deliveries(self, limit: int, lease_seconds: float, by: str
                               ) -> list[asyncpg.Record]:
        """Claim up to ``limit`` due deliveries for one attempt each: each is leased to
        this caller for ``lease_seconds`` (no other process claims it before; one that
        is never recorded is due again after), its attempt counted, and a new claim
        token given. Rows another process is claiming are skipped, not waited for."""
        return await self._fetch(
            "WITH due AS (SELECT id FROM webhook_deliveries"
            "  WHERE state = 'pending' AND next_attempt_at <= now()"
            "  ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " UPDATE webhook_deliveries d SET attempts = d.attempts + 1,"
            "  next_attempt_at = now() + $2 * interval '1 second',"
            "  claim = gen_random_uuid(), claimed_by = $3"
            " FROM due, webhooks w WHERE d.id = due.id AND w.id = d.webhook_id"
            " RETURNING d.id, d.claim, d.attempts, d.event, d.body, w.url, w.secret",
            limit, lease_seconds, by)

    async def record_attempt(self, delivery_id: uuid.UUID, claim: uuid.UUID, *,
                             attempt: int, by: str, status: int | None, error: str | None,
                             duration_ms: int, outcome: str, retry_in: float) -> bool:
        """Log one attempt, and, while ``claim`` is still the delivery's, set its state:
        ``outcome`` 'delivered', 'dead', or 'retry' (due again in ``retry_in`` seconds).
        False when the claim was lost (the lease ran out and another attempt began):
        the log row is written, the state left to that attempt."""
        r = await self._fetchrow(
            "WITH log AS (INSERT INTO webhook_attempts (delivery_id, attempt, by, status,"
            "  error, duration_ms) VALUES ($1, $3, $4, $5, $6, $7))"
            " UPDATE webhook_deliveries SET claim = NULL, last_status = $5, last_error = $6,"
            "  state = CASE $8 WHEN 'delivered' THEN 'delivered' WHEN 'dead' THEN 'dead'"
            "   ELSE 'pending' END,"
            "  delivered_at = CASE WHEN $8 = 'delivered' THEN now() END,"
            "  next_attempt_at = CASE WHEN $8 = 'retry'"
            "   THEN now() + $9 * interval '1 second' ELSE next_attempt_at END"
            " WHERE id = $1 AND claim = $2 RETURNING id",
            delivery_id, claim, attempt, by, status, error, duration_ms, outcome, retry_in)
        return r is not None
