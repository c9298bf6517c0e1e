"""A real, started gateway (no AMI) on free ports, for HTTP, CLI and AGI tests."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from gateway.app import Gateway
from gateway.config import Config

__all__ = ["ADMIN", "NOW", "READ", "running_gateway"]

ADMIN = "adm-token-7f3a"
READ = "read-token-91bc"
NOW = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)  # the conftest clock's time


@contextlib.asynccontextmanager
async def running_gateway(database_url: str, **config: Any) -> AsyncIterator[Gateway]:
    """A real gateway on free ports, without AMI, its clock at NOW; without its webhook
    delivery worker unless ``webhook_enabled=True`` (tests/test_webhooks.py runs it)."""
    values = dict(database_url=database_url, agi_port=0, http_port=0, ami_host="",
                  admin_token=ADMIN, read_token=READ, reconcile_interval_seconds=3600,
                  db_pool_size=4, webhook_enabled=False)
    values.update(config)
    gw = Gateway(Config(**values), clock=lambda: NOW, configure_logs=False)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()
