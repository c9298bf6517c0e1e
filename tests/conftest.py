"""Shared fixtures. Tests that need PostgreSQL get a fresh database of their own for
the session; in CI (CI=true) a missing database is a failure, never a skip."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid

import asyncpg
import pytest
import pytest_asyncio

from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from gateway.store.pool import open_pool
from gateway.store.repository import Repository

ADMIN_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"

TABLES = ("gateway_instances", "cdr", "ledger", "call_funding", "calls", "addon_usage", "pools", "wallets", "rates",
          "phone_numbers", "licence_assignments", "users", "subscriptions", "tenants")


def need(reason: str) -> None:
    """Fail in CI, skip elsewhere: a test that needs a real part never passes without it."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)  # outside CI only: under CI=true the line above failed


def with_database(url: str, name: str) -> str:
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


@pytest_asyncio.fixture(scope="session")
async def database_url():
    async with scratch_database("gw_test") as url:
        yield url


@pytest_asyncio.fixture(scope="session")
async def db_pool(database_url):
    pool = await open_pool(database_url, min_size=2, max_size=20)
    yield pool
    await pool.close()


class Clock:
    """A clock tests can set and move."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += dt.timedelta(**kw)


@pytest.fixture
def clock():
    return Clock(dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC))


@pytest_asyncio.fixture
async def repo(db_pool):
    await db_pool.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    await db_pool.execute(
        "DELETE FROM allotments; INSERT INTO allotments (country, plan, minutes) VALUES"
        " ('CA','domestic',3000), ('GB','domestic',1200), ('US','domestic',3000),"
        " ('CA','international',600), ('GB','international',600), ('US','international',600)"
    )
    return Repository(db_pool)


@pytest.fixture
def rater(repo, clock):
    return Rater(repo, clock=clock)


@pytest.fixture
def admin(repo, clock):
    return Provisioning(repo, clock=clock)
