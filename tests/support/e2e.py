"""Helpers for end-to-end tests through the real PBX with the real gateway: a gateway
configuration pointed at a ``Pbx`` and gateways started on it, waiting for calls to be settled, a callee, and
per-second rates (so that short slices are really short)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from gateway.app import Gateway
from gateway.config import Config

from .pbx import CallResult, Pbx, cdr_pgsql

DOMESTIC = "2125550100"  # New York, domestic for a Canadian user


def explain(*results: CallResult) -> str:
    return "\n".join(r.summary() for r in results)


@contextlib.contextmanager
def running_pbx(root: Any, agi_port: int, database_url: str, **options: Any) -> Iterator[Pbx]:
    """A PBX whose FastAGI calls go to a gateway on ``agi_port`` and whose CDRs go to
    ``database_url`` (its migrations must have run: Asterisk 22.10 aborts with a double
    free when cdr_pgsql's table is missing); ``Pbx`` keywords in ``options``. Stopped
    on the way out."""
    pbx = Pbx(root=root, gw_agi=f"127.0.0.1:{agi_port}", **options, **cdr_pgsql(database_url))
    pbx.start()
    yield pbx
    pbx.stop()


def gateway_config(pbx: Pbx, database_url: str, agi_port: int, **overrides: Any) -> Config:
    """The gateway of ``pbx`` (its AMI account), on ``agi_port``; quiet logs."""
    values = dict(database_url=database_url, agi_port=agi_port, http_port=0,
                  ami_host=pbx.ami_host, ami_port=pbx.ami_port, ami_username=pbx.ami_user,
                  ami_secret=pbx.ami_secret, reconcile_interval_seconds=3600,
                  log_format="console", log_level="warning")
    values.update(overrides)
    return Config(**values)


@contextlib.asynccontextmanager
async def gateways(pbx: Pbx, database_url: str, agi_port: int, **defaults: Any,
                   ) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """A function that starts an in-process gateway of ``pbx`` (``gateway_config``
    with ``defaults``, then its own overrides); every gateway it started is stopped
    on the way out."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        gw = Gateway(gateway_config(pbx, database_url, agi_port, **{**defaults, **overrides}),
                     configure_logs=False)
        await gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.stop()


async def settled(repo: Any, *, wait: float = 10.0, count: int = 1) -> list[Any]:
    """Wait until ``count`` calls are settled or released; return all calls."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        rows = await repo.pool.fetch("SELECT * FROM calls ORDER BY authorised_at")
        done = [r for r in rows if r["state"] in ("settled", "released")]
        if len(done) >= count or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def callee(pbx: Pbx, endpoint: str = "carrier", **kw: Any) -> Any:
    """A SIPp callee on ``endpoint``, started (``pbx.uas`` keywords)."""
    return await pbx.uas(endpoint, **kw).started()


async def per_second_overage(admin: Any) -> None:
    """Per-second increments, so that short slices are really short."""
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.02", "first_increment": 1,
                            "increment": 1}])
