"""Authorise+settle throughput and latency of the rater against a real PostgreSQL.

Runs, in one process against a scratch database:
  baseline  - the same number of round trips as a cycle, as bare `SELECT 1`s;
  spread    - cycles spread over many tenants (distinct pools);
  hot       - every cycle on one tenant's pool.
Prints cycles/s, p50 and p99 latency, and each ratio to the baseline.

    .venv/bin/python bench/rater_bench.py [--cycles 4000] [--concurrency 32]

(``gateway`` is imported as the installed package: ``scripts/setup`` installs it.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import asyncpg
import structlog

from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from gateway.store.pool import open_pool
from gateway.store.repository import Repository

ADMIN_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL",
                           "postgresql://postgres@127.0.0.1:5432/test")


async def run(label: str, cycles: int, concurrency: int, one_cycle) -> dict:
    latencies: list[float] = []
    counter = iter(range(cycles))

    async def worker():
        for i in counter:
            t0 = time.perf_counter()
            await one_cycle(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    result = {
        "label": label,
        "cycles": cycles,
        "per_s": cycles / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }
    return result


async def provision_tenants(admin: Provisioning, tenants: int) -> None:
    """``tenants`` tenants t0..tN-1 (US), each with one Calling Plan user ``tK-u`` and so
    one pool; 1,000,000 domestic minutes per licence."""
    for t in range(tenants):
        tid = f"t{t}"
        await admin.create_tenant(tid, tid, "US")
        await admin.set_subscription(tid, "business_voice_calling_plan", 1)
        await admin.create_user(f"{tid}-u", tid, f"{tid}-u", "US")
        await admin.assign_licence(f"{tid}-u", "business_voice_calling_plan")
    await admin.set_allotment("US", "domestic", 1_000_000)


def rater_cycle(rater: Rater, caller_of):
    """One cycle for ``run``: authorise user ``caller_of(i)`` to a domestic number, then
    settle the call at 61 s."""
    async def one(i):
        d = await rater.authorise_outbound(caller_of(i), "2125550100")
        assert d.allow, d
        await rater.settle(d.call_id, 61)
    return one


async def main(cycles: int, concurrency: int, tenants: int) -> None:
    # measure the rater, not the terminal: drop the per-call info lines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    name = f"gw_bench_{uuid.uuid4().hex[:8]}"
    admin_conn = await asyncpg.connect(ADMIN_URL)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    pool = await open_pool(url, min_size=concurrency, max_size=concurrency)
    try:
        repo = Repository(pool)
        rater = Rater(repo)
        await provision_tenants(Provisioning(repo), tenants)

        async def baseline(i):
            for _ in range(3):  # context query, gw_authorise, gw_settle
                await pool.fetchval("SELECT 1")

        def cycle(caller_of):
            return rater_cycle(rater, caller_of)

        # warm up connections and plans
        await run("warm-up", 200, concurrency, cycle(lambda i: f"t{i % tenants}-u"))
        results = [
            await run("baseline: 3 x SELECT 1", cycles, concurrency, baseline),
            await run(f"spread over {tenants} pools", cycles, concurrency,
                      cycle(lambda i: f"t{i % tenants}-u")),
            await run("one hot pool", cycles, concurrency, cycle(lambda i: "t0-u")),
        ]
        base = results[0]["per_s"]
        print(f"{'run':32} {'cycles/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs baseline':>12}")
        for r in results:
            print(f"{r['label']:32} {r['per_s']:10.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}"
                  f" {r['per_s'] / base:12.2f}")
        print(f"(concurrency {concurrency}, {cycles} cycles per run, PostgreSQL "
              f"{(await pool.fetchval('SHOW server_version'))})")
    finally:
        await pool.close()
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=200)
    a = ap.parse_args()
    asyncio.run(main(a.cycles, a.concurrency, a.tenants))
