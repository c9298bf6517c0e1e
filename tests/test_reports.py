"""The forecast and the month export against the real PostgreSQL, with calls rated by the
real rater: the export agrees with the ledger to the last decimal (per call, per user,
per pool, per add-on, for the wallet), as JSON and CSV, through the API (read token)
and the CLI; the forecast is what the forecast's arithmetic makes of the ledger's
charges, through the API and the CLI."""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import io
import json
from decimal import Decimal
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway import cli
from gateway.billing import reports
from gateway.rating import forecast as fc
from tests.support.gateway import ADMIN, READ, running_gateway
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant
from tests.support.traffic import month_of_traffic

pytestmark = pytest.mark.db

NOVEMBER = dt.date(2026, 11, 1)
TORONTO = ZoneInfo("America/Toronto")


async def ledger_charges(repo, month):
    """The month's charges by the ledger alone: per call and source, per pool, per add-on
    and for the wallet (money as the negated balance deltas)."""
    rows = await repo.pool.fetch(
        "SELECT call_id, account, country, user_id, d_used_seconds, d_balance FROM ledger"
        " WHERE tenant_id = $1 AND entry = 'charge' AND month = $2", TENANT, month)
    per_call = collections.defaultdict(lambda: {"pool": 0, "addon": 0, "wallet": Decimal(0)})
    pools, addons = collections.Counter(), collections.Counter()
    wallet = Decimal(0)
    for r in rows:
        if r["account"] == "wallet":
            per_call[r["call_id"]]["wallet"] += -r["d_balance"]
            wallet += -r["d_balance"]
        else:
            per_call[r["call_id"]][r["account"]] += r["d_used_seconds"]
            (pools if r["account"] == "pool" else addons)[
                r["country"] if r["account"] == "pool" else r["user_id"]] += r["d_used_seconds"]
    return per_call, pools, addons, wallet


async def cli_run(tmp_path, database_url, *argv):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    out, err = io.StringIO(), io.StringIO()
    rc = await cli.run(list(argv), config_path=str(config), environ={}, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


async def test_a_months_export_agrees_with_the_ledger(admin, rater, clock, views, repo,
                                                      database_url, tmp_path):
    traffic = await month_of_traffic(admin, rater, clock)
    await ledger_agrees(repo)
    export = await views.month_export(TENANT, NOVEMBER)

    # the month's calls, and only them
    assert {c.id for c in export.calls} == set(traffic.calls)
    assert not set(traffic.outside) & {c.id for c in export.calls}
    assert export.open_calls == len(traffic.open_calls) >= 1
    # every funding source and kind of call is there
    sources = collections.Counter(s for c in export.calls for s in c.sources)
    assert sources["pool"] and sources["addon"] and sources["wallet"] > 20, sources
    reasons = collections.Counter((c.direction, c.reason) for c in export.calls)
    assert reasons[("inbound", "FUNDED")] > 10 and reasons[("outbound", "PARTNER")] > 5
    assert reasons[("outbound", "NO_LICENSE")] and reasons[("outbound", "NO_RATE")]
    assert any(c.pool_seconds and c.wallet_seconds for c in export.calls), \
        "no call moved from the pool to the wallet"
    assert any(c.addon_seconds and c.wallet_seconds for c in export.calls), \
        "no call moved from the add-on to the wallet"

    per_call, pools, addons, wallet = await ledger_charges(repo, NOVEMBER)
    # per call: what each source was charged is what the ledger says
    for c in export.calls:
        ledger = per_call.get(c.id, {"pool": 0, "addon": 0, "wallet": Decimal(0)})
        assert (c.pool_seconds, c.addon_seconds, c.wallet_amount) == (
            ledger["pool"], ledger["addon"], ledger["wallet"]), c
        assert c.charged_amount == c.wallet_amount
        if c.sources:  # a rated call: its billed time came from its sources
            assert c.pool_seconds + c.addon_seconds + c.wallet_seconds == c.billed_seconds
        else:  # internal, partner, free toll-free: billed, not funded
            assert (c.pool_seconds, c.addon_seconds, c.wallet_seconds) == (0, 0, 0)
    # per pool, add-on and the wallet
    assert {p.country: p.used_seconds for p in export.pools} == dict(pools)
    assert {a.user_id: a.used_seconds for a in export.addons} == dict(addons)
    assert export.wallet.charged == wallet > Decimal("5")
    pool_row = await repo.pool.fetchrow(
        "SELECT used_seconds FROM pools WHERE tenant_id = $1 AND month = $2", TENANT,
        NOVEMBER)
    assert export.pools[0].used_seconds == pool_row["used_seconds"] == 40 * 60 * 2
    # per user: the users' totals add up to the month's
    assert sum((u.wallet_amount for u in export.users), Decimal(0)) == wallet
    assert sum(u.pool_seconds for u in export.users) == sum(pools.values())
    assert sum(u.calls for u in export.users) == len(export.calls)
    assert {u.user_id for u in export.users} >= {"alice", "bob", "dave", "carol", None}
    # top-ups and recharges made during the month (Toronto time): the mid-month top-up
    # (the first 5.00 was in October) and the recharges the ledger holds
    start, end = reports.month_bounds(NOVEMBER, TORONTO)
    moved = {r["entry"]: r for r in await repo.pool.fetch(
        "SELECT entry, sum(d_balance) AS amount, count(*) AS n FROM ledger"
        " WHERE tenant_id = $1 AND account = 'wallet' AND entry IN ('topup', 'recharge')"
        " AND at >= $2 AND at < $3 GROUP BY entry", TENANT, start, end)}
    assert export.wallet.topups == moved["topup"]["amount"] == Decimal("10")
    assert export.wallet.recharges == moved["recharge"]["amount"] == Decimal("15")
    assert export.wallet.recharge_count == 3

    # the CSV says the same, to the last decimal
    rows = list(csv.DictReader(io.StringIO(reports.export_csv(export))))
    assert list(rows[0]) == reports.CSV_COLUMNS
    call_rows = [r for r in rows if r["record"] == "call"]
    assert len(call_rows) == len(export.calls)
    assert sum((Decimal(r["wallet_amount"]) for r in call_rows), Decimal(0)) == wallet
    (wallet_row,) = [r for r in rows if r["record"] == "wallet"]
    assert Decimal(wallet_row["wallet_amount"]) == wallet
    assert Decimal(wallet_row["topups"]) == 10 and Decimal(wallet_row["recharges"]) == 15
    assert {r["pool_country"]: int(r["pool_seconds"]) for r in rows
            if r["record"] == "pool"} == dict(pools)
    assert {r["user_id"]: int(r["addon_seconds"]) for r in rows
            if r["record"] == "addon"} == dict(addons)
    user_rows = {r["user_id"]: r for r in rows if r["record"] == "user"}
    for u in export.users:
        assert Decimal(user_rows[u.user_id or ""]["wallet_amount"]) == u.wallet_amount

    # the API (with the read token) and the CLI give the same export
    async with running_gateway(database_url) as gw, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gw.http_port}/api/v1/tenants/{TENANT}"
        auth = {"Authorization": f"Bearer {READ}"}
        async with http.get(f"{base}/export?month=2026-11", headers=auth) as r:
            assert r.status == 200
            body = await r.json()
        async with http.get(f"{base}/export.csv?month=2026-11", headers=auth) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            assert f'filename="{TENANT}-2026-11.csv"' in r.headers["Content-Disposition"]
            api_csv = await r.text()
        async with http.get(f"{base}/export?month=2026-13", headers=auth) as r:
            assert r.status == 422 and (await r.json())["error"]["code"] == "INVALID_MONTH"
        async with http.get(f"{base}/export", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
    assert Decimal(body["wallet"]["charged"]) == wallet
    assert len(body["calls"]) == len(export.calls)
    assert api_csv.replace("\r\n", "\n") == reports.export_csv(export)
    rc, out, err = await cli_run(tmp_path, database_url, "export", TENANT, "--month",
                                 "2026-11")
    assert rc == 0, err
    # the CLI's clock is the machine's: only generated_at differs, and the CSV has none
    assert out == reports.export_csv(export)
    target = tmp_path / "nov.json"
    rc, out, err = await cli_run(tmp_path, database_url, "export", TENANT, "--month",
                                 "2026-11", "--json", "--output", str(target))
    assert rc == 0 and f"{len(export.calls)} calls written" in out, err
    saved = json.loads(target.read_text())
    assert Decimal(saved["wallet"]["charged"]) == wallet
    assert [c["id"] for c in saved["calls"]] == [str(c.id) for c in export.calls]
    rc, _, err = await cli_run(tmp_path, database_url, "export", "nobody", "--month",
                               "2026-11")
    assert rc == 1 and "UNKNOWN_TENANT" in err


async def test_the_forecast_reads_the_ledgers_burn_rate(admin, rater, clock, views, repo,
                                                        database_url, tmp_path):
    # two weeks of weekday traffic, then the forecast on 16 November, 12:00 Toronto
    traffic = await month_of_traffic(admin, rater, clock, calls=160,
                                     first=dt.datetime(2026, 11, 2, 14, tzinfo=dt.UTC),
                                     days=14)
    clock.now = dt.datetime(2026, 11, 17, 17, tzinfo=dt.UTC)
    for call_id in traffic.open_calls:
        await rater.release(call_id)
    f = await views.forecast(TENANT)
    assert f.month == NOVEMBER and f.generated_at == clock.now
    by = {(a.account, a.item): a for a in f.accounts}
    assert set(by) == {("pool", "CA"), ("addon", "bob"), ("wallet", "USD")}
    pool, addon, wallet = by["pool", "CA"], by["addon", "bob"], by["wallet", "USD"]

    # the pool: 80 minutes, used up by the traffic
    assert pool.capacity == 4800 and pool.used == 4800 and pool.remaining == 0
    assert pool.status == "exhausted" and pool.runs_out_at == clock.now
    # the history ends at what is used; the projection starts there
    assert pool.history[-1].value == 4800 and pool.projection[0].value == 4800
    assert pool.projection[-1].at == reports.month_bounds(NOVEMBER, TORONTO)[1]
    assert [p.value for p in pool.history] == sorted(p.value for p in pool.history)

    # the wallet: what the arithmetic makes of the ledger's charges
    rows = await repo.pool.fetch(
        "SELECT at, -d_balance AS amount FROM ledger WHERE tenant_id = $1"
        " AND account = 'wallet' AND entry = 'charge'", TENANT)
    burns = [fc.Burn(r["at"], r["amount"]) for r in rows]
    first = await repo.pool.fetchval("SELECT min(at) FROM ledger WHERE tenant_id = $1",
                                     TENANT)
    w = await repo.pool.fetchrow("SELECT balance - reserved AS available FROM wallets"
                                 " WHERE tenant_id = $1", TENANT)
    expected = fc.outlook(burns, w["available"], start=first, now=clock.now,
                          horizon=clock.now + reports.WALLET_HORIZON, tz=TORONTO)
    assert wallet.remaining == w["available"] > 0
    assert wallet.basis == expected.rate.basis == "hour_of_week"  # 16 days of history
    assert wallet.burn_per_day == expected.rate.per_day.quantize(reports.MONEY_QUANTUM) > 0
    assert wallet.status == "runs_out"
    assert wallet.runs_out_at == expected.runs_out_at
    assert clock.now < wallet.runs_out_at < clock.now + dt.timedelta(days=60)
    assert wallet.runs_out_on == wallet.runs_out_at.astimezone(TORONTO).date()
    assert addon.capacity == 900 and addon.status in ("exhausted", "runs_out", "lasts")

    # the API (read token) and the CLI say the same
    async with running_gateway(database_url) as gw, aiohttp.ClientSession() as http:
        gw.views.clock = lambda: clock.now
        url = f"http://127.0.0.1:{gw.http_port}/api/v1/tenants/{TENANT}/forecast"
        async with http.get(url, headers={"Authorization": f"Bearer {READ}"}) as r:
            assert r.status == 200
            body = await r.json()
        async with http.get(url.replace(TENANT, "nobody"),
                            headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 404
    api_wallet = next(a for a in body["accounts"] if a["account"] == "wallet")
    assert api_wallet["runs_out_at"] == wallet.runs_out_at.isoformat()
    assert api_wallet["status"] == "runs_out" and api_wallet["basis"] == "hour_of_week"
    rc, out, err = await cli_run(tmp_path, database_url, "forecast", TENANT)
    assert rc == 0, err
    assert "pool" in out and "wallet" in out and "hour of week" in out
    rc, out, err = await cli_run(tmp_path, database_url, "forecast", TENANT, "--json")
    assert rc == 0 and json.loads(out)["tenant_id"] == TENANT, err


async def test_calls_filters(admin, rater, clock, views, repo, database_url):
    await standard_tenant(admin, wallet="5.00")
    clock.now = dt.datetime(2026, 11, 10, 15, tzinfo=dt.UTC)
    await rater.authorise_outbound("alice", "4165550123")
    await rater.authorise_outbound("carol", "4165550123")  # NO_LICENSE
    clock.now = dt.datetime(2026, 11, 12, 4, 30, tzinfo=dt.UTC)  # 11 November, Toronto
    await rater.authorise_outbound("bob", "4165550123")
    await rater.authorise_inbound("+18005550199", "2125550100")

    async def who(**kw):
        return sorted((c.user_id or "-", c.direction[:2], c.decision)
                      for c in await views.calls(TENANT, None, 100, **kw))

    assert len(await who()) == 4
    assert await who(user_id="alice") == [("alice", "ou", "ALLOW")]
    assert await who(decision="REJECT") == [("carol", "ou", "REJECT")]
    assert [c[1] for c in await who(direction="inbound")] == ["in"]
    assert [c[0] for c in await who(first_day=dt.date(2026, 11, 11))] == ["-", "bob"]
    assert len(await who(last_day=dt.date(2026, 11, 10))) == 2
    assert len(await who(first_day=dt.date(2026, 11, 11), last_day=dt.date(2026, 11, 11))) == 2
    assert await who(first_day=dt.date(2026, 11, 12)) == []
    async with running_gateway(database_url) as gw, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gw.http_port}/api/v1/tenants/{TENANT}/calls"
        auth = {"Authorization": f"Bearer {READ}"}
        async with http.get(base + "?user_id=bob&from=2026-11-11&to=2026-11-11",
                            headers=auth) as r:
            assert r.status == 200
            assert [c["user_id"] for c in (await r.json())["calls"]] == ["bob"]
        for query, code in (("direction=sideways", "INVALID_DIRECTION"),
                            ("decision=allow", "INVALID_DECISION"),
                            ("from=2026-02-30", "INVALID_DATE"), ("to=11/11/2026", "INVALID_DATE"),
                            ("user_id=", "INVALID_ID")):
            async with http.get(f"{base}?{query}", headers=auth) as r:
                assert r.status == 422, query
                assert (await r.json())["error"]["code"] == code
        # a read token reads, never writes
        async with http.post(f"http://127.0.0.1:{gw.http_port}/api/v1/tenants/{TENANT}"
                             "/wallet/topups", json={"amount": "1"}, headers=auth) as r:
            assert r.status == 401



async def test_the_csv_never_hands_a_spreadsheet_a_formula(admin, rater, views):
    """An inbound caller id comes from outside (a SIP From header): a caller of
    ``=HYPERLINK(…)`` or ``+cmd|…`` is written as text, with a leading apostrophe, while
    E.164 numbers and amounts stay as they are."""
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "2125550100")
    await rater.settle(d.call_id, 61)
    export = await views.month_export(TENANT, NOVEMBER)
    (call,) = export.calls
    hostile = ['=HYPERLINK("http://x.invalid","y")', "+cmd|' /C calc'!A0", "@SUM(1)",
               "-2+3", "\t=1"]
    calls = [dataclasses.replace(call, caller=c) for c in hostile]
    rows = list(csv.DictReader(io.StringIO(
        reports.export_csv(dataclasses.replace(export, calls=calls)))))
    assert [r["caller"] for r in rows if r["record"] == "call"] == ["'" + c for c in hostile]
    plain = [r for r in csv.DictReader(io.StringIO(reports.export_csv(export)))
             if r["record"] == "call"]
    assert plain[0]["destination"] == call.destination and \
        plain[0]["destination"].startswith("+1")
    assert plain[0]["caller"] == call.caller
