"""The fleet on one machine (issue 9): does the gateway layer scale with the number of
PBXs and gateway processes, and where does the shared database become the limit?

Two runs, each with its own baseline measured in the same run by the same code:

``calls``  Two real Asterisks (``pbx1``, ``pbx2``) and two gateway processes
           (``python -m gateway serve``, ``gw-a`` configured with ``pbx1`` alone and
           ``gw-b`` with ``pbx2`` alone, so each owns one PBX through its lease), one
           PostgreSQL database. A ramp of total call rates; at each rate:
             single  every call on pbx1 through gw-a (pbx2 and gw-b idle);
             fleet   half the calls on each PBX at once, each through its own gateway.
           A step fails as in ``bench.e2e_bench`` (a call did not complete, median
           post-dial delay above ``--max-median-ms``, SIPp placed under 90 % of the
           rate) or when a call is still open in the database after the step. Prints the
           highest total rate at which every call completed in each mode and the ratio.

``rater``  Authorise+settle cycles (``bench.rater_bench``'s cycle) run by 1, 2 and 4
           processes at once, each with its own connection pool of ``--concurrency``
           connections and as many workers, for ``--seconds`` each, spread over many
           tenants' pools and on one hot pool. Prints the total cycles/s, latency, the
           ratio to the 1-process run, and what PostgreSQL did meanwhile: the CPU of its
           backends, commits/s, and the backends running a statement by wait event
           (``Lock:transactionid``/``Lock:tuple`` = waiting for a row lock, the hot
           pool's row; ``IO:WALSync``/``LWLock:WALWrite`` = waiting for the commit's
           WAL flush; ``CPU`` = working).

Run from the repository root (the PBX test tools import as a package):

    .venv/bin/python -m bench.fleet_bench calls [--ramp 40,80,...] [--step-seconds 8]
    .venv/bin/python -m bench.fleet_bench rater [--processes 1,2,4] [--seconds 10]

Needs PostgreSQL (``$GATEWAY_TEST_DATABASE_URL``, default the test suite's) and, for
``calls``, the PBX root folder (``.ci/pbx-root.sh``; ``$PBX_ROOT``). Every database is
a scratch one, dropped at the end; every process is bounded in time and killed on exit.
Loopback only. No timing is asserted: the figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from bench.e2e_bench import (
    ADMIN_URL,
    LOGGER_CONF,
    NUMBER,
    CpuMeter,
    SippLoad,
    Step,
    _postgres_backends,
    _ticks,
    add_ramp_args,
    fmt_ms,
    log,
    pct,
    pg_waits,
    provision,
    read_sipp,
    run_ramp,
    step_failure,
    taskprocessors,
)
from bench.rater_bench import provision_tenants, rater_cycle
from gateway.billing.provisioning import Provisioning
from gateway.billing.rater import Rater
from gateway.store.pool import open_pool
from gateway.store.repository import Repository

PBXES = ("pbx1", "pbx2")
OWNER = {"pbx1": "gw-a", "pbx2": "gw-b"}
PHONE = "alice"  # standard_tenant's Calling Plan user, on both PBXs
MODES = ("single", "fleet")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _machine_cores() -> int:
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------
# what PostgreSQL does during a run
# ----------------------------------------------------------------------------------


class PgMeter:
    """While running: every 50 ms the backends of ``dbname`` running a statement, by wait
    event; at the end their CPU (share of one core, from /proc) and commits/s
    (``pg_stat_database``)."""

    def __init__(self, conn: asyncpg.Connection, dbname: str) -> None:
        self.conn = conn
        self.dbname = dbname
        self.waits: dict[str, int] = {}
        self.samples = 0
        self._task: asyncio.Task[None] | None = None
        self._ticks0: dict[int, int] = {}
        self._ticks1: dict[int, int] = {}

    def _backend_ticks(self) -> dict[int, int]:
        mine = self.conn.get_server_pid()
        out = {}
        for pid in _postgres_backends(self.dbname):
            t = _ticks(pid)
            if t is not None and pid != mine:
                out[pid] = t
        return out

    async def _commits(self) -> int:
        return await self.conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.dbname)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                for w, n in (await pg_waits(self.conn, self.dbname)).items():
                    self.waits[w] = self.waits.get(w, 0) + n
                self.samples += 1
            self._see(await asyncio.to_thread(self._backend_ticks))
            await asyncio.sleep(0.05)

    def _see(self, ticks: dict[int, int]) -> None:
        # a backend that starts during the run counts from its first sighting, one that
        # ends up to its last
        for pid, t in ticks.items():
            self._ticks0.setdefault(pid, t)
            self._ticks1[pid] = t

    async def start(self) -> PgMeter:
        self._see(await asyncio.to_thread(self._backend_ticks))
        self._commits0 = await self._commits()
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        elapsed = max(time.monotonic() - self._t0, 1e-3)
        self._see(await asyncio.to_thread(self._backend_ticks))
        cpu = sum(t - self._ticks0[pid] for pid, t in self._ticks1.items()) / CLK_TCK
        await asyncio.sleep(1.1)  # backends flush pg_stat_database at most once a second
        commits = await self._commits() - self._commits0
        n = max(self.samples, 1)
        return {"cpu": cpu / elapsed, "commits_per_s": commits / elapsed,
                "waits": {k: v / n for k, v in sorted(self.waits.items(),
                                                       key=lambda kv: -kv[1])}}


def describe_pg(pg: dict[str, Any]) -> str:
    waits = ", ".join(f"{k} {v:.2f}" for k, v in pg["waits"].items() if v >= 0.005) or "none"
    return (f"PostgreSQL backends {pg['cpu'] * 100:.0f}% of a core, {pg['commits_per_s']:.0f}"
            f" commits/s; backends running a statement (avg): {waits}")


def lock_waits(pg: dict[str, Any]) -> float:
    return sum(v for k, v in pg["waits"].items() if k.startswith("Lock:"))


# ----------------------------------------------------------------------------------
# rater: N processes on one database
# ----------------------------------------------------------------------------------


async def rater_worker(a: argparse.Namespace) -> None:
    """One process: warm up, wait for the common start, run cycles for ``a.seconds``,
    print one JSON line (cycles, latencies in ms, CPU seconds, start and end)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    pool = await open_pool(a.url, min_size=a.concurrency, max_size=a.concurrency)
    try:
        rater = Rater(Repository(pool))
        if a.hot:
            one = rater_cycle(rater, lambda i: "t0-u")
        else:
            offset = a.index * 7919  # each process its own order over the tenants
            one = rater_cycle(rater, lambda i: f"t{(i + offset) % a.tenants}-u")
        for i in range(a.concurrency * 4):
            await one(i)  # connections, plans, caches
        await asyncio.sleep(max(0.0, a.start_at - time.time()))
        latencies: list[float] = []
        counter = iter(range(10**9))
        started = time.time()
        stop_at = time.monotonic() + a.seconds
        cpu0 = time.process_time()

        async def worker() -> None:
            for i in counter:
                if time.monotonic() >= stop_at:
                    return
                t0 = time.perf_counter()
                await one(i)
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        print(json.dumps({"cycles": len(latencies), "started": started, "ended": time.time(),
                          "late_s": started - a.start_at, "cpu_s": time.process_time() - cpu0,
                          "latencies": [round(x, 3) for x in latencies]}), flush=True)
    finally:
        await pool.close()


async def rater_run(url: str, dbname: str, conn: asyncpg.Connection, *, processes: int,
                    hot: bool, a: argparse.Namespace) -> dict[str, Any]:
    """``processes`` worker processes at once; their sum, and PostgreSQL meanwhile."""
    start_at = time.time() + a.start_delay
    procs = []
    for index in range(processes):
        cmd = [sys.executable, "-m", "bench.fleet_bench", "rater-worker", "--url", url,
               "--index", str(index), "--tenants", str(a.tenants), "--concurrency",
               str(a.concurrency), "--seconds", str(a.seconds), "--start-at", str(start_at)]
        if hot:
            cmd.append("--hot")
        procs.append(await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True))
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        pg = await PgMeter(conn, dbname).start()
        cpu = CpuMeter(dbname, None, self_label="bench driver (python)")
        cpu.exclude = {conn.get_server_pid()}
        cpu.start()
        outs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), a.seconds + a.start_delay + 60)
        cpu_shares = await cpu.stop()
        pgr = await pg.stop()
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"rater worker exited {p.returncode}:\n{err.decode()[-2000:]}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    lat = [x for r in results for x in r["latencies"]]
    window = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {
        "processes": processes, "hot": hot, "cycles": len(lat),
        "per_s": len(lat) / window if window > 0 else 0.0,
        "per_process": [r["cycles"] / (r["ended"] - r["started"]) for r in results],
        "late_s": max(r["late_s"] for r in results),
        "p50": statistics.median(lat) if lat else float("nan"),
        "p99": pct(lat, 99) if lat else float("nan"),
        "pg": pgr,
        "machine": cpu_shares.get("machine busy (all cores)", 0.0),
        # the processes' own CPU time (they exit before the meter's last sample)
        "workers_cpu": sum(r["cpu_s"] for r in results) / window if window > 0 else 0.0,
    }


async def rater_main(a: argparse.Namespace) -> int:
    dbname = f"gw_fleet_bench_{uuid.uuid4().hex[:8]}"
    url = ADMIN_URL.rpartition("/")[0] + "/" + dbname
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    conn = None
    try:
        pool = await open_pool(url, min_size=1, max_size=2)  # runs the migrations
        try:
            await provision_tenants(Provisioning(Repository(pool)), a.tenants)
        finally:
            await pool.close()
        conn = await asyncpg.connect(url, timeout=10)
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        log(f"rater: {a.processes} processes x {a.concurrency} connections, {a.seconds:g} s "
            f"a run, {a.tenants} tenants; PostgreSQL {version.split()[0]}, "
            f"synchronous_commit={sync}; {_machine_cores()} cores")
        table: list[dict[str, Any]] = []
        for hot in (False, True):
            for n in a.processes:
                r = await rater_run(url, dbname, conn, processes=n, hot=hot, a=a)
                table.append(r)
                where = "one hot pool" if hot else f"spread over {a.tenants} pools"
                print(f"  {where}, {n} process(es): {r['per_s']:.0f} cycles/s "
                      f"(per process {', '.join(f'{x:.0f}' for x in r['per_process'])}); "
                      f"p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms; machine "
                      f"{r['machine'] * 100:.0f}% busy, rater processes "
                      f"{r['workers_cpu'] * 100:.0f}% of a core"
                      + (f"; a process started {r['late_s']:.2f} s late" if r["late_s"] > 0.2
                         else ""), flush=True)
                print(f"    {describe_pg(r['pg'])}", flush=True)
        print()
        print(f"Rater cycles/s (authorise + settle), {a.concurrency} connections per process, "
              f"{a.seconds:g} s per run, {_machine_cores()} cores shared by everything:")
        print(f"  {'run':26s}{'procs':>6s}{'cycles/s':>10s}{'vs 1':>7s}{'p50 ms':>8s}"
              f"{'p99 ms':>8s}{'machine':>9s}{'pg CPU':>8s}{'commit/s':>9s}{'lock wait':>10s}"
              f"{'WAL wait':>9s}{'pg ms/c':>8s}{'gw ms/c':>8s}")
        for hot in (False, True):
            rows = [r for r in table if r["hot"] == hot]
            base = rows[0]["per_s"] or float("nan")
            for r in rows:
                w = r["pg"]["waits"]
                wal = sum(v for k, v in w.items() if "WAL" in k)
                label = "one hot pool" if hot else f"spread over {a.tenants} pools"
                print(f"  {label:26s}{r['processes']:>6d}{r['per_s']:>10.0f}"
                      f"{r['per_s'] / base:>7.2f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
                      f"{r['machine'] * 100:>8.0f}%{r['pg']['cpu'] * 100:>7.0f}%"
                      f"{r['pg']['commits_per_s']:>9.0f}{lock_waits(r['pg']):>10.2f}"
                      f"{wal:>9.2f}{r['pg']['cpu'] * 1000 / r['per_s']:>8.2f}"
                      f"{r['workers_cpu'] * 1000 / r['per_s']:>8.2f}")
        print("  (vs 1: ratio to the 1-process run of the same kind; machine: all cores busy;"
              " pg CPU: PostgreSQL backends, share of one core; lock wait / WAL wait: backends"
              " waiting on a row lock / on the WAL flush, average over the run; pg ms/c and gw"
              " ms/c: CPU ms per cycle in PostgreSQL's backends and in the rater processes)")
        for hot in (False, True):
            rows = [r for r in table if r["hot"] == hot]
            print("  " + limit_reading(rows, hot))
        return 0
    finally:
        if conn is not None:
            await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def limit_reading(rows: list[dict[str, Any]], hot: bool) -> str:
    """A first reading of what limited the largest run, from the figures printed."""
    base, top = rows[0], rows[-1]
    kind = "hot pool" if hot else "spread"
    gain = top["per_s"] / base["per_s"] if base["per_s"] else float("nan")
    parts = [f"{kind}: {top['processes']} processes give {gain:.2f}x the 1-process rate"]
    cores = _machine_cores()
    if top["machine"] > 0.9:
        used = top["machine"] * cores
        parts.append(f"the machine is {top['machine'] * 100:.0f}% busy: PostgreSQL's backends "
                     f"{top['pg']['cpu'] * 100:.0f}% of a core ({top['pg']['cpu'] / used * 100:.0f}%"
                     f" of the CPU used), the rater processes {top['workers_cpu'] * 100:.0f}%")
    lw = lock_waits(top["pg"])
    if lw >= 0.5:
        parts.append(f"{lw:.1f} backends on average wait for a row lock "
                     f"(was {lock_waits(base['pg']):.2f} with 1 process)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------
# calls: two PBXs, two gateway processes
# ----------------------------------------------------------------------------------


class CallsBench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dbname = f"gw_fleet_bench_{uuid.uuid4().hex[:8]}"
        self.url = ADMIN_URL.rpartition("/")[0] + "/" + self.dbname
        self.pbxes: dict[str, Any] = {}
        self.gws: dict[str, Any] = {}
        self.asterisk_pids: dict[str, int] = {}
        self.conn: asyncpg.Connection | None = None

    async def setup(self) -> None:
        from tests.support.fleet import FleetGateway, FleetPbx, fleet_ports, poll

        a = self.a
        await provision(self.url)
        ports = fleet_ports(OWNER.values())
        for name in PBXES:
            self.pbxes[name] = FleetPbx(
                name, gw_agi=f"127.0.0.1:{ports[OWNER[name]]}", root=a.pbx_root or None,
                phones=(PHONE,), trunks=("carrier",), extra_config={"logger.conf": LOGGER_CONF})
        log("starting two Asterisks")
        with ThreadPoolExecutor(2) as ex:
            await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(ex, p.start)
                                   for p in self.pbxes.values()))
        for name, pbx in self.pbxes.items():
            with contextlib.suppress(OSError, ValueError):
                self.asterisk_pids[name] = int(
                    (pbx.run_dir / "run" / "asterisk.pid").read_text().strip())
        for name in PBXES:
            gw_name = OWNER[name]
            self.gws[gw_name] = FleetGateway(
                gw_name, agi_port=ports[gw_name], pbxes=[self.pbxes[name]],
                lease_seconds=6, database_url=self.url, reconcile_interval_seconds=3600,
                log_level="warning")
        log("starting two gateway processes")
        await asyncio.gather(*(gw.start() for gw in self.gws.values()))
        for name in PBXES:
            gw = self.gws[OWNER[name]]
            await poll(lambda gw=gw, name=name: gw.owns(name), 30,
                       f"{gw.name} owns {name} with AMI up")
        self.conn = await asyncpg.connect(self.url, timeout=10)
        ver = (await self.pbxes["pbx1"].acli("core show version")).strip().split("\n")[0]
        log(f"{ver.split(' built ')[0]}; gw-a owns pbx1, gw-b owns pbx2; database {self.dbname}")

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        await asyncio.gather(*(gw.close() for gw in self.gws.values()),
                             return_exceptions=True)
        for pbx in self.pbxes.values():
            await asyncio.to_thread(pbx.stop)

    async def open_calls(self) -> int:
        return await self.conn.fetchval(
            "SELECT count(*) FROM calls WHERE state IN ('authorised', 'answered')")

    async def call_counts(self) -> dict[str, int]:
        """Calls in the database by PBX, authorising process and state."""
        rows = await self.conn.fetch("SELECT pbx, owner, state, count(*) AS n FROM calls"
                                     " GROUP BY 1, 2, 3")
        return {f"{r['pbx']} by {r['owner']} {r['state']}": r["n"] for r in rows}

    async def decisions(self) -> dict[str, int]:
        """Each gateway process's decision counters (``/status``), as
        ``"gw-a outbound allow REASON"`` -> count."""
        out: dict[str, int] = {}
        for name, gw in self.gws.items():
            with contextlib.suppress(Exception):
                for d in (await gw.status()).get("decisions") or []:
                    out[f"{name} {d['direction']} {d['decision']} {d['reason']}"] = d["count"]
        return out

    async def quiet(self, within: float = 20.0) -> int:
        """Wait until no PBX has a channel and no call is open in the database; return
        how many calls are still open then."""
        deadline = time.monotonic() + within
        while True:
            chans = []
            for pbx in self.pbxes.values():
                with contextlib.suppress(Exception):
                    chans += await asyncio.to_thread(pbx.channels)
            left = await self.open_calls()
            if (not chans and not left) or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.25)

    async def step(self, mode: str, rate: float, calls: int) -> dict[str, Any]:
        """``calls`` calls at ``rate`` calls/s in all: on pbx1 alone (single), or half on
        each PBX at once (fleet). One ``Step`` per PBX used."""
        a = self.a
        used = ("pbx1",) if mode == "single" else PBXES
        share_rate, share_calls = rate / len(used), max(1, calls // len(used))
        hold_s = a.hold_ms / 1000
        duration = share_calls / share_rate
        limit = max(20, int(share_rate * (hold_s + 3)))
        loads = {}
        for name in used:
            pbx = self.pbxes[name]
            uas = SippLoad(pbx, "carrier", "uas_answer", {"MAX_MS": 30_000}, calls=share_calls,
                           limit=max(limit, share_calls), timeout=duration + hold_s + 60)
            uac = SippLoad(pbx, PHONE, "uac_pdd", {"HOLD_MS": a.hold_ms}, calls=share_calls,
                           limit=limit, rate=share_rate, service=NUMBER,
                           timeout=duration + hold_s + 40)
            loads[name] = (uac, uas)
        open0, counts0 = await self.open_calls(), await self.call_counts()
        decisions0 = await self.decisions()
        for name in used:
            with contextlib.suppress(Exception):
                await self.pbxes[name].acli("core reset taskprocessors")
        for _, uas in loads.values():
            await uas.start(wait_bound=True)
        cpu = CpuMeter(self.dbname, None, self_label="bench driver (python)")
        cpu.exclude = {self.conn.get_server_pid()}
        pg = None
        try:
            for uac, _ in loads.values():
                await uac.start()
            cpu.procs = {f"asterisk {n}": pid for n, pid in self.asterisk_pids.items()}
            cpu.procs |= {f"gateway {n}": gw.proc.pid for n, gw in self.gws.items()}
            for name, (uac, uas) in loads.items():
                cpu.procs[f"sipp {name}"] = uac.pid
                cpu.procs[f"sipp carrier {name}"] = uas.pid
            cpu.start()
            pg = await PgMeter(self.conn, self.dbname).start()
            await asyncio.gather(*(uac.wait(duration + hold_s + 45) for uac, _ in loads.values()))
            shares = await cpu.stop()
            pgr = await pg.stop()
            pg = None
            queues = {}
            for name in used:
                with contextlib.suppress(Exception):
                    queues[name] = taskprocessors(
                        await self.pbxes[name].acli("core show taskprocessors"))
            await asyncio.gather(*(uas.wait(5) for _, uas in loads.values()))
        finally:
            for uac, uas in loads.values():
                uac.kill()
                uas.kill()
            if cpu._task is not None and not cpu._task.done():
                await cpu.stop()
            if pg is not None:
                await pg.stop()
        left = await self.quiet()
        counts = {k: n - counts0.get(k, 0) for k, n in (await self.call_counts()).items()
                  if n - counts0.get(k, 0)}
        decisions = {k: n - decisions0.get(k, 0) for k, n in (await self.decisions()).items()
                     if n - decisions0.get(k, 0)}
        steps = {}
        for name, (uac, uas) in loads.items():
            st = Step(mode=f"{mode}/{name}", rate=share_rate, calls=share_calls)
            read_sipp(st, uac, uas)
            steps[name] = st
        why = [f"{name}: {w}" for name, st in steps.items()
               if (w := step_failure(st, a.max_median_ms))]
        if left - open0 > 0:
            why.append(f"{left - open0} calls still open in the database")
        return {"mode": mode, "rate": rate, "calls": share_calls * len(used), "steps": steps,
                "cpu": shares, "pg": pgr, "failed": "; ".join(why), "db_calls": counts,
                "queues": queues, "decisions": decisions}

    @staticmethod
    def describe(r: dict[str, Any]) -> list[str]:
        out = [f"  {r['mode']:6s} {r['rate']:g} calls/s in all x {r['calls']}"
               + (f": FAILED ({r['failed']})" if r["failed"] else ": every call completed")]
        for name, st in r["steps"].items():
            s = st.pdd_summary
            out.append(f"    {name}: {st.rate:g} calls/s, ok {st.ok}/{st.calls}, failed "
                       f"{st.failed}, achieved {st.achieved_rate:.1f} calls/s; PDD ms p50 "
                       f"{fmt_ms(s['p50'])} p99 {fmt_ms(s['p99'])} max {fmt_ms(s['max'])}; "
                       f"INVITE retransmissions {st.invite_retrans}"
                       + (f"; {st.note}" if st.note else "")
                       + (f"; SIPp failures {st.failure_kinds}" if st.failure_kinds else ""))
        for name, tasks in r["queues"].items():
            mgr = tasks.get("stasis/m:manager:core", (0, 0, 0))
            over = [k for k, (_, d, h) in tasks.items() if h and d >= h]
            out.append(f"    Asterisk {name}: AMI manager queue max depth {mgr[1]} (high water "
                       f"{mgr[2]}); queues over their high water mark: "
                       f"{', '.join(over) or 'none'}")
        cpu = ", ".join(f"{k} {v * 100:.0f}%" for k, v in sorted(
            r["cpu"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
        out.append(f"    CPU (share of one core; machine = all {_machine_cores()} cores): {cpu}")
        out.append(f"    {describe_pg(r['pg'])}")
        out.append(f"    calls in the database (PBX by process, state): {r['db_calls']}")
        out.append(f"    decisions (gateway /status): {r['decisions']}")
        return out

    async def run(self) -> int:
        a = self.a
        t_start = time.monotonic()
        budget_end = t_start + a.budget
        admin = await asyncpg.connect(ADMIN_URL, timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{self.dbname}"')
            try:
                await self.setup()
                return await self.ramp(t_start, budget_end)
            finally:
                await self.close()
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            await admin.close()

    async def ramp(self, t_start: float, budget_end: float) -> int:
        a = self.a
        for mode in MODES:  # warm-up, not counted
            await self.step(mode, a.warmup_rate, max(4, int(a.warmup_rate)))
        log(f"ramp {','.join(f'{r:g}' for r in a.ramp)} calls/s in all, {a.step_seconds:g} s "
            f"a step, held {a.hold_ms} ms")

        async def one_step(mode: str, rate: float, calls: int) -> tuple[dict[str, Any], str]:
            r = await self.step(mode, rate, calls)
            for line in self.describe(r):
                print(line, flush=True)
            return r, r["failed"]

        ramp = await run_ramp(a, MODES, one_step, budget_end, min_calls=2, slack=15)
        results, best = ramp.results, ramp.best

        print()
        print("Calls/s in all, single (pbx1 + gw-a) vs fleet (pbx1 + gw-a and pbx2 + gw-b at "
              "once, half the rate each); PDD p50/p99 ms, calls ok/total; machine busy:")
        print(f"  {'calls/s':>8s}" + "".join(f"{m:>36s}" for m in MODES))
        for rate in sorted({r["rate"] for r in results}):
            cells = []
            for m in MODES:
                r = next((x for x in results if x["rate"] == rate and x["mode"] == m), None)
                if r is None:
                    cells.append(f"{'-':>36s}")
                    continue
                pdd = [x for st in r["steps"].values() for x in st.pdd]
                p50 = statistics.median(pdd) if pdd else float("nan")
                p99 = pct(pdd, 99) if pdd else float("nan")
                ok = sum(st.ok for st in r["steps"].values())
                busy = r["cpu"].get("machine busy (all cores)", 0)
                cell = (f"{fmt_ms(p50)}/{fmt_ms(p99)} {ok}/{r['calls']} {busy * 100:.0f}%"
                        + (" FAIL" if r["failed"] else ""))
                cells.append(f"{cell:>36s}")
            print(f"  {rate:>8g}" + "".join(cells))
        for line in ramp.verdicts(a.ramp[-1]):
            print(f"  {line}")
        if best["single"] and best["fleet"]:
            print(f"  ratio fleet/single (highest clean total rate): "
                  f"{best['fleet'] / best['single']:.2f}")
        print(f"\ntotal {time.monotonic() - t_start:.0f} s", flush=True)
        return 0


# ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calls", help="two PBXs and two gateway processes vs one of each")
    add_ramp_args(c, ramp="40,80,120,160,200,240,280", max_step_calls=2400, budget=900.0)
    c.add_argument("--warmup-rate", type=float, default=10.0,
                   help="calls/s (and calls) of the uncounted warm-up step per mode (10)")
    c.add_argument("--pbx-root", default="", help="the sid root folder ($PBX_ROOT)")
    r = sub.add_parser("rater", help="rater cycles/s with 1, 2, 4 processes on one database")
    r.add_argument("--processes", default="1,2,4", help="process counts, the first is the "
                   "baseline (1,2,4)")
    r.add_argument("--seconds", type=float, default=10.0, help="seconds per run (10)")
    r.add_argument("--concurrency", type=int, default=8,
                   help="connections and workers per process (8)")
    r.add_argument("--tenants", type=int, default=200, help="tenants, one pool each (200)")
    r.add_argument("--start-delay", type=float, default=4.0,
                   help="seconds the processes get to start and warm up (4)")
    w = sub.add_parser("rater-worker", help=argparse.SUPPRESS)
    w.add_argument("--url", required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--tenants", type=int, default=200)
    w.add_argument("--concurrency", type=int, default=8)
    w.add_argument("--seconds", type=float, default=10.0)
    w.add_argument("--start-at", type=float, required=True)
    w.add_argument("--hot", action="store_true")
    a = p.parse_args(argv)
    if a.command == "calls":
        a.ramp = [float(x) for x in a.ramp.split(",") if x.strip()]
        if not a.ramp or any(x <= 0 for x in a.ramp):
            p.error("the ramp's rates must be positive")
    if a.command == "rater":
        a.processes = [int(x) for x in a.processes.split(",") if x.strip()]
        if not a.processes or any(n < 1 for n in a.processes):
            p.error("process counts must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.command == "rater-worker":
        asyncio.run(rater_worker(a))
        return 0
    print(f"fleet bench {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"{_machine_cores()} cores, {' '.join(sys.argv)}", flush=True)
    if a.command == "rater":
        return asyncio.run(rater_main(a))
    from tests.support.pbx import pbx_root_path, root_ready
    from tests.support.pbx.processes import kill_leftovers

    root = Path(a.pbx_root) if a.pbx_root else pbx_root_path()
    if not root_ready(root):
        print(f"no Asterisk/SIPp root folder at {root} (run .ci/pbx-root.sh)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(CallsBench(a).run())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
