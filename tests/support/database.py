"""The test PostgreSQL: where it is, scratch databases, and what the tables hold."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import asyncpg

from .ci import need

__all__ = ["ADMIN_URL", "TABLES", "dump_tables", "scratch_database", "with_database"]

ADMIN_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

TABLES = ("webhook_attempts", "webhook_deliveries", "webhooks", "alerts", "alert_settings",
          "alert_pool_users",
          "international_spend", "pbx_leases", "gateway_instances", "cdr", "ledger", "call_funding", "calls", "addon_usage", "pools", "wallets", "rates",
          "phone_numbers", "licence_assignments", "users", "subscriptions", "tenants")


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` on the same server."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def scratch_database(prefix: str):
    """A new, empty database on the test server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        need(f"PostgreSQL at {ADMIN_URL}: {exc}")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def dump_tables(pool: Any) -> dict[str, list[tuple]]:
    """Everything provisioning and billing write, without timestamps and serial ids."""
    queries = {
        "tenants": "SELECT id, name, country, timezone, currency, blocked_classes"
                   " FROM tenants ORDER BY id",
        "subscriptions": "SELECT * FROM subscriptions ORDER BY tenant_id, sku",
        "users": "SELECT * FROM users ORDER BY id",
        "licences": "SELECT * FROM licence_assignments ORDER BY user_id, sku",
        "numbers": "SELECT * FROM phone_numbers ORDER BY e164",
        "rates": "SELECT tenant_id, currency, kind, prefix, price_per_minute, first_increment,"
                 " increment, description FROM rates"
                 " ORDER BY tenant_id NULLS FIRST, currency, kind, prefix",
        "allotments": "SELECT * FROM allotments ORDER BY country, plan",
        "wallets": "SELECT * FROM wallets ORDER BY tenant_id",
        "ledger": "SELECT tenant_id, entry, account, d_balance, note FROM ledger ORDER BY id",
        "calls": "SELECT id, state FROM calls ORDER BY id",
    }
    return {name: [tuple(r) for r in await pool.fetch(sql)] for name, sql in queries.items()}
