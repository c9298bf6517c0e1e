"""Memory per live call (issue 10): the gateway's resident memory while it follows 0,
100 and 500 live calls, and whether it gives the memory back once they end.

The gateway runs as an OS process (``python -m gateway serve`` through a thin wrapper,
``serve`` below) against a scratch PostgreSQL database. The PBX is played over its two
wires, as the fault suite does: FastAGI requests as Asterisk sends them and a fake AMI
server (``tests.support.ami``) that answers the gateway's actions. Each call is

    authorised   an ``outbound`` AGI request, allowed and reserved (FUNDED);
    answered     an AMI ``DialEnd`` ANSWER: the gateway starts the call's renewal task
                 (slices of ``--slice-seconds``, long enough that none falls due);
    held         until the last level has been measured;
    ended        AMI ``Hangup`` for both channels, ``Cdr``, and the dialplan's ``hangup``
                 AGI report, as Asterisk sends them: settled once, out of the live table.

At each level (the calls of the level before stay up, new ones are added) the bench
waits until the gateway shows every call answered (``/status``), asks the process for a
garbage collection (SIGUSR1 to the wrapper), lets it settle, and reads
``process_resident_memory_bytes`` and ``gateway_live_calls`` from ``/metrics``. It prints
the resident memory per level, KiB per live call between levels (the slope), then hangs
every call up and checks that the live table and the open calls in the database are
back to none and how much of the memory came back.

``--trace`` runs the gateway under ``tracemalloc`` and prints where the Python heap grew
between the last two levels (a snapshot diff by source line, per live call): what holds
the memory. Tracing itself costs memory, so the resident figures of a traced run are
not comparable with an untraced one.

Run from the repository root (the test tools import as a package):

    .venv/bin/python -m bench.memory_bench [--levels 0,100,500] [--trace]

Needs PostgreSQL (``$GATEWAY_TEST_DATABASE_URL``, default the test suite's). Loopback
only; the gateway process is killed on exit and the scratch database dropped. No figure
is asserted: they are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import itertools
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

PBX_NAME = "default"
PHONE = "alice"  # standard_tenant's Calling Plan user (bench.e2e_bench.provision)
MARKS_ENV = "MEMORY_BENCH_DIR"  # where the wrapper notes each collection (and snapshot)
TRACE_ENV = "MEMORY_BENCH_TRACE"
TRACE_FRAMES = 8


# ----------------------------------------------------------------------------------
# the gateway process's side: a wrapper around ``gateway serve``
# ----------------------------------------------------------------------------------


def serve() -> int:
    """``gateway serve``, plus: on SIGUSR1 a full garbage collection (and, traced, a
    tracemalloc snapshot), after which ``done-N`` appears in ``$MEMORY_BENCH_DIR``."""
    marks = Path(os.environ[MARKS_ENV])
    trace = os.environ.get(TRACE_ENV) == "1"
    if trace:
        tracemalloc.start(TRACE_FRAMES)
    count = itertools.count(1)

    def collect(signum: int, frame: Any) -> None:
        n = next(count)
        gc.collect()
        if trace:
            tmp = marks / f"snap-{n}.tmp"
            tracemalloc.take_snapshot().dump(str(tmp))
            tmp.replace(marks / f"snap-{n}")
        (marks / f"done-{n}").touch()

    signal.signal(signal.SIGUSR1, collect)
    from gateway.__main__ import main as gateway_main

    return gateway_main(["serve"])


# ----------------------------------------------------------------------------------
# the PBX's side: AMI and AGI
# ----------------------------------------------------------------------------------


class BenchPbx:
    """The PBX as the gateway sees it: an AMI server that names itself ``PBX_NAME``,
    lists the calls that are up and takes deadline moves; calls placed over AGI."""

    def __init__(self) -> None:
        from tests.support.ami import FakeAmi

        self.ami = FakeAmi()
        self.ami.scripts.update(getvar=self._getvar, setvar=self._setvar,
                                coreshowchannels=self._core_show_channels)
        self.up: dict[str, str] = {}  # the caller's uniqueid -> the call id, while up
        self.agi_port = 0
        self._sequence = itertools.count(1)

    async def _getvar(self, conn: Any, action: dict[str, str]) -> None:
        value = PBX_NAME if action.get("Variable") == "GW_PBX" else ""
        await conn.reply(action, Variable=action.get("Variable", ""), Value=value)

    async def _setvar(self, conn: Any, action: dict[str, str]) -> None:
        await conn.reply(action, Message="Variable Set")

    async def _core_show_channels(self, conn: Any, action: dict[str, str]) -> None:
        await conn.reply(action, EventList="start", Message="Channels will follow")
        items = 0
        for uniqueid in list(self.up):
            for suffix, name in (("", caller(uniqueid)), ("-b", callee(uniqueid))):
                await conn.send({"Event": "CoreShowChannel", "ActionID": action["ActionID"],
                                 "Channel": name, "Uniqueid": uniqueid + suffix,
                                 "Linkedid": uniqueid})
                items += 1
        await conn.send({"Event": "CoreShowChannelsComplete", "ActionID": action["ActionID"],
                         "EventList": "Complete", "ListItems": str(items)})

    async def place(self) -> str | None:
        """Authorise one call and answer it; the refusal reason when not allowed."""
        from bench.e2e_bench import NUMBER
        from tests.support.agi import agi_request

        uniqueid = f"{time.time():.0f}.{next(self._sequence)}"
        got = await agi_request(self.agi_port, "outbound", [NUMBER, PHONE, uniqueid, PBX_NAME],
                                uniqueid=uniqueid, endpoint=PHONE, extension=NUMBER,
                                within=30)
        if got.get("GW_DECISION") != "ALLOW" or not got.get("GW_CALL_ID"):
            return got.get("GW_REASON") or "no answer"
        self.up[uniqueid] = got["GW_CALL_ID"]
        await self.ami.event({"Event": "DialEnd", "Uniqueid": uniqueid,
                              "DestChannel": callee(uniqueid), "DialStatus": "ANSWER",
                              "Linkedid": uniqueid})
        return None

    async def end(self, uniqueid: str, talk_ms: int) -> None:
        """The call ends, reported on both wires as Asterisk does."""
        from tests.support.agi import agi_request

        call_id = self.up.pop(uniqueid)
        for suffix, name in (("", caller(uniqueid)), ("-b", callee(uniqueid))):
            await self.ami.event({"Event": "Hangup", "Uniqueid": uniqueid + suffix,
                                  "Channel": name, "Linkedid": uniqueid})
        await self.ami.event({"Event": "Cdr", "UniqueID": uniqueid, "Disposition": "ANSWERED",
                              "BillableSeconds": str(talk_ms // 1000)})
        await agi_request(self.agi_port, "hangup",
                          [call_id, str(talk_ms), "ANSWER", str(talk_ms // 1000), PBX_NAME],
                          uniqueid=uniqueid, endpoint=PHONE, within=30)


def caller(uniqueid: str) -> str:
    return f"PJSIP/{PHONE}-{uniqueid.replace('.', '')}"


def callee(uniqueid: str) -> str:
    return f"PJSIP/carrier-{uniqueid.replace('.', '')}"


async def bounded(n: int, width: int, one: Any) -> list[Any]:
    """``one(i)`` for i in range(n), at most ``width`` at a time."""
    sem = asyncio.Semaphore(width)

    async def run(i: int) -> Any:
        async with sem:
            return await one(i)

    return await asyncio.gather(*(run(i) for i in range(n)))


# ----------------------------------------------------------------------------------
# the bench
# ----------------------------------------------------------------------------------


class MemoryBench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.pbx = BenchPbx()
        self.marks = Path(tempfile.mkdtemp(prefix="memory-bench-"))
        self.collections = 0
        self.gw: Any = None
        self.db: asyncpg.Connection | None = None

    # ---- reading the gateway -----------------------------------------------------

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``name{label=value,...}`` -> value."""
        url = f"http://127.0.0.1:{self.gw.http_port}/metrics"
        async with aiohttp.ClientSession() as http, \
                http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            text = await r.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    async def answered(self) -> int:
        status = await self.gw.status()
        return sum(1 for c in status.get("live_calls") or [] if c.get("state") == "answered")

    async def ami_backlog(self) -> int:
        """AMI events received and not yet handled, over every PBX (``/status``)."""
        pbxes = (await self.gw.status()).get("pbxes") or {}
        values = pbxes.values() if isinstance(pbxes, dict) else pbxes
        return sum((p.get("ami") or {}).get("event_backlog") or 0 for p in values)

    async def collect(self) -> int:
        """A full collection in the gateway process; its number (the snapshot's)."""
        self.collections += 1
        n = self.collections
        os.kill(self.gw.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not (self.marks / f"done-{n}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not report its garbage collection")
            await asyncio.sleep(0.05)
        return n

    async def open_calls(self) -> int:
        assert self.db is not None
        return await self.db.fetchval(
            "SELECT count(*) FROM calls WHERE state IN ('authorised', 'answered')")

    async def wait_for(self, what: str, check: Any, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not reached within {within:.0f} s: {what}")
            await asyncio.sleep(0.1)

    async def measure(self, label: str, calls: int) -> dict[str, Any]:
        from bench.e2e_bench import log

        snap = await self.collect()
        await asyncio.sleep(self.a.settle)
        m = await self.metrics()
        row = {"label": label, "calls": calls, "snapshot": snap,
               "rss": m["process_resident_memory_bytes"],
               "live": int(m.get(f"gateway_live_calls{{pbx={PBX_NAME}}}", 0)),
               "open": await self.open_calls()}
        log(f"{label}: {calls} calls, resident {row['rss'] / 2**20:.1f} MiB, "
            f"live table {row['live']}")
        return row

    # ---- the run -----------------------------------------------------------------------

    async def start(self, url: str) -> None:
        from bench.e2e_bench import provision
        from tests.faults.process import GatewayProcess
        from tests.support.ami import SECRET, USERNAME
        from tests.support.pbx import free_port

        await provision(url)
        self.db = await asyncpg.connect(url, timeout=10)
        await self.pbx.ami.start()
        self.pbx.agi_port = free_port()
        os.environ[MARKS_ENV] = str(self.marks)
        os.environ[TRACE_ENV] = "1" if self.a.trace else "0"
        self.gw = GatewayProcess(
            argv=("-m", "bench.memory_bench", "serve"),
            database_url=url, agi_port=self.pbx.agi_port, ami_host="127.0.0.1",
            ami_port=self.pbx.ami.port, ami_username=USERNAME, ami_secret=SECRET,
            pbx_name=PBX_NAME, instance_name="gw-memory", log_level="warning",
            slice_seconds=self.a.slice_seconds, reconcile_interval_seconds=3600)
        await self.gw.start()

        async def serving() -> bool:
            m = await self.metrics()
            return (m.get(f"gateway_pbx_owned{{pbx={PBX_NAME}}}") == 1
                    and self.pbx.ami.logins > 0)

        await self.wait_for("the gateway owns the PBX with AMI up", serving)

    async def close(self) -> None:
        if self.gw is not None:
            await self.gw.close()
        await self.pbx.ami.close()
        if self.db is not None:
            await self.db.close()
        for p in self.marks.iterdir():
            p.unlink()
        self.marks.rmdir()

    async def run(self) -> int:
        from tests.support.database import scratch_database

        async with scratch_database("gw_memory_bench") as url:
            try:
                await self.start(url)
                return await self.levels()
            finally:
                await self.close()

    async def levels(self) -> int:
        from bench.e2e_bench import log

        a = self.a
        rows = []
        if a.warmup:
            # the first calls open the database pool's connections and fill its
            # statement caches, and load code: a cost per process, not per call
            log(f"warm-up: {a.warmup} calls placed and ended")
            if not await self.hold(a.warmup) or not await self.hang_up():
                return 1
        for level in a.levels:
            if not await self.hold(level):
                return 1
            rows.append(await self.measure(f"{level} live calls", level))
        peak = rows[-1]
        drained_ok = await self.hang_up()
        after = await self.measure("after hang-up", 0)
        # later rounds: the most calls again, then none; memory that the first round
        # left resident is used again if their peaks stay at the first one's
        rounds = []
        for n in range(2, a.rounds + 1):
            if not await self.hold(peak["calls"]):
                return 1
            top = await self.measure(f"round {n}: {peak['calls']} live calls", peak["calls"])
            drained_ok = await self.hang_up() and drained_ok
            rounds.append((n, top, await self.measure(f"round {n}: after hang-up", 0)))
        self.report(rows, after, rounds)
        if a.trace and len(rows) >= 2:
            self.trace_report(rows, after, rounds)
        return 0 if drained_ok and peak["live"] == peak["calls"] else 1

    async def hold(self, level: int) -> bool:
        """Place calls until ``level`` are up, and wait until the gateway follows them
        all, answered; False (printed) when a call was refused."""
        refused: dict[str, int] = {}
        more = level - len(self.pbx.up)
        for reason in await bounded(more, self.a.width, lambda i: self.pbx.place()):
            if reason is not None:
                refused[reason] = refused.get(reason, 0) + 1
        if refused:
            print(f"calls refused: {refused}")
            return False
        await self.wait_for(f"{level} calls answered and followed",
                            lambda: self._answered_is(level))
        return True

    async def hang_up(self) -> bool:
        """End every call; whether the live table, the open calls and the AMI backlog
        came back to none (printed when not)."""
        from bench.e2e_bench import log

        log(f"hanging up {len(self.pbx.up)} calls")
        ups = list(self.pbx.up)
        await bounded(len(ups), self.a.width, lambda i: self.pbx.end(ups[i], 61_000))

        async def drained() -> bool:
            # the hang-up AGI reports settle first; the AMI events behind them (Hangup,
            # Cdr) are handled after: their messages count until then
            m = await self.metrics()
            return (m.get(f"gateway_live_calls{{pbx={PBX_NAME}}}", 0) == 0
                    and await self.open_calls() == 0 and await self.ami_backlog() == 0)

        try:
            await self.wait_for("the live table, the open calls and the AMI backlog back to "
                                "none", drained)
        except RuntimeError as exc:
            print(exc)
            return False
        return True

    async def _answered_is(self, n: int) -> bool:
        return (await self.answered() == n and await self.open_calls() == n
                and await self.ami_backlog() == 0)

    # ---- the report ------------------------------------------------------------------------

    def report(self, rows: list[dict[str, Any]], after: dict[str, Any],
               rounds: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> None:
        mib = 2**20
        print()
        print(f"resident memory of the gateway process{' (traced)' if self.a.trace else ''}")
        print(f"  {'live calls':>10}  {'resident MiB':>12}  {'live table':>10}  "
              f"{'open in db':>10}")
        for r in [*rows, after]:
            name = str(r["calls"]) if r is not after else "hung up"
            print(f"  {name:>10}  {r['rss'] / mib:>12.2f}  {r['live']:>10}  {r['open']:>10}")
        print("KiB per live call (slope of resident memory)")
        slopes = []
        for lo, hi in itertools.pairwise(rows):
            slopes.append(self._slope(lo, hi))
        if len(rows) > 2:
            slopes.append(self._slope(rows[0], rows[-1]))
        for lo, hi, kib in slopes:
            print(f"  {lo} -> {hi} calls: {kib:.1f} KiB per call")
        base, peak = rows[0], rows[-1]
        taken = peak["rss"] - base["rss"]
        back = peak["rss"] - after["rss"]
        share = f"{back / taken * 100:.0f}%" if taken > 0 else "-"
        print(f"after hang-up: live table {after['live']}, open calls in the database "
              f"{after['open']}; resident {after['rss'] / mib:.2f} MiB, "
              f"{(after['rss'] - base['rss']) / 1024:+.0f} KiB against {base['calls']} calls; "
              f"gave back {back / 1024:.0f} of the {taken / 1024:.0f} KiB taken ({share})")
        if slopes:
            lo, hi, kib = slopes[len(rows) - 2] if len(rows) > 1 else slopes[-1]
            verdict = "met" if kib < 100 else "NOT met"
            print(f"target < 100 KiB per live call ({lo} -> {hi} calls): {verdict}")
        for n, top, end in rounds:
            print(f"round {n}: {top['calls']} live calls {top['rss'] / mib:.2f} MiB "
                  f"({(top['rss'] - peak['rss']) / 1024:+.0f} KiB against the first round's), "
                  f"live table {top['live']}; after hang-up {end['rss'] / mib:.2f} MiB, "
                  f"live table {end['live']}, open calls in the database {end['open']}")

    @staticmethod
    def _slope(lo: dict[str, Any], hi: dict[str, Any]) -> tuple[int, int, float]:
        calls = hi["calls"] - lo["calls"]
        kib = (hi["rss"] - lo["rss"]) / 1024 / calls if calls else 0.0
        return lo["calls"], hi["calls"], kib

    def trace_report(self, rows: list[dict[str, Any]], after: dict[str, Any],
                     rounds: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> None:
        """The traced heap at each level and after each hang-up (what a leak would keep,
        round after round), and where it grew between the last two levels, by source
        line, per call."""
        noise = [tracemalloc.Filter(False, tracemalloc.__file__),
                 tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
        snaps = {r["snapshot"]: tracemalloc.Snapshot.load(
            str(self.marks / f"snap-{r['snapshot']}")).filter_traces(noise)
            for r in [*rows, after, *(x for _, top, end in rounds for x in (top, end))]}

        def heap(r: dict[str, Any]) -> int:
            return sum(s.size for s in snaps[r["snapshot"]].statistics("filename"))

        print()
        print("traced Python heap (after a full collection)")
        for r in rows:
            print(f"  {r['calls']:>10}  {heap(r) / 2**20:>12.2f} MiB")
        print(f"  {'hung up':>10}  {heap(after) / 2**20:>12.2f} MiB")
        for n, top, end in rounds:
            print(f"  round {n}: {top['calls']} calls {heap(top) / 2**20:.2f} MiB, hung up "
                  f"{heap(end) / 2**20:.2f} MiB")
        base, peak = rows[0], rows[-1]
        if peak["calls"] > base["calls"]:
            kept = (heap(after) - heap(base)) / (peak["calls"] - base["calls"])
            print(f"after hang-up the traced heap keeps {kept:.0f} B per call of the "
                  f"{peak['calls']} calls against {base['calls']} calls")
        lo, hi = rows[-2], rows[-1]
        calls = max(hi["calls"] - lo["calls"], 1)
        print(f"traced Python heap, {lo['calls']} -> {hi['calls']} calls: "
              f"{(heap(hi) - heap(lo)) / 1024 / calls:.1f} KiB per call")
        self._top_lines(f"top {self.a.top} source lines by growth",
                        snaps[lo["snapshot"]], snaps[hi["snapshot"]], calls)
        if peak["calls"] > base["calls"]:
            self._top_lines(f"top {self.a.top} source lines kept after the hang-up, against "
                            f"{base['calls']} calls", snaps[base["snapshot"]],
                            snaps[after["snapshot"]], peak["calls"] - base["calls"])

    def _top_lines(self, title: str, before: tracemalloc.Snapshot,
                   now: tracemalloc.Snapshot, calls: int) -> None:
        print(f"  {title} (per call: bytes, blocks)")
        root = str(Path(__file__).resolve().parent.parent) + os.sep
        for s in now.compare_to(before, "lineno")[:self.a.top]:
            frame = s.traceback[0]
            where = frame.filename.replace(root, "")
            where = where.split("site-packages" + os.sep)[-1]
            if os.sep + "lib" + os.sep + "python3" in where:  # the standard library
                where = "stdlib " + where.split(os.sep + "lib" + os.sep)[-1].partition(
                    os.sep)[2]
            print(f"  {s.size_diff / calls:>9.0f} B {s.count_diff / calls:>6.1f}  "
                  f"{where}:{frame.lineno}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.memory_bench", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=("run", "serve"),
                   help="run the bench (default); serve: the gateway process's wrapper")
    p.add_argument("--levels", default="0,100,500",
                   help="live calls to hold and measure at, ascending (default 0,100,500)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds between the garbage collection and the reading")
    p.add_argument("--slice-seconds", type=int, default=3600,
                   help="the gateway's slice: long, so that no renewal falls due")
    p.add_argument("--warmup", type=int, default=50,
                   help="calls placed and ended before the first level (default 50)")
    p.add_argument("--rounds", type=int, default=2,
                   help="hold the most calls this many times, hanging up between (default 2)")
    p.add_argument("--width", type=int, default=8, help="calls placed or ended at once")
    p.add_argument("--trace", action="store_true",
                   help="trace the gateway's heap; print a snapshot diff of the last levels")
    p.add_argument("--top", type=int, default=15, help="source lines in the trace diff")
    a = p.parse_args(argv)
    if a.command == "run":
        a.levels = [int(x) for x in a.levels.split(",") if x.strip()]
        if not a.levels or a.levels != sorted(a.levels) or a.levels[0] < 0:
            p.error("--levels: ascending counts of calls, from 0 up")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.command == "serve":
        return serve()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"memory bench {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"{os.cpu_count()} cores, load average {load}, {' '.join(sys.argv)}", flush=True)
    try:
        return asyncio.run(MemoryBench(a).run())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
