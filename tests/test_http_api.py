"""The admin REST API of a real, started gateway against the real PostgreSQL: every
endpoint, the tokens, bad payloads (4xx naming the field, nothing written), money as
strings, the JSON error middleware and the OpenAPI document."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.billing import schemas as s
from gateway.billing import views
from gateway.billing.provisioning import Provisioning
from gateway.errors import InvalidInput
from gateway.http import api
from gateway.http.openapi import document
from gateway.store.repository import Repository
from tests.support.database import TABLES, dump_tables
from tests.support.gateway import ADMIN, NOW, READ, running_gateway
from tests.support.http import Client, floats_in
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
async def gw(database_url):
    async with running_gateway(database_url) as gateway:
        yield gateway


@pytest.fixture
async def client(gw):
    async with aiohttp.ClientSession() as session:
        yield Client(session, gw.http_port)


@pytest.fixture
async def acme(admin):
    """The standard tenant (4 users, numbers, rates) and 20.00 in its wallet."""
    await standard_tenant(admin, wallet="20.00")
    return admin


def _concrete(path: str) -> str:
    return (path.replace("{tenant_id}", TENANT).replace("{user_id}", "alice")
            .replace("{sku}", "business_voice").replace("{e164}", "+15145550100")
            .replace("{country}", "CA").replace("{plan}", "domestic")
            .replace("{alert_id}", "1").replace("{webhook_id}", "1")
            .replace("{delivery_id}", "00000000-0000-4000-8000-000000000001"))


# ---- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", READ, f"{ADMIN}x", ADMIN[:-1]])
async def test_every_admin_route_refuses_a_missing_or_wrong_token(client, acme, db_pool,
                                                                  token):
    before = await dump_tables(db_pool)
    for method, path, handler in api.ROUTES:
        if token == READ and handler.operation.read:
            continue  # reads take the read token (test_reports, test_web_page)
        r = await client(method, api.PREFIX + _concrete(path), {"quantity": 1}, token=token)
        assert r.status == 401, (method, path, r.body)
        assert r.error["code"] == "UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert await dump_tables(db_pool) == before


async def test_other_schemes_and_empty_bearer_are_refused(client, acme):
    for header in (f"Basic {ADMIN}", "Bearer ", ADMIN, f"Token {ADMIN}"):
        async with client.session.get(client.base + "/api/v1/tenants",
                                      headers={"Authorization": header}) as r:
            assert r.status == 401, header
            assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
    async with client.session.get(client.base + "/api/v1/tenants",
                                  headers={"Authorization": f"bearer  {ADMIN}"}) as r:
        assert r.status == 200  # the scheme is case-insensitive (RFC 7235)


async def test_admin_api_is_off_without_an_admin_token(database_url, acme, db_pool):
    async with running_gateway(database_url, admin_token="") as gw, \
            aiohttp.ClientSession() as session:
        client = Client(session, gw.http_port)
        before = await dump_tables(db_pool)
        for token in (None, "", "anything"):
            for method, path, _ in api.ROUTES:
                r = await client(method, api.PREFIX + _concrete(path), {"quantity": 1},
                                 token=token)
                assert r.status == 503, (method, path)
                assert r.error["code"] == "ADMIN_API_DISABLED"
        assert await dump_tables(db_pool) == before
        # the description of the API stays readable
        r = await client("GET", "/api/v1/openapi.json", token=None)
        assert r.status == 200 and r.body["openapi"] == "3.1.0"


# ---- tenants and subscriptions ------------------------------------------------------------


async def test_tenant_create_read_list_patch(client, repo):
    r = await client("POST", "/api/v1/tenants", {"id": "globex", "name": "Globex",
                                                 "country": "US", "timezone": "America/Chicago"})
    assert r.status == 201, r.body
    assert r.headers["Location"] == "/api/v1/tenants/globex"
    assert r.body["id"] == "globex" and r.body["currency"] == "USD"
    assert r.body["blocked_classes"] == ["premium_rate"]
    assert r.body["subscriptions"] == []
    assert (await repo.get_wallet("globex"))["balance"] == 0  # the wallet came with it

    again = await client("POST", "/api/v1/tenants", {"id": "globex", "name": "Globex 2",
                                                     "country": "US"})
    assert again.status == 409 and again.error["code"] == "DUPLICATE"

    r = await client("GET", "/api/v1/tenants")
    assert [t["id"] for t in r.body["tenants"]] == ["globex"]
    r = await client("GET", "/api/v1/tenants/globex")
    assert r.status == 200 and r.body["name"] == "Globex"
    r = await client("GET", "/api/v1/tenants/nope")
    assert r.status == 404 and r.error["code"] == "UNKNOWN_TENANT"

    r = await client("PATCH", "/api/v1/tenants/globex",
                     {"name": "Globex Corp", "blocked_classes": ["premium_rate", "international"],
                      "timezone": "UTC"})
    assert r.status == 200, r.body
    row = await repo.find_tenant("globex")
    assert (row["name"], row["timezone"], sorted(row["blocked_classes"])) == (
        "Globex Corp", "UTC", ["international", "premium_rate"])
    r = await client("PATCH", "/api/v1/tenants/nope", {"name": "X"})
    assert r.status == 404


async def test_subscriptions(client, acme):
    r = await client("PUT", f"/api/v1/tenants/{TENANT}/subscriptions/business_voice",
                     {"quantity": 5})
    assert r.status == 200, r.body
    subs = {s["sku"]: s for s in r.body["subscriptions"]}
    assert subs["business_voice"] == {"sku": "business_voice", "quantity": 5, "assigned": 1}
    r = await client("GET", f"/api/v1/tenants/{TENANT}/subscriptions")
    assert {s["sku"]: s["quantity"] for s in r.body["subscriptions"]}["business_voice"] == 5
    # alice and bob hold the Calling Plan: the purchase cannot drop below 2
    r = await client("PUT", f"/api/v1/tenants/{TENANT}/subscriptions/"
                     "business_voice_calling_plan", {"quantity": 1})
    assert r.status == 409 and r.error["code"] == "LICENCES_IN_USE"
    assert r.error["field"] == "quantity"


# ---- users and licences -------------------------------------------------------------------


async def test_user_lifecycle_and_licences(client, acme, repo):
    r = await client("POST", f"/api/v1/tenants/{TENANT}/users",
                     {"id": "erin", "sip_endpoint": "erin", "usage_location": "CA",
                      "extension": "105", "display_name": "Erin"})
    assert r.status == 201, r.body
    assert r.body["licences"] == [] and r.body["tenant_id"] == TENANT
    r = await client("GET", f"/api/v1/tenants/{TENANT}/users")
    assert [u["id"] for u in r.body["users"]] == ["alice", "bob", "carol", "dave", "erin"]
    assert r.body["users"][1]["licences"] == ["business_voice_calling_plan",
                                              "international_calling_plan"]
    assert (await client("GET", "/api/v1/tenants/nope/users")).status == 404

    r = await client("PATCH", "/api/v1/users/erin", {"display_name": "Erin B.",
                                                     "extension": None})
    assert r.status == 200 and r.body["display_name"] == "Erin B."
    assert r.body["extension"] is None

    r = await client("PUT", "/api/v1/users/erin/licences/business_voice_calling_plan")
    assert r.status == 200, r.body
    assert r.body["licences"] == ["business_voice_calling_plan"]
    r = await client("PUT", "/api/v1/users/erin/licences/business_voice_calling_plan")
    assert r.status == 200  # assigning what is held changes nothing
    r = await client("PUT", "/api/v1/users/erin/licences/business_voice")
    assert r.status == 409 and r.error["code"] == "LICENCE_CONFLICT"
    r = await client("DELETE", "/api/v1/users/erin/licences/business_voice_calling_plan")
    assert r.status == 200 and r.body["licences"] == []
    r = await client("DELETE", "/api/v1/users/erin/licences/business_voice_calling_plan")
    assert r.status == 404 and r.error["code"] == "LICENCE_NOT_ASSIGNED"

    r = await client("GET", "/api/v1/users/erin")
    assert r.status == 200 and r.body["sip_endpoint"] == "erin"
    r = await client("DELETE", "/api/v1/users/erin")
    assert r.status == 204 and r.body is None
    assert await repo.find_user("erin") is None
    r = await client("DELETE", "/api/v1/users/erin")
    assert r.status == 404 and r.error["code"] == "UNKNOWN_USER"
    assert (await client("GET", "/api/v1/users/erin")).status == 404


async def test_deleting_a_user_deactivates_it_and_keeps_its_history(client, acme, rater, repo,
                                                                    db_pool):
    # issue 8 item 4: DELETE cascaded to the user's add-on counter, so re-creating the
    # user gave the month's used add-on minutes back, and its open calls could no longer
    # be settled
    uk = "+442079460000"

    async def addon_used() -> dict[str, int]:
        r = await client("GET", f"/api/v1/tenants/{TENANT}/usage")
        return {a["user_id"]: a["used_seconds"] for a in r.body["international_addon"]}

    talked = await rater.authorise_outbound("bob", uk)
    await rater.settle(talked.call_id, 290)  # 300 s of add-on minutes used
    still_up = await rater.authorise_outbound("bob", uk)
    assert still_up.allow and still_up.funded_seconds
    r = await client("DELETE", "/api/v1/users/bob")
    assert r.status == 409 and r.error["code"] == "USER_HAS_OPEN_CALLS", r.body
    assert (await client("GET", "/api/v1/users/bob")).body["licences"] == [
        "business_voice_calling_plan", "international_calling_plan"]
    await rater.settle(still_up.call_id, 50)  # the open call settles as usual
    assert await addon_used() == {"bob": 360}

    assert (await client("DELETE", "/api/v1/users/bob")).status == 204
    assert (await client("GET", "/api/v1/users/bob")).status == 404
    r = await client("DELETE", "/api/v1/users/bob")
    assert r.status == 404 and r.error["code"] == "UNKNOWN_USER"
    # the history stays: calls, counters (shown while the month lasts), ledger
    assert await addon_used() == {"bob": 360}
    assert len(await repo.pool.fetch("SELECT 1 FROM calls WHERE user_id = 'bob'")) == 2
    # a deactivated user is an unknown caller, and no internal destination any more
    d = await rater.authorise_outbound("bob", uk)
    assert (d.allow, d.reason.value) == (False, "UNKNOWN_CALLER")
    assert (await rater.authorise_outbound("alice", "102")).reason.value != "INTERNAL"
    # its licences went back to the tenant; the database refuses to delete the row
    r = await client("GET", f"/api/v1/tenants/{TENANT}/subscriptions")
    assigned = {x["sku"]: x["assigned"] for x in r.body["subscriptions"]}
    assert assigned["international_calling_plan"] == 0
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db_pool.execute("DELETE FROM users WHERE id = 'bob'")

    # its id in another tenant is refused; in its own tenant it reactivates the user
    await client("POST", "/api/v1/tenants", {"id": "other", "name": "Other", "country": "CA"})
    r = await client("POST", "/api/v1/tenants/other/users",
                     {"id": "bob", "sip_endpoint": "bob2", "usage_location": "CA"})
    assert r.status == 409 and r.error["code"] == "USER_OF_OTHER_TENANT", r.body
    r = await client("POST", f"/api/v1/tenants/{TENANT}/users",
                     {"id": "bob", "sip_endpoint": "bob", "usage_location": "CA",
                      "extension": "102"})
    assert r.status == 201 and r.body["licences"] == [], r.body
    r = await client("POST", f"/api/v1/tenants/{TENANT}/users",
                     {"id": "bob", "sip_endpoint": "bob", "usage_location": "CA"})
    assert r.status == 409 and r.error["code"] == "DUPLICATE"
    for sku in ("business_voice_calling_plan", "international_calling_plan"):
        assert (await client("PUT", f"/api/v1/users/bob/licences/{sku}")).status == 200
    assert await addon_used() == {"bob": 360}  # not given back
    again = await rater.authorise_outbound("bob", uk)
    await rater.settle(again.call_id, 60)
    assert await addon_used() == {"bob": 420}
    await ledger_agrees(repo)


async def test_licences_never_exceed_the_purchase(client, acme, repo):
    # 2 business_voice bought, dave holds one: carol may take the second, erin none
    await acme.create_user("erin", TENANT, "erin", "CA")
    assert (await client("PUT", "/api/v1/users/carol/licences/business_voice")).status == 200
    r = await client("PUT", "/api/v1/users/erin/licences/business_voice")
    assert r.status == 409 and r.error["code"] == "LICENCE_LIMIT" and r.error["field"] == "sku"
    assert (await repo.find_user("erin"))["licences"] == []


# ---- numbers ----------------------------------------------------------------------------


async def test_numbers(client, acme, repo):
    r = await client("POST", f"/api/v1/tenants/{TENANT}/numbers",
                     {"e164": "+15145550177", "kind": "user", "user_id": "bob"})
    assert r.status == 201, r.body
    assert r.body == {"e164": "+15145550177", "tenant_id": TENANT, "kind": "user",
                      "user_id": "bob", "target": None}
    r = await client("POST", f"/api/v1/tenants/{TENANT}/numbers",
                     {"e164": "+15145550177", "kind": "service", "target": "bob"})
    assert r.status == 409 and r.error["code"] == "DUPLICATE"
    r = await client("GET", f"/api/v1/tenants/{TENANT}/numbers")
    assert "+15145550177" in [n["e164"] for n in r.body["numbers"]]
    assert len(r.body["numbers"]) == 4

    assert (await client("DELETE", "/api/v1/numbers/+15145550177")).status == 204
    assert (await client("DELETE", "/api/v1/numbers/%2B18005550199")).status == 204
    assert await repo.find_inbound_number("+15145550177") is None
    assert await repo.find_inbound_number("+18005550199") is None
    r = await client("DELETE", "/api/v1/numbers/+15145550177")
    assert r.status == 404 and r.error["code"] == "UNKNOWN_NUMBER"


async def test_deleting_a_number_leaves_its_calls_whole(client, acme, rater, repo):
    # a number bears no history (issue 8 item 4): a toll-free call still up on it
    # settles after the number is gone, and the calls keep the number they went to
    call = await rater.authorise_inbound("+18005550199", "2125550100")
    assert call.allow and call.funded_seconds
    assert (await client("DELETE", "/api/v1/numbers/+18005550199")).status == 204
    await rater.settle(call.call_id, 61)
    row = await repo.find_call(call.call_id)
    assert (row["state"], row["destination"], row["charged_amount"]) == (
        "settled", "+18005550199", Decimal("0.06"))
    await ledger_agrees(repo)


# ---- rates and allotments ---------------------------------------------------------------


async def test_rates_json_csv_and_listing(client, acme, repo):
    r = await client("POST", "/api/v1/rates", [
        {"kind": "international", "prefix": "33", "price_per_minute": "0.045",
         "description": "France"},
        {"kind": "international", "prefix": "+49", "price_per_minute": "0.05",
         "first_increment": 30, "increment": 6},
    ])
    assert r.status == 200 and r.body == {"tenant_id": None, "count": 2}
    csv_text = "kind,prefix,price_per_minute,increment\ninternational,33,0.03,1\n" \
               "international,81,0.07,\n"
    r = await client("POST", f"/api/v1/rates/import?tenant_id={TENANT}", raw=csv_text,
                     content_type="text/csv")
    assert r.status == 200 and r.body == {"tenant_id": TENANT, "count": 2}, r.body

    r = await client("GET", "/api/v1/rates")
    rates = {(x["kind"], x["prefix"]): x for x in r.body["rates"]}
    assert rates[("international", "33")]["price_per_minute"] == "0.045000"
    assert rates[("international", "49")]["first_increment"] == 30
    assert ("international", "81") not in rates  # that one is the tenant's own
    r = await client("GET", f"/api/v1/rates?tenant_id={TENANT}")
    own = {x["prefix"]: x for x in r.body["rates"]}
    assert own["33"]["price_per_minute"] == "0.030000" and own["33"]["increment"] == 1
    assert own["81"]["increment"] == 60
    assert (await client("GET", "/api/v1/rates?tenant_id=nope")).status == 404
    # a rate sheet replaces prices in place
    await client("POST", "/api/v1/rates", [{"kind": "international", "prefix": "33",
                                            "price_per_minute": "0.04"}])
    rows = [x for x in await repo.list_rates(None) if x["prefix"] == "33"]
    assert [x["price_per_minute"] for x in rows] == [Decimal("0.04")]


async def test_allotments(client, repo):
    r = await client("PUT", "/api/v1/allotments/GB/international", {"minutes": 450})
    assert r.status == 200 and r.body == {"country": "GB", "plan": "international",
                                          "minutes": 450}
    r = await client("GET", "/api/v1/allotments")
    assert {"country": "GB", "plan": "international", "minutes": 450} in r.body["allotments"]
    assert {"country": "CA", "plan": "domestic", "minutes": 3000} in r.body["allotments"]


# ---- wallet, usage, calls ---------------------------------------------------------------


async def test_wallet_topup_and_auto_recharge(client, acme, repo):
    r = await client("POST", f"/api/v1/tenants/{TENANT}/wallet/topups",
                     {"amount": "12.50", "note": "invoice 42"})
    assert r.status == 201, r.body
    assert r.body == {"tenant_id": TENANT, "amount": "12.50", "balance": "32.500000"}
    r = await client("PUT", f"/api/v1/tenants/{TENANT}/wallet/auto-recharge",
                     {"enabled": True, "threshold": "5", "amount": "25.00", "monthly_cap": 2})
    assert r.status == 200, r.body
    assert r.body["auto_recharge"]["enabled"] is True
    assert r.body["auto_recharge"]["amount"] == "25.000000"
    r = await client("GET", f"/api/v1/tenants/{TENANT}/wallet")
    assert r.status == 200
    assert (r.body["balance"], r.body["reserved"], r.body["available"]) == (
        "32.500000", "0.000000", "32.500000")
    assert r.body["currency"] == "USD" and r.body["month"] == "2026-11-01"
    assert [(e["entry"], e["d_balance"], e["note"]) for e in r.body["recent_entries"]] == [
        ("topup", "12.500000", "invoice 42"), ("topup", "20.000000", "manual top-up")]
    assert floats_in(r.body) == []
    ledger = await repo.ledger(TENANT)
    assert [x["d_balance"] for x in ledger if x["entry"] == "topup"] == [Decimal("12.5"),
                                                                        Decimal("20")]
    r = await client("POST", "/api/v1/tenants/nope/wallet/topups", {"amount": "1"})
    assert r.status == 404 and r.error["code"] == "UNKNOWN_TENANT"
    assert (await client("GET", "/api/v1/tenants/nope/wallet")).status == 404


async def test_usage_and_calls(client, acme, rater, repo):
    allowed = await rater.authorise_outbound("alice", "+15145550123")
    refused = await rater.authorise_outbound("carol", "+15145550123")
    assert allowed.allow and not refused.allow
    await rater.settle(allowed.call_id, 61)

    r = await client("GET", f"/api/v1/tenants/{TENANT}/usage?month=2026-11")
    assert r.status == 200, r.body
    assert r.body["month"] == "2026-11-01"
    pool = r.body["pools"][0]
    assert pool["country"] == "CA" and pool["capacity_minutes"] == "6000.00"
    assert pool["used_seconds"] == 120 and pool["used_minutes"] == "2.00"
    assert r.body["wallet"]["balance"] == "20.000000"
    assert floats_in(r.body) == []
    r = await client("GET", f"/api/v1/tenants/{TENANT}/usage")  # the tenant's current month
    assert r.body["pools"][0]["used_seconds"] == 120
    r = await client("GET", f"/api/v1/tenants/{TENANT}/usage?month=2026-10")
    assert r.body["pools"][0]["used_seconds"] == 0

    r = await client("GET", f"/api/v1/tenants/{TENANT}/calls?month=2026-11")
    assert r.status == 200
    by_id = {c["id"]: c for c in r.body["calls"]}
    assert set(by_id) == {str(allowed.call_id), str(refused.call_id)}
    assert by_id[str(allowed.call_id)]["state"] == "settled"
    assert by_id[str(allowed.call_id)]["billed_seconds"] == 120
    assert by_id[str(refused.call_id)]["reason"] == "NO_LICENSE"
    # the view names its fields: internal columns (the owning process) stay internal
    assert "owner" not in by_id[str(allowed.call_id)]
    assert by_id[str(allowed.call_id)]["authorised_at"].startswith("2026-11-15T12:00:00")
    r = await client("GET", f"/api/v1/tenants/{TENANT}/calls?limit=1")
    assert len(r.body["calls"]) == 1
    r = await client("GET", f"/api/v1/tenants/{TENANT}/calls?month=2026-10")
    assert r.body["calls"] == [] and r.body["month"] == "2026-10"
    assert (await client("GET", "/api/v1/tenants/nope/calls")).status == 404


# ---- bad requests: 4xx, the field named, nothing written -----------------------------------

T = f"/api/v1/tenants/{TENANT}"
BAD = [
    # method, path, body (raw str = sent as is), status, code, field
    ("POST", "/api/v1/tenants", "{oops", 400, "INVALID_JSON", None),
    ("POST", "/api/v1/tenants", "", 400, "INVALID_JSON", None),
    ("POST", "/api/v1/tenants", '{"id": NaN}', 400, "INVALID_JSON", None),
    ("POST", "/api/v1/tenants", [], 422, "INVALID_BODY", None),
    ("POST", "/api/v1/tenants", {"name": "X", "country": "CA"}, 422, "MISSING_FIELD", "id"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "X", "country": "CA", "colour": "red"},
     422, "UNKNOWN_FIELD", "colour"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": 5, "country": "CA"},
     422, "INVALID_TYPE", "name"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "X", "country": "ZZ"},
     422, "UNKNOWN_COUNTRY", "country"),
    ("POST", "/api/v1/tenants", {"id": "bad id", "name": "X", "country": "CA"},
     422, "INVALID_ID", "id"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "X", "country": "CA",
                                 "blocked_classes": ["casino"]},
     422, "INVALID_BLOCKED_CLASSES", "blocked_classes"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "X", "country": "CA",
                                 "blocked_classes": [1]}, 422, "INVALID_TYPE",
     "blocked_classes"),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "X", "country": "CA", "currency": "usd"},
     422, "INVALID_CURRENCY", "currency"),
    ("PATCH", T, {}, 422, "EMPTY_BODY", None),
    ("PATCH", T, {"country": "US"}, 422, "UNKNOWN_FIELD", "country"),
    ("PATCH", T, {"timezone": "Mars/Olympus"}, 422, "INVALID_TIMEZONE", "timezone"),
    ("PUT", f"{T}/subscriptions/gold", {"quantity": 1}, 422, "UNKNOWN_SKU", "sku"),
    ("PUT", f"{T}/subscriptions/business_voice", {"quantity": 1.0}, 422, "INVALID_TYPE",
     "quantity"),
    ("PUT", f"{T}/subscriptions/business_voice", {"quantity": -1}, 422, "INVALID_QUANTITY",
     "quantity"),
    ("PUT", f"{T}/subscriptions/business_voice", {}, 422, "MISSING_FIELD", "quantity"),
    ("PUT", "/api/v1/tenants/nope/subscriptions/business_voice", {"quantity": 1}, 404,
     "UNKNOWN_TENANT", None),
    ("POST", f"{T}/users", {"id": "erin", "sip_endpoint": "e rin", "usage_location": "CA"},
     422, "INVALID_SIP_ENDPOINT", "sip_endpoint"),
    ("POST", f"{T}/users", {"id": "erin", "sip_endpoint": "alice", "usage_location": "CA"},
     409, "DUPLICATE", None),
    ("POST", f"{T}/users", {"id": "erin", "sip_endpoint": "erin", "usage_location": "CA",
                            "licences": ["business_voice"]}, 422, "UNKNOWN_FIELD", "licences"),
    ("POST", f"{T}/users", {"id": "erin", "sip_endpoint": "erin", "usage_location": "CA",
                            "extension": 105}, 422, "INVALID_TYPE", "extension"),
    ("POST", "/api/v1/tenants/nope/users", {"id": "erin", "sip_endpoint": "erin",
                                            "usage_location": "CA"}, 404, "UNKNOWN_TENANT",
     None),
    ("PATCH", "/api/v1/users/alice", {"sip_endpoint": "x"}, 422, "UNKNOWN_FIELD",
     "sip_endpoint"),
    ("PATCH", "/api/v1/users/alice", {"usage_location": "FR"}, 409, "CALLING_PLAN_COUNTRY",
     "usage_location"),
    ("PUT", "/api/v1/users/carol/licences/international_calling_plan", None, 409,
     "ADDON_REQUIRES_CALLING_PLAN", "sku"),
    ("DELETE", "/api/v1/users/bob/licences/business_voice_calling_plan", None, 409,
     "ADDON_REQUIRES_CALLING_PLAN", "sku"),
    ("PUT", "/api/v1/users/nobody/licences/business_voice", None, 404, "UNKNOWN_USER", None),
    ("POST", f"{T}/numbers", {"e164": "5145550100", "kind": "user", "user_id": "alice"},
     422, "INVALID_NUMBER", "e164"),
    ("POST", f"{T}/numbers", {"e164": "+15145550188", "kind": "user"}, 422,
     "MISSING_FIELD", "user_id"),
    ("POST", f"{T}/numbers", {"e164": "+15145550188", "kind": "fax", "target": "alice"},
     422, "INVALID_KIND", "kind"),
    ("DELETE", "/api/v1/numbers/+15145550999", None, 404, "UNKNOWN_NUMBER", None),
    ("POST", "/api/v1/rates", {"kind": "international"}, 422, "INVALID_BODY", "rates"),
    ("POST", "/api/v1/rates", [], 422, "INVALID_BODY", "rates"),
    ("POST", "/api/v1/rates", [{"kind": "international", "prefix": "33",
                                "price_per_minute": "0.05"},
                               {"kind": "international", "prefix": "34",
                                "price_per_minute": 0.05}], 422, "INVALID_AMOUNT",
     "price_per_minute"),
    ("POST", "/api/v1/rates", [{"kind": "international", "prefix": "33",
                                "price_per_minute": "0.05", "rounding": "up"}], 422,
     "UNKNOWN_FIELD", "rates[0].rounding"),
    ("POST", "/api/v1/rates", [{"kind": "local", "prefix": "33", "price_per_minute": "1"}],
     422, "INVALID_KIND", "kind"),
    ("POST", "/api/v1/rates?tenant_id=nope", [{"kind": "international", "prefix": "33",
                                               "price_per_minute": "1"}], 404,
     "UNKNOWN_TENANT", None),
    ("PUT", "/api/v1/allotments/CA/weekly", {"minutes": 10}, 422, "INVALID_PLAN", "plan"),
    ("PUT", "/api/v1/allotments/XX/domestic", {"minutes": 10}, 422, "UNKNOWN_COUNTRY",
     "country"),
    ("PUT", "/api/v1/allotments/CA/domestic", {"minutes": "10"}, 422, "INVALID_TYPE",
     "minutes"),
    ("POST", f"{T}/wallet/topups", {"amount": 12.5}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "-5"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "0"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "ten"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "1.0000001"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": True}, 422, "INVALID_TYPE", "amount"),
    ("POST", f"{T}/wallet/topups", {"note": "x"}, 422, "MISSING_FIELD", "amount"),
    ("PUT", f"{T}/wallet/auto-recharge", {"enabled": True, "threshold": "5",
                                          "amount": "10"}, 422, "MISSING_FIELD",
     "monthly_cap"),
    ("PUT", f"{T}/wallet/auto-recharge", {"enabled": "yes", "threshold": "5",
                                          "amount": "10", "monthly_cap": 1}, 422,
     "INVALID_TYPE", "enabled"),
    ("PUT", f"{T}/wallet/auto-recharge", {"enabled": True, "threshold": "5",
                                          "amount": "0", "monthly_cap": 1}, 422,
     "INVALID_AMOUNT", "amount"),
    ("GET", f"{T}/usage?month=2026-13", None, 422, "INVALID_MONTH", "month"),
    ("GET", f"{T}/usage?month=November", None, 422, "INVALID_MONTH", "month"),
    ("GET", f"{T}/calls?limit=0", None, 422, "INVALID_LIMIT", "limit"),
    ("GET", f"{T}/calls?limit=many", None, 422, "INVALID_LIMIT", "limit"),
    # hostile input (issue 8 items 12 and 13): a 4xx with a stable code, never a 500
    ("POST", "/api/v1/tenants", b'{"id": "x", "name": "Caf\xe9", "country": "CA"}', 400,
     "INVALID_JSON", None),
    ("POST", f"{T}/wallet/topups", "[" * 100_000 + "]" * 100_000, 400, "INVALID_JSON", None),
    ("POST", f"{T}/wallet/topups", '{"amount": "1", "amount": "1000"}', 400, "INVALID_JSON",
     None),
    ("POST", "/api/v1/tenants", {"id": "x", "name": "A\u0000B", "country": "CA"}, 422,
     "INVALID_TEXT", "name"),
    ("POST", "/api/v1/tenants", '{"id": "x", "name": "\\ud800", "country": "CA"}', 422,
     "INVALID_TEXT", "name"),
    ("POST", f"{T}/wallet/topups", {"amount": "1", "note": "a\u0000"}, 422, "INVALID_TEXT",
     "note"),
    ("PATCH", T, {"blocked_classes": ["premium_rate\u0000"]}, 422, "INVALID_TEXT",
     "blocked_classes"),
    ("GET", "/api/v1/tenants/ac%00me", None, 422, "INVALID_TEXT", "tenant_id"),
    ("POST", "/api/v1/tenants/ac%00me/wallet/topups", {"amount": "1"}, 422, "INVALID_TEXT",
     "tenant_id"),
    ("DELETE", "/api/v1/users/al%00ice", None, 422, "INVALID_TEXT", "user_id"),
    ("GET", "/api/v1/rates?tenant_id=ac%00me", None, 422, "INVALID_TEXT", "tenant_id"),
    ("GET", f"{T}/usage?month=", None, 422, "INVALID_MONTH", "month"),
    ("GET", "/api/v1/rates?tenant_id=", None, 422, "INVALID_ID", "tenant_id"),
    ("POST", "/api/v1/rates?tenant_id=", [{"kind": "international", "prefix": "33",
                                          "price_per_minute": "1"}], 422, "INVALID_ID",
     "tenant_id"),
    ("GET", f"{T}/calls?month=", None, 422, "INVALID_MONTH", "month"),
    ("POST", f"{T}/wallet/topups", {"amount": "1_000"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "1E+2"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "\uff11\uff12"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": "\u0661\u0662"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", f"{T}/wallet/topups", {"amount": " 12"}, 422, "INVALID_AMOUNT", "amount"),
    ("POST", "/api/v1/rates", [{"kind": "international", "prefix": "33",
                                "price_per_minute": "0.05e0"}], 422, "INVALID_AMOUNT",
     "rates[0].price_per_minute"),
]


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    return {}


@pytest.fixture
async def acme_kept(db_pool, built):
    """The standard tenant, built again only when the tables differ from what the last
    test left: refused requests write nothing, so one build serves them all (and a
    request that did write shows up in its own test's check first)."""
    if built.get("dump") is None or await dump_tables(db_pool) != built["dump"]:
        await db_pool.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
        await db_pool.execute(
            "DELETE FROM allotments; INSERT INTO allotments (country, plan, minutes) VALUES"
            " ('CA','domestic',3000), ('GB','domestic',1200), ('US','domestic',3000),"
            " ('CA','international',600), ('GB','international',600),"
            " ('US','international',600)")
        await standard_tenant(Provisioning(Repository(db_pool), clock=lambda: NOW), wallet="20.00")
        built["dump"] = await dump_tables(db_pool)
    return built["dump"]


@pytest.mark.parametrize("method,path,body,status,code,field", BAD,
                         ids=[f"{b[0]} {b[1]} {b[4]}" for b in BAD])
async def test_bad_requests_name_the_field_and_write_nothing(client, acme_kept, db_pool, method,
                                                             path, body, status, code, field):
    before = acme_kept
    if isinstance(body, str | bytes):
        r = await client(method, path, raw=body)
    else:
        r = await client(method, path, body)
    assert (r.status, r.error["code"]) == (status, code), r.body
    assert r.error["field"] == field
    assert r.error["message"]
    assert r.headers["Content-Type"].startswith("application/json")
    assert await dump_tables(db_pool) == before


async def test_csv_import_refusals_write_nothing(client, acme, db_pool):
    before = await dump_tables(db_pool)
    cases = [
        ("kind,prefix\ninternational,33\n", "text/csv", "INVALID_CSV"),
        ("kind,prefix,price_per_minute\n", "text/csv", "INVALID_CSV"),
        ("kind,prefix,price_per_minute\ninternational,33,0.1\ninternational,34,abc\n",
         "text/csv", "INVALID_AMOUNT"),
        ("kind,prefix,price_per_minute\ninternational,33,0.1\n", "application/json",
         "UNSUPPORTED_MEDIA_TYPE"),
    ]
    for text, content_type, code in cases:
        r = await client("POST", "/api/v1/rates/import", raw=text, content_type=content_type)
        assert r.status == 422 and r.error["code"] == code, (text, r.body)
    r = await client("POST", "/api/v1/rates/import", raw=b"kind,prefix,price\xff",
                     content_type="text/csv")
    assert r.status == 422 and r.error["code"] == "INVALID_CSV"
    # a field over the csv module's limit (128 KiB), and a NUL: refused, never a 500
    for text, code in (("kind,prefix,price_per_minute,description\n"
                        f"international,33,0.1,{'x' * 140_000}\n", "INVALID_CSV"),
                       ("kind,prefix,price_per_minute\ninternational,33,0.1\x00\n",
                        "INVALID_TEXT")):
        r = await client("POST", "/api/v1/rates/import", raw=text, content_type="text/csv")
        assert r.status == 422 and r.error["code"] == code, r.body
    assert await dump_tables(db_pool) == before


# ---- the error middleware ------------------------------------------------------------------


async def test_unknown_routes_and_methods_answer_json(client):
    r = await client("GET", "/api/v1/nothing-here")
    assert r.status == 404 and r.error == {"code": "NOT_FOUND", "message": "no such route",
                                           "field": None}
    r = await client("DELETE", "/api/v1/tenants")
    assert r.status == 405 and r.error["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in r.headers["Allow"] and "POST" in r.headers["Allow"]


async def test_unexpected_errors_are_logged_not_shown(gw, client, acme, monkeypatch):
    async def broken() -> None:
        raise RuntimeError("password=hunter2 in a stack frame")

    monkeypatch.setattr(gw.repo, "list_tenants", broken)
    with capture_logs() as logs:
        r = await client("GET", "/api/v1/tenants")
    assert r.status == 500
    assert r.error["code"] == "INTERNAL_ERROR"
    assert "hunter2" not in json.dumps(r.body) and "Traceback" not in json.dumps(r.body)
    events = [e for e in logs if e["event"] == "http_internal_error"]
    assert len(events) == 1 and events[0]["route"] == "/api/v1/tenants"
    assert events[0]["log_level"] == "error" and events[0].get("exc_info")
    assert all(ADMIN not in repr(e) for e in logs)


async def test_admin_writes_are_logged_without_the_token(client, acme):
    with capture_logs() as logs:
        await client("POST", f"/api/v1/tenants/{TENANT}/wallet/topups", {"amount": "1"})
        await client("POST", f"/api/v1/tenants/{TENANT}/wallet/topups", {"amount": 1.5})
    writes = [e for e in logs if e["event"] in ("admin_write", "http_refused")]
    assert [(e["event"], e["status"]) for e in writes] == [("admin_write", 201),
                                                           ("http_refused", 422)]
    assert writes[0]["route"] == "/api/v1/tenants/{tenant_id}/wallet/topups"
    assert all(ADMIN not in repr(e) and READ not in repr(e) for e in logs)


# ---- OpenAPI -------------------------------------------------------------------------------


def _registered(gw: Gateway) -> set[tuple[str, str]]:
    out = set()
    for route in gw.http_runner.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith(api.PREFIX + "/") and route.method != "HEAD":
            out.add((route.method.lower(), path.removeprefix(api.PREFIX)))
    return out


async def test_openapi_describes_every_admin_route_and_nothing_else(gw, client):
    r = await client("GET", "/api/v1/openapi.json", token=None)
    assert r.status == 200
    doc = r.body
    assert doc["openapi"] == "3.1.0" and doc["servers"] == [{"url": "/api/v1"}]
    documented = {(method, path) for path, ops in doc["paths"].items()
                  for method in ops if method != "parameters"}
    registered = _registered(gw)
    assert len(registered) == len(api.ROUTES) + 1
    assert registered - documented == set(), "routes missing from openapi.py"
    assert documented - registered == set(), "openapi.py documents routes that do not exist"


def test_openapi_document_is_consistent():
    doc = document()
    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    for ref in set(re.findall(r'"#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in doc["components"][ref[0]], ref
    for path, ops in doc["paths"].items():
        names = [p["name"] for p in ops.get("parameters", [])]
        assert names == re.findall(r"{([^}]+)}", path), path
        for method, op in ops.items():
            if method == "parameters" or path == "/openapi.json":
                continue
            assert "401" in op["responses"] and "503" in op["responses"], (method, path)
    # the request schemas name exactly the fields the handlers accept
    for model in (s.TenantCreate, s.TenantPatch, s.UserCreate, s.UserPatch, s.NumberCreate,
                  s.RateInput, s.AutoRechargeSettings):
        fields = {f.name for f in dataclasses.fields(model)}
        assert set(schemas[model.__name__]["properties"]) == fields, model


def test_month_parsing():
    assert s.parse_month("2026-02") == dt.date(2026, 2, 1)
    assert s.parse_month(None) is None and s.parse_month("") is None
    for bad in ("2026-2", "2026-00", "26-02", "1999-12", "2026-02-01"):
        with pytest.raises(Exception) as info:
            s.parse_month(bad)
        assert info.value.code == "INVALID_MONTH"


def test_schema_check_names_the_entity_and_returns_only_given_fields():
    with pytest.raises(InvalidInput) as info:
        s.check(s.TenantCreate, {"id": "x", "name": "X", "country": "CA", "colour": 1},
                where="tenants[0]")
    assert (info.value.code, info.value.field) == ("UNKNOWN_FIELD", "tenants[0].colour")
    with pytest.raises(InvalidInput) as info:
        s.check(s.UserCreate, {"id": "erin", "sip_endpoint": "erin"}, where="users[3]")
    assert (info.value.code, info.value.field) == ("MISSING_FIELD", "users[3].usage_location")
    assert s.check(s.TenantCreate, {"id": "x", "name": "X", "country": "CA"}) == {
        "id": "x", "name": "X", "country": "CA"}  # Provisioning applies the defaults
    assert s.check(s.UserPatch, {"extension": None}) == {"extension": None}


def test_response_schemas_are_the_views_fields():
    components: dict[str, Any] = {}
    call = s.json_schema(views.Call, components)
    assert set(call["properties"]) == {f.name for f in dataclasses.fields(views.Call)}
    assert "owner" not in call["properties"] and call["additionalProperties"] is False
    assert document()["components"]["schemas"]["Call"] == call
