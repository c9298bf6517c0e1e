"""Where one authorise+settle cycle spends its time, on one connection.

Against a scratch database (20 tenants, as the rater bench provisions them): the client
time of each step over ``--cycles`` cycles, the server functions' own and total times
(``track_functions = all``, read from ``pg_stat_user_functions``), and with ``--explain``
every statement the functions ran during one more cycle (``auto_explain`` with nested
statements, loaded into the session: no server restart needed).

    .venv/bin/python -m bench.rater_profile [--cycles 2000] [--explain]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import asyncpg
import structlog

from bench.rater_bench import ADMIN_URL, provision_tenants
from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from gateway.store.pool import open_pool
from gateway.store.repository import Repository

TENANTS = 20


async def main(cycles: int, explain: bool) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    name = f"gw_profile_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    pool = await open_pool(url, min_size=1, max_size=1)
    other = await asyncpg.connect(url)
    try:
        rater = Rater(Repository(pool))
        await provision_tenants(Provisioning(rater.repo), TENANTS)
        for i in range(200):  # warm plans and the rater's known callers
            d = await rater.authorise_outbound(f"t{i % TENANTS}-u", "2125550100")
            await rater.settle(d.call_id, 61)
        await pool.execute("SET track_functions = 'all'")
        await other.execute("SELECT pg_stat_reset()")
        authorise = settle = 0.0
        for i in range(cycles):
            t0 = time.perf_counter()
            d = await rater.authorise_outbound(f"t{i % TENANTS}-u", "2125550100")
            t1 = time.perf_counter()
            await rater.settle(d.call_id, 61)
            authorise += t1 - t0
            settle += time.perf_counter() - t1
        # a backend sends its function statistics at a transaction's end at most once a
        # second: the statement after this pause sends the last of them
        await asyncio.sleep(1.1)
        await pool.execute("SET track_functions = 'none'")
        print(f"one connection, {cycles} cycles, client ms per step: authorise"
              f" {authorise / cycles * 1000:.3f}, settle {settle / cycles * 1000:.3f},"
              f" cycle {(authorise + settle) / cycles * 1000:.3f}")
        print(f"  {'function':24} {'calls':>7} {'total us':>9} {'self us':>9}  (per call)")
        for r in await other.fetch(
                "SELECT funcname, calls, total_time / calls * 1000 AS total_us,"
                " self_time / calls * 1000 AS self_us FROM pg_stat_user_functions"
                " WHERE calls > 0 ORDER BY total_time DESC"):
            print(f"  {r['funcname']:24} {r['calls']:7} {r['total_us']:9.1f}"
                  f" {r['self_us']:9.1f}")
        if explain:
            lines: list[str] = []
            async with pool.acquire() as conn:
                await conn.execute("LOAD 'auto_explain'")
                await conn.execute(
                    "SET auto_explain.log_min_duration = 0;"
                    " SET auto_explain.log_nested_statements = on;"
                    " SET auto_explain.log_analyze = on; SET client_min_messages = log")

                def keep(_conn, message):
                    lines.append(message.message)
                conn.add_log_listener(keep)
                try:
                    one = Rater(Repository(_Single(conn)))
                    d = await one.authorise_outbound("t3-u", "2125550100")
                    await one.settle(d.call_id, 61)
                    await asyncio.sleep(0.2)
                finally:
                    conn.remove_log_listener(keep)
                    await conn.execute("SET client_min_messages = notice;"
                                       " SET auto_explain.log_min_duration = -1")
            print("statements of one cycle (auto_explain, timing adds its own overhead):")
            for text in lines:
                head = text.splitlines()
                duration = head[0].split("  ")[0] if head else ""
                query = next((h.split(":", 1)[1].strip() for h in head
                              if h.startswith("Query Text:")), "")
                print(f"  {duration:22} {query[:90]}")
    finally:
        await other.close()
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class _Single:
    """One connection standing in for the pool, so that the session's settings apply."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn

    async def fetchrow(self, *args):
        return await self.conn.fetchrow(*args)

    async def fetchval(self, *args):
        return await self.conn.fetchval(*args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--explain", action="store_true")
    a = ap.parse_args()
    asyncio.run(main(a.cycles, a.explain))
