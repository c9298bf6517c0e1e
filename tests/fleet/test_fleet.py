"""A fleet (issue 9, "What must be shown", cases 1-6): two real Asterisk 22 with their
own SIPp phones and carrier, two gateway processes (separate OS processes, each
configured with both PBXs, leases of 3 s), one PostgreSQL into which both PBXs write
their CDRs.

1. Calls on both PBXs at once with uniqueids that collide: each authorised, renewed and
   settled on its own PBX, billed exactly.
2. The reproduction: a long call on PBX 1 while PBX 2's own gateway process reconciles
   PBX 2 every second: never touched by it, billed its full talk time.
3. The owner of PBX 1 SIGKILLed during 10 calls funded in 10 s slices: the other process
   takes the lease, adopts and renews all 10 (none cut while funded), each settled once.
4. The killed process restarts: it does not take its lease back; with both alive each
   PBX has exactly one owner, sampled every second.
5. AGI fail-over in the dialplan: the first gateway down, calls decided by the second;
   both down, the fail policy (503) and emergency still dials.
6. PBX 2 restarts while calls are up on both: only PBX 2's calls are settled (stopped:
   as its reports and CDR say; crashed: by the estimate, within their funding); PBX 1's
   are untouched and billed fully.

Each case ends with the billing rules' invariants (tests/faults/invariants.py).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tests.faults.invariants import assert_invariants
from tests.support.fleet import (
    PHONES,
    SLICE,
    FleetGateway,
    FleetPbx,
    lease_owners,
    leases,
    poll,
    seed_leases,
    until_value,
)
from tests.support.pbx import CallResult, Sipp

pytestmark = [pytest.mark.fleet, pytest.mark.pbx, pytest.mark.db]

DOMESTIC = "2125550100"
EMERGENCY = "911"
PBX_REPORTS = ("agi", "cdr")  # the PBX's own statement of the talk time
SETTLED = "SELECT count(*) FROM calls WHERE state = 'settled' AND pbx = $1"
ANSWERED = "SELECT count(*) FROM calls WHERE state = 'answered' AND pbx = $1"


def explain(results: dict[str, CallResult] | list[CallResult]) -> str:
    values = results.values() if isinstance(results, dict) else results
    return "\n".join(r.summary() for r in values)


async def serving(pool: asyncpg.Pool, gw: FleetGateway, *pbxes: str,
                  within: float = 20.0) -> None:
    """Wait until ``gw`` holds the lease of each of ``pbxes`` and says so in /status,
    its AMI link to each up."""
    async def check() -> bool:
        owners = await lease_owners(pool)
        return all(owners.get(p) == gw.name for p in pbxes) \
            and all([await gw.owns(p) for p in pbxes])

    try:
        await poll(check, within, f"{gw.name} serving {pbxes}", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nleases: {await leases(pool)}\n"
                             f"{gw.name} /status pbxes: {await gw.pbx_status()}\n"
                             f"{gw.log_tail(30)}") from None


async def fleet_of_two(pool: asyncpg.Pool, gateways, *, b_config: dict | None = None
                       ) -> tuple[FleetGateway, FleetGateway]:
    """gw-a serving PBX 1 and gw-b serving PBX 2: the leases are given out before the
    processes start, so that who serves which is known; each renews its own."""
    await seed_leases(pool, {"pbx1": "gw-a", "pbx2": "gw-b"}, 20)
    a, b = gateways("gw-a"), gateways("gw-b", **(b_config or {}))
    await asyncio.gather(a.start(), b.start())
    await asyncio.gather(serving(pool, a, "pbx1"), serving(pool, b, "pbx2"))
    return a, b


async def place(pbx: FleetPbx, phones: tuple[str, ...], hold: float, *,
                number: str = DOMESTIC, max_wait: float = 60.0
                ) -> tuple[dict[str, asyncio.Task[CallResult]], Sipp]:
    """One carrier taking ``len(phones)`` calls, and one call from each phone, held
    ``hold`` seconds by the phone."""
    trunk = await pbx.uas("carrier", calls=len(phones), max_wait=max_wait).started()
    tasks = {p: asyncio.create_task(pbx.call(p, number, hold=hold, max_wait=max_wait))
             for p in phones}
    return tasks, trunk


async def results_of(tasks: dict[str, asyncio.Task[CallResult]]) -> dict[str, CallResult]:
    done = await asyncio.gather(*tasks.values())
    return dict(zip(tasks, done, strict=True))


def held_to_the_end(results: dict[str, CallResult], hold: float) -> None:
    """Every call answered and hung up by its phone after ``hold``: nobody was cut at a
    funded end (the first slice is shorter than ``hold``)."""
    assert all(r.final_code == 200 and r.bye_from == "phone" and r.talk >= hold - 0.5
               for r in results.values()), explain(results)


async def rows_by_user(pool: asyncpg.Pool, users) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM calls WHERE user_id = any($1::text[])", list(users))
    return {r["user_id"]: r for r in rows}


async def billed_exactly(pool: asyncpg.Pool, pbx: str, results: dict[str, CallResult]
                         ) -> dict[str, asyncpg.Record]:
    """Each call of ``results`` is one row of ``pbx``, settled, billed the talk time its
    phone saw, and in agreement with that PBX's own CDR of the call."""
    rows = await rows_by_user(pool, results)
    assert sorted(rows) == sorted(results), (sorted(rows), sorted(results))
    for user, res in results.items():
        row = rows[user]
        assert (row["pbx"], row["state"]) == (pbx, "settled"), dict(row)
        assert abs(row["billed_seconds"] - res.talk) <= 1.5, (dict(row), res.talk)
        assert row["billed_seconds"] <= row["funded_seconds"], dict(row)
        assert res.talk <= row["funded_seconds"] + 1.5, (dict(row), res.talk)  # §8
        cdr = await answered_cdr(pool, pbx, row)
        assert abs(cdr["billsec"] - row["billed_seconds"]) <= 1, (dict(row), dict(cdr))
    return rows


async def answered_cdr(pool: asyncpg.Pool, pbx: str, row: asyncpg.Record,
                       within: float = 10.0) -> asyncpg.Record:
    """The one ANSWERED CDR that ``pbx`` wrote for the call of ``row``. Asterisk posts a
    CDR once the channel is destroyed, after its hangup handler has reported the call,
    and cdr_pgsql writes it from the CDR engine's own thread: on a loaded machine it
    can land a moment after the call is settled, so it is awaited."""
    sql = ("SELECT billsec FROM cdr WHERE coalesce(pbx, 'default') = $1 AND uniqueid = $2"
           " AND disposition = 'ANSWERED'")
    found: list[asyncpg.Record] = []

    async def written() -> bool:
        found[:] = await pool.fetch(sql, pbx, row["pbx_uniqueid"])
        return bool(found)

    try:
        await poll(written, within, f"{pbx}'s CDR of {row['pbx_uniqueid']}", every=0.2)
    except AssertionError:
        every_cdr = await pool.fetch("SELECT pbx, uniqueid, disposition, billsec FROM cdr")
        raise AssertionError(f"no ANSWERED CDR from {pbx} in {within} s for {dict(row)};"
                             f" the cdr table: {[dict(c) for c in every_cdr]}") from None
    assert len(found) == 1, (dict(row), [dict(c) for c in found])
    return found[0]


async def all_quiet(*pbxes: FleetPbx) -> None:
    for pbx in pbxes:
        assert await asyncio.to_thread(pbx.wait_no_channels, 15), pbx.channels()


async def next_second() -> None:
    """Return just after the wall clock turns a second, so that two calls placed now
    on two PBXs get their uniqueids (``<epoch>.<sequence>``) in the same second."""
    await asyncio.sleep(1.05 - time.time() % 1.0)


# 1 ------------------------------------------------------------------------------------

async def test_calls_on_both_pbxs_with_colliding_uniqueids_are_each_billed_on_their_pbx(
        pbxes, gateways, tenant, repo):
    pool = repo.pool
    p1, p2 = pbxes["pbx1"], pbxes["pbx2"]
    # both Asterisks start again: their uniqueid counters start again at 0
    await asyncio.gather(asyncio.to_thread(p1.restart), asyncio.to_thread(p2.restart))
    await fleet_of_two(pool, gateways)
    hold, pairs = 14.0, 3  # one renewal each (slices of 10 s)
    trunks = [await p.uas("carrier", calls=pairs, max_wait=60).started() for p in (p1, p2)]
    tasks: dict[str, asyncio.Task[CallResult]] = {}
    for i in range(pairs):
        # one call on each PBX in the same second: each PBX creates the caller's channel
        # (sequence 2i) and the carrier's (2i+1), the same ids on both
        await next_second()
        for pbx in (p1, p2):
            phone = PHONES[pbx.name][i]
            tasks[phone] = asyncio.create_task(pbx.call(phone, DOMESTIC, hold=hold,
                                                        max_wait=60))
        await poll(lambda i=i: asyncio.to_thread(
            lambda: all(len(p.channels()) >= 2 * (i + 1) for p in (p1, p2))),
            20, f"pair {i} up on both PBXs", every=0.2)
    results = await results_of(tasks)
    for trunk in trunks:
        await trunk.result()
    held_to_the_end(results, hold)
    for name in ("pbx1", "pbx2"):
        await until_value(pool, SETTLED, pairs, 15, name)
    collided = await pool.fetch(
        "SELECT pbx_uniqueid, array_agg(pbx ORDER BY pbx) AS pbxes FROM calls"
        " GROUP BY pbx_uniqueid HAVING count(DISTINCT pbx) = 2")
    print(f"uniqueids on both PBXs: {[r['pbx_uniqueid'] for r in collided]}")
    assert collided, [(r["pbx"], r["pbx_uniqueid"]) for r in await pool.fetch(
        "SELECT pbx, pbx_uniqueid FROM calls ORDER BY pbx_uniqueid")]
    for name in ("pbx1", "pbx2"):
        mine = {u: r for u, r in results.items() if u in PHONES[name]}
        rows = await billed_exactly(pool, name, mine)
        for row in rows.values():
            assert row["settled_by"] in PBX_REPORTS, dict(row)
            assert row["funded_seconds"] >= 2 * SLICE, dict(row)  # renewed on its PBX
    await all_quiet(p1, p2)
    await assert_invariants(pool)


# 2 ------------------------------------------------------------------------------------

async def test_a_long_call_is_never_touched_by_a_process_that_does_not_own_its_pbx(
        pbxes, gateways, tenant, repo):
    pool = repo.pool
    p1 = pbxes["pbx1"]
    # as in the issue: gw-b is PBX 2's gateway (configured with it alone) and reconciles
    # it every second (case 6 has a gw-b configured with both PBXs, owning PBX 2)
    a, b = await fleet_of_two(pool, gateways, b_config={"reconcile_interval_seconds": 1,
                                                        "serves": ("pbx2",)})
    hold = 30.0  # three slices; before the fix, gw-b settled it by estimate after ~20 s
    tasks, trunk = await place(p1, PHONES["pbx1"][:1], hold)
    await until_value(pool, ANSWERED, 1, 20, "pbx1")
    reconciled_before = len(b.log_events("reconciled"))
    results = await results_of(tasks)
    reconciled_during = len(b.log_events("reconciled")) - reconciled_before
    await trunk.result()
    held_to_the_end(results, hold)
    await until_value(pool, SETTLED, 1, 15, "pbx1")
    rows = await billed_exactly(pool, "pbx1", results)
    row = rows[PHONES["pbx1"][0]]
    assert row["settled_by"] in PBX_REPORTS, dict(row)  # by its owner, gw-a
    assert row["billed_seconds"] >= hold - 1 and row["funded_seconds"] >= hold, dict(row)
    assert reconciled_during >= 10, reconciled_during
    assert str(row["id"]) not in b.log_path.read_text(errors="replace")
    await all_quiet(p1)
    await assert_invariants(pool)


# 3 ------------------------------------------------------------------------------------

async def test_the_owner_killed_during_ten_calls_the_other_takes_the_lease_and_renews_them(
        pbxes, gateways, tenant, repo):
    pool = repo.pool
    p1 = pbxes["pbx1"]
    a, b = await fleet_of_two(pool, gateways)
    generation = (await leases(pool))["pbx1"]["generation"]
    phones = PHONES["pbx1"]
    hold = 25.0  # funded 10 s at answer; gw-a renews to 20 s, then gw-b to 30 s
    tasks, trunk = await place(p1, phones, hold)
    await until_value(pool, ANSWERED, len(phones), 30, "pbx1")
    await until_value(pool, "SELECT count(*) FROM calls WHERE pbx = 'pbx1'"
                      " AND state = 'answered' AND funded_seconds >= $1",
                      len(phones), 15, 2 * SLICE)
    killed = time.monotonic()
    await a.kill()
    await poll(lambda: _owner_is(pool, "pbx1", "gw-b"), 15, "gw-b owning pbx1")
    taken_in = time.monotonic() - killed

    async def adopted() -> bool:
        entry = (await b.pbx_status()).get("pbx1") or {}
        return entry.get("owned") is True and entry.get("live_calls") == len(phones)

    await poll(adopted, 15, "gw-b tracking the 10 calls of pbx1", every=0.2)
    adopted_in = time.monotonic() - killed
    print(f"pbx1 taken over {taken_in:.1f} s after the SIGKILL, its {len(phones)} calls "
          f"adopted after {adopted_in:.1f} s")
    results = await results_of(tasks)
    await trunk.result()
    held_to_the_end(results, hold)  # nobody cut at the 20 s gw-a had funded
    await until_value(pool, SETTLED, len(phones), 20, "pbx1")
    rows = await billed_exactly(pool, "pbx1", results)
    log = p1.log_text()
    for row in rows.values():
        assert row["funded_seconds"] >= hold, dict(row)  # renewed by gw-b
        # the hangup report found gw-a gone and went to gw-b
        assert f"reporting call {row['id']} to the backup" in log, dict(row)
    assert (await leases(pool))["pbx1"]["generation"] > generation
    await all_quiet(p1)
    await assert_invariants(pool)


async def _owner_is(pool: asyncpg.Pool, pbx: str, owner: str) -> bool:
    return (await lease_owners(pool)).get(pbx) == owner


# 4 ------------------------------------------------------------------------------------

async def test_a_restarted_process_does_not_take_its_lease_back_and_each_pbx_has_one_owner(
        pbxes, gateways, tenant, repo):
    pool = repo.pool
    gws = {name: gateways(name) for name in ("gw-a", "gw-b")}
    await asyncio.gather(*(gw.start() for gw in gws.values()))  # a race for both leases
    owners = await poll(lambda: _both_owned(pool), 20, "both PBXs owned")
    first = gws[owners["pbx1"]]
    other = gws["gw-b" if first.name == "gw-a" else "gw-a"]
    mine = sorted(p for p, o in owners.items() if o == first.name)
    killed = time.monotonic()
    await first.kill()
    await serving(pool, other, *mine, within=15)
    print(f"{mine} of {first.name} taken over by {other.name} "
          f"{time.monotonic() - killed:.1f} s after the SIGKILL")
    held = await leases(pool)
    await first.start()  # the same instance name, as after a crash and restart
    samples = 20
    for _ in range(samples):
        table = await leases(pool)
        status = {name: await gw.pbx_status() for name, gw in gws.items()}
        for pbx in ("pbx1", "pbx2"):
            row = table[pbx]
            assert row["live"] and row["owner"] == other.name, (pbx, row)
            assert row["generation"] == held[pbx]["generation"], (pbx, row, held[pbx])
            owning = [n for n, s in status.items() if (s.get(pbx) or {}).get("owned")]
            assert owning == [other.name], (pbx, status)
        assert first.running and other.running
        await asyncio.sleep(1)  # a sample a second
    await assert_invariants(pool)


async def _both_owned(pool: asyncpg.Pool) -> dict[str, str] | None:
    owners = await lease_owners(pool)
    return owners if {"pbx1", "pbx2"} <= owners.keys() else None


# 5 ------------------------------------------------------------------------------------

async def test_agi_fails_over_to_the_second_gateway_and_with_both_down_the_policy_applies(
        pbxes, gateways, tenant, repo):
    pool = repo.pool
    p1 = pbxes["pbx1"]
    # gw-a, which PBX 1 asks first, is not running: only gw-b is
    b = await gateways("gw-b").start()
    await serving(pool, b, "pbx1", "pbx2")
    caller, hold = PHONES["pbx1"][0], 4.0
    tasks, trunk = await place(p1, (caller,), hold)
    results = await results_of(tasks)
    await trunk.result()
    held_to_the_end(results, hold)  # no caller-visible failure
    assert results[caller].provisional_codes and \
        all(c < 200 for c in results[caller].provisional_codes), explain(results)
    await until_value(pool, SETTLED, 1, 15, "pbx1")
    row = (await rows_by_user(pool, [caller]))[caller]
    assert (row["pbx"], row["owner"]) == ("pbx1", "gw-b"), dict(row)
    await billed_exactly(pool, "pbx1", results)
    # the PBX asked gw-a first, then gw-b (which its hangup report then went to directly)
    first, second = p1.globals["GW_AGI"], p1.globals["GW_AGI_BACKUP"]
    assert f"gateway {first} unreachable - asking the backup {second}" in p1.log_text()
    # both down: the fail policy (closed: 503), and emergency still dials
    await b.kill()
    refused = await p1.call(PHONES["pbx1"][1], DOMESTIC, scenario="expect_error",
                            max_wait=20)
    assert refused.final_code == 503, refused.summary()
    emergency = await p1.uas("carrier", max_wait=20).started()
    sos = await p1.call(PHONES["pbx1"][2], EMERGENCY, hold=2, max_wait=20)
    reached = await emergency.result()
    assert sos.final_code == 200 and sos.bye_from == "phone", sos.summary()
    assert reached.invite is not None and EMERGENCY in reached.invite.first_line, \
        reached.summary()
    assert await pool.fetchval("SELECT count(*) FROM calls") == 1  # nobody was asked
    await all_quiet(p1)
    await assert_invariants(pool)


# 6 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_a_pbx_restart_settles_only_its_own_calls(pbxes, gateways, tenant, repo, how):
    """``stop``: Asterisk stops (``core stop now``): its hangup handlers report each call
    and cdr_pgsql writes its record; the two agree. ``crash``: SIGKILL, no report and no
    record: the owner finds the calls gone once the PBX is back and bills them up to the
    last moment it heard the crashed PBX alive (``reconcile-crash``): within 2 s of
    what the phones talked, not the time the PBX took to come back."""
    pool = repo.pool
    p1, p2 = pbxes["pbx1"], pbxes["pbx2"]
    # gw-b reconciles PBX 2 every 2 s, before, during and after its restart
    a, b = await fleet_of_two(pool, gateways, b_config={"reconcile_interval_seconds": 2})
    hold = 30.0
    tasks1, trunk1 = await place(p1, PHONES["pbx1"][:2], hold)
    tasks2, trunk2 = await place(p2, PHONES["pbx2"][:2], hold, max_wait=hold + 5)
    for name in ("pbx1", "pbx2"):
        await until_value(pool, ANSWERED, 2, 20, name)
    # PBX 2's calls talk a while first: down after their first renewal (7 s in)
    await until_value(pool, "SELECT count(*) FROM calls WHERE pbx = 'pbx2'"
                      " AND state = 'answered' AND funded_seconds >= $1", 2, 15, 2 * SLICE)
    down_at = time.time()
    await asyncio.to_thread(p2.restart, crash=how == "crash")
    p2.kill_sipps()  # its phones and carrier: their dialogs died with it
    await asyncio.gather(*tasks2.values(), return_exceptions=True)
    await trunk2.result(within=1)
    await until_value(pool, SETTLED, 2, 40, "pbx2")
    rows2 = await pool.fetch("SELECT * FROM calls WHERE pbx = 'pbx2'")
    print(f"pbx2's calls ({how}) settled {time.time() - down_at:.1f} s after it went down, "
          f"by {[r['settled_by'] for r in rows2]}, billed {[r['billed_seconds'] for r in rows2]}")
    # PBX 1's calls are still up and open, nobody settled them
    assert [r["state"] for r in await pool.fetch(
        "SELECT state FROM calls WHERE pbx = 'pbx1'")] == ["answered", "answered"]
    for row in rows2:
        talked = down_at - row["answered_at"].timestamp()  # until PBX 2 went down
        if how == "stop":
            cdr = await answered_cdr(pool, "pbx2", row)
            assert row["settled_by"] in (*PBX_REPORTS, "reconcile-cdr"), dict(row)
            assert abs(row["billed_seconds"] - cdr["billsec"]) <= 1, (dict(row), dict(cdr))
            assert abs(row["billed_seconds"] - talked) <= 1.5 and talked > 5, \
                (dict(row), talked)
        else:
            cdr = await pool.fetch("SELECT billsec FROM cdr WHERE pbx = 'pbx2'"
                                   " AND uniqueid = $1", row["pbx_uniqueid"])
            assert cdr == [], (dict(row), [dict(c) for c in cdr])
            # billed what the phone talked: from its 200 OK until the PBX died under it
            # (the phone itself was killed after, so it never saw a BYE)
            assert row["settled_by"] == "reconcile-crash", dict(row)
            phone = tasks2[row["user_id"]].result()
            assert phone.answered_at is not None, phone.summary()
            heard = down_at - phone.answered_at
            assert heard > 5 and abs(row["billed_seconds"] - heard) <= 2, \
                (dict(row), heard, talked)
            assert row["billed_seconds"] <= row["funded_seconds"], dict(row)
    results1 = await results_of(tasks1)
    await trunk1.result()
    held_to_the_end(results1, hold)
    await until_value(pool, SETTLED, 2, 15, "pbx1")
    rows1 = await billed_exactly(pool, "pbx1", results1)
    assert all(r["settled_by"] in PBX_REPORTS for r in rows1.values()), \
        [dict(r) for r in rows1.values()]
    await serving(pool, b, "pbx2")  # its AMI link back to the restarted PBX
    await all_quiet(p1, p2)
    await assert_invariants(pool)
