"""Shared fixtures. Tests that need PostgreSQL get a fresh database of their own for
the session; in CI (CI=true) a missing database is a failure, never a skip.

The helpers these fixtures use live in ``tests/support/``; the real-PBX fixtures
(``pbx_root``, ``make_pbx``) come from the plugin ``tests.support.pbx.fixtures``."""

from __future__ import annotations

import datetime as dt

import pytest
import pytest_asyncio

from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from gateway.billing.views import Views
from gateway.store.pool import open_pool
from gateway.store.repository import Repository
from tests.support.clock import Clock
from tests.support.database import TABLES, scratch_database

pytest_plugins = ["tests.support.pbx.fixtures"]


@pytest_asyncio.fixture(scope="session")
async def database_url():
    async with scratch_database("gw_test") as url:
        yield url


@pytest_asyncio.fixture(scope="session")
async def db_pool(database_url):
    pool = await open_pool(database_url, min_size=2, max_size=20)
    yield pool
    await pool.close()


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


@pytest.fixture
def views(repo, clock):
    return Views(repo, clock=clock)
