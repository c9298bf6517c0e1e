"""The alert and webhook routes of the admin API on a real gateway and PostgreSQL: the
answers and their errors (404 with the entity's code, 422 naming the field, nothing
written), and the lifecycle of an alert over HTTP."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.billing.rater import Rater
from tests.support.database import dump_tables
from tests.support.gateway import running_gateway
from tests.support.http import Client
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


async def test_an_alert_over_http(gw, client, admin, repo, clock):
    await standard_tenant(admin)
    r = await client("PATCH", f"/api/v1/tenants/{TENANT}/alert-settings",
                     {"no_balance_count": 1, "wallet_below": None, "pool_percents": [90, 50]})
    assert r.status == 200
    assert (r.body["no_balance_count"], r.body["wallet_below"], r.body["pool_percents"]) \
        == (1, None, [50, 90])
    await admin.set_allotment("CA", "international", 0)
    await Rater(repo, clock=clock).authorise_outbound("alice", "+442079460000")
    r = await client("GET", "/api/v1/alerts?state=active")
    [alert] = r.body["alerts"]
    assert (alert["kind"], alert["threshold"], alert["details"]["rejections"]) == \
        ("no_balance_rejections", "1", 1)
    r = await client("POST", f"/api/v1/alerts/{alert['id']}/acknowledge", {"note": "seen"})
    assert (r.status, r.body["state"], r.body["acknowledged_by"]) == (200, "acknowledged",
                                                                      "api")
    r = await client("POST", f"/api/v1/alerts/{alert['id']}/clear", {})
    assert (r.status, r.body["state"], r.body["note"]) == (200, "cleared", "seen")
    r = await client("GET", f"/api/v1/tenants/{TENANT}/alerts?state=active,acknowledged")
    assert r.body == {"tenant_id": TENANT, "alerts": []}
    r = await client("GET", f"/api/v1/alerts/{alert['id']}")
    assert r.body["cleared_by"] == "api"


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "field"), [
    ("GET", "/alerts/12345", None, 404, "UNKNOWN_ALERT", None),
    ("GET", "/alerts/0", None, 422, "INVALID_ID", "alert_id"),
    ("GET", "/alerts/99999999999999999999", None, 422, "INVALID_ID", "alert_id"),
    ("GET", "/alerts?state=open", None, 422, "INVALID_STATE", "state"),
    ("GET", "/alerts?tenant_id=nobody", None, 404, "UNKNOWN_TENANT", None),
    ("POST", "/alerts/1/clear", {"note": 5}, 422, "INVALID_TYPE", "note"),
    ("PATCH", f"/tenants/{TENANT}/alert-settings", {"pool_percents": [0]}, 422,
     "INVALID_POOL_PERCENTS", "pool_percents"),
    ("PATCH", f"/tenants/{TENANT}/alert-settings", {"wallet_below": 3.5}, 422,
     "INVALID_AMOUNT", "wallet_below"),
    ("PATCH", f"/tenants/{TENANT}/alert-settings", {}, 422, "EMPTY_BODY", None),
    ("PATCH", "/tenants/nobody/alert-settings", {"recharge_cap": False}, 404,
     "UNKNOWN_TENANT", None),
    ("POST", "/webhooks", {"url": "ftp://x.example/"}, 422, "INVALID_URL", "url"),
    ("POST", "/webhooks", {"url": "https://x.example/", "secret": "short"}, 422,
     "INVALID_SECRET", "secret"),
    ("POST", "/webhooks", {"url": "https://x.example/", "events": ["call_made"]}, 422,
     "INVALID_EVENTS", "events"),
    ("POST", "/webhooks", {"url": "https://x.example/", "tenant_id": "nobody"}, 404,
     "UNKNOWN_REFERENCE", None),
    ("PATCH", "/webhooks/777", {"enabled": False}, 404, "UNKNOWN_WEBHOOK", None),
    ("DELETE", "/webhooks/777", None, 404, "UNKNOWN_WEBHOOK", None),
    ("GET", "/webhook-deliveries/not-a-uuid", None, 422, "INVALID_ID", "delivery_id"),
    ("POST", "/webhook-deliveries/00000000-0000-4000-8000-000000000001/retry", None, 404,
     "UNKNOWN_DELIVERY", None),
    ("GET", "/webhook-deliveries?state=sent", None, 422, "INVALID_STATE", "state"),
])
async def test_refusals_name_the_problem_and_write_nothing(client, admin, db_pool, method,
                                                          path, body, status, code, field):
    await standard_tenant(admin)
    before = await dump_tables(db_pool)
    r = await client(method, "/api/v1" + path, body)
    assert (r.status, r.error["code"], r.error.get("field")) == (status, code, field)
    assert await dump_tables(db_pool) == before


async def test_a_webhook_over_http_never_shows_its_secret(client, admin):
    await standard_tenant(admin)
    r = await client("POST", "/api/v1/webhooks", {"url": "https://hooks.example.com/a",
                                                  "events": ["wallet_below"]})
    assert r.status == 201 and len(r.body["secret"]) == 64
    secret, hook_id = r.body["secret"], r.body["id"]
    assert r.headers["Location"] == f"/api/v1/webhooks/{hook_id}"
    for path in ("/api/v1/webhooks", f"/api/v1/webhooks/{hook_id}",
                 f"/api/v1/webhooks?tenant_id={TENANT}"):
        r = await client("GET", path)
        assert r.status == 200 and secret not in str(r.body) and "secret" not in str(r.body)
    r = await client("PATCH", f"/api/v1/webhooks/{hook_id}",
                     {"secret": "a-new-secret-0123456789", "enabled": False})
    assert r.status == 200 and r.body["enabled"] is False and "secret" not in r.body
    r = await client("DELETE", f"/api/v1/webhooks/{hook_id}")
    assert r.status == 204
    r = await client("GET", "/api/v1/webhooks")
    assert r.body["webhooks"] == []
