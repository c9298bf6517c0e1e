"""Probes, /status, /metrics and the page of a real, started gateway: calls decided over
its AGI port show up as live calls and counters; secrets never appear."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gateway.errors import Unavailable
from tests.support.agi import agi_outbound
from tests.support.gateway import ADMIN, READ, running_gateway
from tests.support.http import Client, floats_in
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

DB_PASSWORD = "pw-Secret-5521"


def with_password(url: str) -> str:
    """The test database URL with a password (trust auth ignores it): it must never show."""
    scheme, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{DB_PASSWORD}@{host}"


@pytest.fixture(scope="module")
async def gw(database_url):
    async with running_gateway(with_password(database_url)) as gateway:
        yield gateway


@pytest.fixture
async def http(gw):
    async with aiohttp.ClientSession() as session:
        yield Client(session, gw.http_port, token=READ)


async def test_healthz_and_readyz_need_no_token(http):
    r = await http("GET", "/healthz", token=None)
    assert (r.status, r.body) == (200, {"status": "ok"})
    r = await http("GET", "/readyz", token=None)
    assert r.status == 200
    assert r.body == {"status": "ready", "failing": {},
                      "components": {"database": "up", "ami": "not_configured", "agi": "up"}}


async def test_readyz_names_the_failing_component(database_url):
    async with running_gateway(database_url) as gw, aiohttp.ClientSession() as session:
        http = Client(session, gw.http_port, token=None)
        await gw.agi.stop(grace=0)
        r = await http("GET", "/readyz")
        assert r.status == 503
        assert r.body["status"] == "not_ready"
        assert list(r.body["failing"]) == ["agi"]
        assert r.body["failing"]["agi"]["state"] == "down"
        assert (await http("GET", "/healthz")).status == 200  # alive all the same
        r = await http("GET", "/status", token=READ)
        assert r.status == 200 and r.body["ready"] is False


@pytest.mark.parametrize("path", ["/status", "/metrics"])
async def test_status_and_metrics_need_the_read_or_admin_token(http, path):
    for token in (None, "nope", READ + "x", READ.upper()):
        r = await http("GET", path, token=token)
        assert r.status == 401, token
        assert r.error["code"] == "UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert (await http("GET", path, token=READ)).status == 200
    assert (await http("GET", path, token=ADMIN)).status == 200


async def test_status_and_metrics_are_open_without_a_read_token(database_url):
    async with running_gateway(database_url, read_token="", admin_token="") as gw, \
            aiohttp.ClientSession() as session:
        http = Client(session, gw.http_port, token=None)
        assert (await http("GET", "/status")).status == 200
        assert (await http("GET", "/metrics")).status == 200
        # an empty admin token opens nothing: the admin API is off
        assert (await http("GET", "/api/v1/tenants")).status == 503


async def test_status_shows_calls_pools_wallets_and_counters(gw, http, admin):
    await standard_tenant(admin, wallet="20.00")
    await admin.set_auto_recharge(TENANT, enabled=True, threshold="5", amount="10",
                                  monthly_cap=2)
    allowed = await agi_outbound(gw.agi.port, "alice", "+15145550123")
    refused = await agi_outbound(gw.agi.port, "carol", "+15145550123")
    assert (allowed["GW_DECISION"], allowed["GW_REASON"]) == ("ALLOW", "FUNDED")
    assert (refused["GW_DECISION"], refused["GW_REASON"]) == ("REJECT", "NO_LICENSE")

    r = await http("GET", "/status")
    assert r.status == 200
    doc = r.body
    assert {"generated_at", "started_at", "uptime_seconds", "ready", "components",
            "live_calls", "tenants", "tenants_error", "decisions", "last_reconcile",
            "config"} <= set(doc)
    assert doc["ready"] is True and doc["tenants_error"] is None
    assert doc["components"]["database"]["state"] == "up"
    assert doc["components"]["agi"]["sessions_total"] >= 2

    live = [c for c in doc["live_calls"] if c["call_id"] == allowed["GW_CALL_ID"]]
    assert len(live) == 1
    assert (live[0]["tenant_id"], live[0]["caller"], live[0]["destination"],
            live[0]["state"], live[0]["funded_seconds"], live[0]["source"]) == (
        TENANT, "alice", "+15145550123", "ringing", 300, "pool+wallet")

    decisions = {(d["direction"], d["decision"], d["reason"]): d["count"]
                 for d in doc["decisions"]}
    assert decisions[("outbound", "ALLOW", "FUNDED")] >= 1
    assert decisions[("outbound", "REJECT", "NO_LICENSE")] >= 1
    assert "at" in doc["last_reconcile"]  # the start-up reconciliation
    # the one PBX of the flat configuration, owned by this process through its lease
    (name,) = doc["pbxes"]
    pbx = doc["pbxes"][name]
    assert name == "default"
    assert (pbx["owner"], pbx["owned"]) == (gw.instance_id, True) and pbx["generation"] >= 1
    assert pbx["lease_expires_at"] is not None
    assert pbx["ami"]["state"] == "not_configured"
    assert pbx["live_calls"] == len(doc["live_calls"]) >= 1
    assert pbx["last_reconcile"] == doc["last_reconcile"]
    assert live[0]["pbx"] == "default"

    (tenant,) = doc["tenants"]
    assert (tenant["tenant_id"], tenant["name"], tenant["currency"], tenant["month"]) == (
        TENANT, "Acme Ltd", "USD", "2026-11-01")
    (pool,) = tenant["pools"]
    assert pool == {"country": "CA", "capacity_minutes": "6000.00", "used_minutes": "0.00",
                    "reserved_minutes": "5.00", "remaining_minutes": "5995.00",
                    "capacity_seconds": 360000, "used_seconds": 0, "reserved_seconds": 300}
    assert [a["user_id"] for a in tenant["international_addon"]] == ["bob"]
    assert tenant["wallet"]["balance"] == "20.000000"
    assert tenant["wallet"]["available"] == "20.000000"
    assert tenant["wallet"]["auto_recharge"]["enabled"] is True
    assert tenant["wallet"]["auto_recharge"]["threshold"] == "5.000000"
    assert floats_in(doc["tenants"]) == []  # money is never a JSON number


async def test_status_never_shows_secrets(gw, http, admin):
    await standard_tenant(admin, wallet="1")
    async with http.session.get(http.base + "/status",
                                headers={"Authorization": f"Bearer {READ}"}) as r:
        text = await r.text()
    for secret in (ADMIN, READ, DB_PASSWORD):
        assert secret not in text
    config = json.loads(text)["config"]
    assert config["admin_token"] == "***" and config["read_token"] == "***"
    assert ":***@" in config["database_url"]


async def test_status_still_answers_when_the_tenants_cannot_be_read(gw, http, monkeypatch):
    async def down() -> None:
        raise Unavailable("database unavailable: connection refused",
                          code="DATABASE_UNAVAILABLE")

    monkeypatch.setattr(gw.repo, "list_tenants", down)
    r = await http("GET", "/status")
    assert r.status == 200
    assert r.body["tenants"] == []
    assert r.body["tenants_error"]["code"] == "DATABASE_UNAVAILABLE"


async def test_metrics_text_has_the_counters(gw, http, admin):
    await standard_tenant(admin, wallet="5")
    await agi_outbound(gw.agi.port, "dave", "+15145550123")  # partner route
    async with http.session.get(http.base + "/metrics",
                                headers={"Authorization": f"Bearer {READ}"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    assert ('gateway_authorisations_total{decision="ALLOW",direction="outbound",'
            'reason="PARTNER"}') in text
    assert "gateway_authorisation_seconds_bucket" in text
    assert "gateway_ami_reconnects 0.0" in text
    live = next(line for line in text.splitlines()
                if line.startswith('gateway_live_calls{pbx="default"} '))
    assert float(live.split()[1]) == len(gw.calls.live) >= 1
    # the lone gateway took its PBX's lease at start, once
    assert 'gateway_pbx_owned{pbx="default"} 1.0' in text
    assert 'gateway_pbx_lease_changes_total{pbx="default"} 1.0' in text
    assert 'gateway_db_pool_connections_max 4.0' in text


async def test_metrics_can_be_asked_for_a_few_samples_by_name(gw, http):
    """``?name[]=`` as Prometheus' client serves it: only those samples (a cheap poll)."""
    async with http.session.get(
            http.base + "/metrics?name[]=gateway_db_pool_connections_in_use"
            "&name[]=gateway_ami_event_backlog",
            headers={"Authorization": f"Bearer {READ}"}) as r:
        assert r.status == 200
        text = await r.text()
    samples = [line.split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")]
    assert samples == ["gateway_db_pool_connections_in_use"], text  # no AMI: no backlog
    async with http.session.get(http.base + "/metrics?name[]=no_such_metric",
                                headers={"Authorization": f"Bearer {READ}"}) as r:
        assert r.status == 200 and (await r.text()).strip() == ""


async def test_page_and_static_files(http):
    async with http.session.get(http.base + "/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["Referrer-Policy"] == "no-referrer"
        page = await r.text()
    assert '<script src="/static/app.js"' in page and "/static/style.css" in page
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        async with http.session.get(f"{http.base}/static/{name}") as r:
            assert r.status == 200 and kind in r.headers["Content-Type"]
    r = await http("GET", "/static/missing.js", token=None)
    assert r.status == 404 and r.error["code"] == "NOT_FOUND"
    r = await http("GET", "/static/../app.py", token=None)
    assert r.status in (403, 404) and "error" in r.body


# The two tests below run their own gateway while the module's (``gw``, serving the PBX
# named "default") is alive and renewing: theirs serves a PBX of another name, so that
# the two never compete for one lease.
SOLO = "solo"


async def test_a_pbx_another_process_owns_is_on_standby_and_taken_when_its_lease_lapses(
        database_url, repo, admin):
    await standard_tenant(admin)
    await repo.pool.execute("INSERT INTO pbx_leases (pbx, owner, expires_at)"
                            " VALUES ($1, 'gw-other', now() + interval '1 hour')", SOLO)
    async with running_gateway(database_url, lease_seconds=3, pbx_name=SOLO) as gw, \
            aiohttp.ClientSession() as session:
        http = Client(session, gw.http_port, token=READ)
        pbx = (await http("GET", "/status")).body["pbxes"][SOLO]
        assert (pbx["owner"], pbx["owned"], pbx["live_calls"]) == ("gw-other", False, 0)
        assert pbx["last_reconcile"] is None  # a standby never reconciles the PBX
        r = await http("GET", "/readyz", token=None)
        assert r.status == 200 and r.body["failing"] == {}
        # it still decides the PBX's calls; the owner follows them, not this process
        allowed = await agi_outbound(gw.agi.port, "alice", "+15145550123")
        assert allowed["GW_DECISION"] == "ALLOW" and gw.calls.live == {}
        async with session.get(f"{http.base}/metrics",
                               headers={"Authorization": f"Bearer {READ}"}) as m:
            assert f'gateway_pbx_owned{{pbx="{SOLO}"}} 0.0' in await m.text()
        # the other process is gone: its lease lapses and this one takes the PBX
        await repo.pool.execute("UPDATE pbx_leases SET expires_at = now() WHERE pbx = $1",
                                SOLO)
        for _ in range(200):
            pbx = (await http("GET", "/status")).body["pbxes"][SOLO]
            if pbx["owned"]:
                break
            await asyncio.sleep(0.05)
        assert (pbx["owner"], pbx["owned"]) == (gw.instance_id, True)
        assert pbx["generation"] == 2 and pbx["lease_changes"] == 1
        for _ in range(200):  # the gain reconciles at once
            pbx = (await http("GET", "/status")).body["pbxes"][SOLO]
            if pbx["last_reconcile"]:
                break
            await asyncio.sleep(0.05)
        assert pbx["last_reconcile"]["kept"] == 1  # the call decided while on standby


async def test_status_lists_the_processes_sharing_the_database_and_what_each_serves(
        database_url, repo, gw):
    module_gateway = gw.instance_id  # alive, serving "default"; its heartbeat may come back
    # a process killed long ago (its heartbeat row stays) and one that serves a PBX
    await repo.pool.execute(
        "INSERT INTO gateway_instances (id, started_at, last_seen) VALUES"
        " ('gw-dead', now() - interval '1 hour', now() - interval '10 minutes'),"
        " ('gw-east', now(), now())")
    await repo.pool.execute("INSERT INTO pbx_leases (pbx, owner, expires_at)"
                            " VALUES ('east', 'gw-east', now() + interval '1 hour'),"
                            " ('west', 'gw-dead', now() - interval '9 minutes')")
    async with running_gateway(database_url, pbx_name=SOLO) as this, \
            aiohttp.ClientSession() as session:
        http = Client(session, this.http_port, token=READ)
        # a lone gateway takes its free PBX at its first lease attempt, or (a slow
        # database at start) at the next one, a third of the lease later
        for _ in range(200):
            processes = {p["name"]: p
                         for p in (await http("GET", "/status")).body["processes"]}
            if processes[this.instance_id]["pbxes"]:
                break
            await asyncio.sleep(0.05)
    assert set(processes) - {module_gateway} == {"gw-dead", "gw-east", this.instance_id}
    me = processes[this.instance_id]
    assert (me["this"], me["alive"], me["pbxes"]) == (True, True, [SOLO])
    assert (processes["gw-east"]["alive"], processes["gw-east"]["pbxes"]) == (True, ["east"])
    # an expired lease is not served by anyone
    dead = processes["gw-dead"]
    assert (dead["this"], dead["alive"], dead["pbxes"]) == (False, False, [])
