"""Authorise+settle throughput and latency of the rater against a real PostgreSQL.

Runs, in one process against a scratch database, through one pool (the same size and
the same number of concurrent workers for every run):
  round trip     - bare `SELECT 1`s, one round trip each;
  update spread  - a pgbench-style single-row `UPDATE ... RETURNING`, each its own
                   committed transaction, over as many rows as there are tenants;
  update hot     - the same update, always on one row;
  floor spread   - the least any cycle writes, as plain SQL: a call row inserted with its
                   pool row's reservation (one statement, one commit), then the call row
                   settled with its pool row's use (the same); over as many rows as
                   there are tenants. A cycle is two durable commits, so even this stays
                   near half the update rate: it is the ceiling the ratios are read
                   against;
  floor hot      - the same, every pool row the one hot row;
  spread         - authorise+settle cycles spread over many tenants (distinct pools);
  hot            - every cycle on one tenant's pool.
With ``--compare``, the spread and hot cycles run again with every request sent alone
(``Rater(batch_limit=1)``: no coalescing of one pool's requests), in the same run.
Prints each run's rate, p50 and p99 latency, and the ratios the targets name: the
spread cycles against the spread updates, the hot pool's cycles against the hot-row
updates. ``synchronous_commit`` stays as the server has it (on: money is durable).

    .venv/bin/python bench/rater_bench.py [--cycles 4000] [--concurrency 8]

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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def backend_ticks(pids: list[int]) -> int:
    """CPU ticks (user + system) used so far by PostgreSQL's backends ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


async def run(label: str, cycles: int, concurrency: int, one_cycle,
              backends: list[int] | None = None) -> dict:
    """``cycles`` calls of ``one_cycle`` by ``concurrency`` workers: the rate, latency, and
    the CPU per call of this process and of PostgreSQL's ``backends`` (from /proc, so
    comparable across runs while other work shares the machine)."""
    latencies: list[float] = []
    counter = iter(range(cycles))
    ticks0, cpu0 = backend_ticks(backends or []), time.process_time()

    async def worker():
        for i in counter:
            t0 = time.perf_counter()
            await one_cycle(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    pg_cpu = (backend_ticks(backends or []) - ticks0) / CLK_TCK
    own_cpu = time.process_time() - cpu0
    latencies.sort()
    result = {
        "label": label,
        "cycles": cycles,
        "per_s": cycles / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "pg_ms": pg_cpu / cycles * 1000 if backends else None,
        "own_ms": own_cpu / cycles * 1000,
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


async def main(cycles: int, concurrency: int, tenants: int,
               extra_sql: str | None = None, batch_limit: int | None = None,
               compare: bool = False) -> None:
    # measure the rater, not the terminal: drop the per-call info lines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    name = f"gw_bench_{uuid.uuid4().hex[:8]}"
    admin_conn = await asyncpg.connect(ADMIN_URL)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    pool = await open_pool(url, min_size=concurrency, max_size=concurrency)
    try:
        if extra_sql:
            # a candidate change, measured before it becomes a migration
            await pool.execute(extra_sql)
            await pool.expire_connections()
        repo = Repository(pool)
        rater = Rater(repo) if batch_limit is None else Rater(repo, batch_limit=batch_limit)
        alone = Rater(repo, batch_limit=1)
        await provision_tenants(Provisioning(repo), tenants)

        await pool.execute(
            "CREATE TABLE bench_accounts (id integer PRIMARY KEY, balance bigint NOT NULL)")
        await pool.execute("INSERT INTO bench_accounts SELECT g, 0"
                           " FROM generate_series(0, $1 - 1) g", tenants)
        await pool.execute(
            "CREATE TABLE bench_calls (id uuid PRIMARY KEY, account integer NOT NULL,"
            " state text NOT NULL, billed integer)")

        async def round_trip(i):
            await pool.fetchval("SELECT 1")

        def update(row_of):
            # pgbench's account update: one statement, one commit
            async def one(i):
                await pool.fetchval("UPDATE bench_accounts SET balance = balance + 1"
                                    " WHERE id = $1 RETURNING balance", row_of(i))
            return one

        def floor(row_of):
            # the rows a cycle cannot do without, one statement per commit
            async def one(i):
                call, row = uuid.uuid4(), row_of(i)
                await pool.fetchval(
                    "WITH c AS (INSERT INTO bench_calls (id, account, state)"
                    " VALUES ($1, $2, 'authorised'))"
                    " UPDATE bench_accounts SET balance = balance + 300 WHERE id = $2"
                    " RETURNING balance", call, row)
                await pool.fetchval(
                    "WITH c AS (UPDATE bench_calls SET state = 'settled', billed = 61"
                    " WHERE id = $1)"
                    " UPDATE bench_accounts SET balance = balance - 239 WHERE id = $2"
                    " RETURNING balance", call, row)
            return one

        def cycle(caller_of, rater=rater):
            return rater_cycle(rater, caller_of)

        # warm up connections and plans
        await run("warm-up", 200, concurrency, cycle(lambda i: f"t{i % tenants}-u"))
        await run("warm-up", 200, concurrency, update(lambda i: i % tenants))
        await run("warm-up", 200, concurrency, floor(lambda i: i % tenants))
        if compare:
            await run("warm-up", 200, concurrency, cycle(lambda i: f"t{i % tenants}-u", alone))
        pids = [r["pid"] for r in await admin_conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", name)]
        results = {
            "rt": await run("round trip: SELECT 1", cycles, concurrency, round_trip, pids),
            "upd_spread": await run(f"UPDATE..RETURNING, {tenants} rows", cycles,
                                    concurrency, update(lambda i: i % tenants), pids),
            "upd_hot": await run("UPDATE..RETURNING, one hot row", cycles, concurrency,
                                 update(lambda i: 0), pids),
            "floor_spread": await run(f"floor: 2 statements, {tenants} rows", cycles,
                                      concurrency, floor(lambda i: i % tenants), pids),
            "floor_hot": await run("floor: 2 statements, one hot row", cycles,
                                   concurrency, floor(lambda i: 0), pids),
            "spread": await run(f"cycles spread over {tenants} pools", cycles, concurrency,
                                cycle(lambda i: f"t{i % tenants}-u"), pids),
        }
        before = rater.coalesced
        results["hot"] = await run("cycles on one hot pool", cycles, concurrency,
                                   cycle(lambda i: "t0-u"), pids)
        after = rater.coalesced
        if compare:
            results["spread_alone"] = await run(
                "  spread, each alone", cycles, concurrency,
                cycle(lambda i: f"t{i % tenants}-u", alone), pids)
            results["hot_alone"] = await run(
                "  hot pool, each alone", cycles, concurrency,
                cycle(lambda i: "t0-u", alone), pids)
        print(f"{'run':36} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}"
              f" {'pg CPU ms':>10} {'own CPU ms':>10}  (CPU per call)")
        for r in results.values():
            print(f"{r['label']:36} {r['per_s']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}"
                  f" {r['pg_ms']:10.3f} {r['own_ms']:10.3f}")
        for name, cyc, upd, target in (("spread", "spread", "upd_spread", 0.35),
                                       ("hot", "hot", "upd_hot", 0.45)):
            ratio = results[cyc]["per_s"] / results[upd]["per_s"]
            print(f"{name:6} cycles / updates: {ratio:5.2f}  (target >= {target:.2f}:"
                  f" {'met' if ratio >= target else 'not met'}; p99 "
                  f"{results[cyc]['p99_ms']:.1f} ms, target < 10 ms)")
        for name, upd in (("spread", "upd_spread"), ("hot", "upd_hot")):
            print(f"{name:6} floor / updates:  "
                  f"{results['floor_' + name]['per_s'] / results[upd]['per_s']:5.2f}"
                  f"  (the most a cycle of two commits reached here);"
                  f" cycles / floor: {results[name]['per_s'] / results['floor_' + name]['per_s']:5.2f}")
        batches = after["batches"] - before["batches"]
        if batches:
            print(f"hot pool: {(after['requests'] - before['requests']) / batches:.2f}"
                  f" authorisations and settlements per statement on average"
                  f" (batch limit {rater.batch_limit})")
        if compare:
            for name, cyc, upd in (("spread", "spread_alone", "upd_spread"),
                                   ("hot", "hot_alone", "upd_hot")):
                print(f"{name:6} each alone / updates: "
                      f"{results[cyc]['per_s'] / results[upd]['per_s']:5.2f}")
        print(f"cycles / round trips: spread {results['spread']['per_s'] / results['rt']['per_s']:.3f},"
              f" hot {results['hot']['per_s'] / results['rt']['per_s']:.3f}")
        print(f"(concurrency {concurrency}, pool of {concurrency}, {cycles} per run,"
              f" PostgreSQL {await pool.fetchval('SHOW server_version')},"
              f" synchronous_commit {await pool.fetchval('SHOW synchronous_commit')},"
              f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    finally:
        await pool.close()
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tenants", type=int, default=200)
    ap.add_argument("--extra-sql", metavar="FILE",
                    help="SQL run after the migrations (a candidate change to measure)")
    ap.add_argument("--batch-limit", type=int,
                    help="most requests of one pool per statement (1: each alone)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the cycles with each request alone (no coalescing)")
    a = ap.parse_args()
    extra = open(a.extra_sql, encoding="utf-8").read() if a.extra_sql else None
    asyncio.run(main(a.cycles, a.concurrency, a.tenants, extra, a.batch_limit, a.compare))
