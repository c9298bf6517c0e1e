"""The container deployment of ``docker/``, built and run with Podman on this machine:
the three images build from nothing, the compose stack comes up healthy, a SIPp phone
on the host calls through the containerised Asterisk and gateway, the gateway container
restarts during a live call, and the stack comes down and up again with its database.

The tests run in file order on one stack (module fixtures): the tenant provisioned
through the admin API is the one the calls are billed to, and the last test takes the
stack down and up. Figures (build, start-up and restart times) are printed; the suite's
are in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from gateway.calls.causes import sip_response_for
from tests.support.ci import need
from tests.support.http import Client
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.pbx import CallResult
from tests.support.stack import (
    IMAGES,
    SERVICES,
    Stack,
    StackPbx,
    build_images,
    podman,
    sweep_stale,
    tools_missing,
)

pytestmark = [pytest.mark.containers, pytest.mark.pbx]

TENANT = "acme"
DOMESTIC = "2125550100"  # New York, domestic for a Canadian user
SLICE = 20  # the gateway's slice_seconds in this stack: renewals happen within a call
PBX_NAME = "pbx1"  # docker/compose.yaml's default GW_PBX and pbx_name

FIGURES: dict[str, float] = {}


def figure(name: str, seconds: float) -> None:
    FIGURES[name] = seconds
    print(f"containers: {name} {seconds:.1f} s")


def explain(*results: CallResult) -> str:
    return "\n".join(r.summary() for r in results)


# -- the stack -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images():
    missing = tools_missing()
    if missing:
        need(f"the container tests need {', '.join(missing)} (scripts/test installs them)")
    sweep_stale()
    seconds = build_images(clean=True)
    figure("build of the three images from nothing (layer cache off)", seconds)
    return seconds


@pytest.fixture(scope="module")
def stack_pbx(pbx_root):
    pbx = StackPbx(pbx_root, phones=("alice", "bob", "carol"), trunks=("carrier",),
                   pbx_name=PBX_NAME)
    yield pbx
    pbx.stop()


@pytest.fixture(scope="module")
def stack(images, stack_pbx, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), pjsip_conf=stack_pbx.pjsip_conf(),
                  gateway_env={"GATEWAY_SLICE_SECONDS": str(SLICE)})
    stack_pbx.container = stack.container("asterisk")
    started = time.monotonic()
    try:
        stack.up()
        asyncio.run(stack.wait_ready())
        figure("compose up to /readyz ready", time.monotonic() - started)
        yield stack
    finally:
        with contextlib.suppress(Exception):
            print(stack.all_logs())
        stack.down(volumes=True)


@contextlib.asynccontextmanager
async def database(stack: Stack):
    """The stack's database from the host, as the repository-like ``.pool`` the ledger
    checks take."""
    conn = await asyncpg.connect(stack.database_url, timeout=10)
    try:
        yield SimpleNamespace(pool=conn)
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture(scope="module")
def api(stack, http):
    """The admin API with the token the gateway container read from its secret file."""
    return Client(http, stack.ports["http"], token=stack.secret("admin_token"))


@pytest_asyncio.fixture(scope="module")
async def tenant(api):
    """A Canadian tenant provisioned through the admin API: alice and bob hold the
    Calling Plan, carol holds no licence. Returns each reply, in order."""
    replies = [
        await api("POST", "/api/v1/tenants", {"id": TENANT, "name": "Acme Ltd", "country": "CA",
                                              "timezone": "America/Toronto"}),
        await api("PUT", f"/api/v1/tenants/{TENANT}/subscriptions/business_voice_calling_plan",
                  {"quantity": 10}),
    ]
    for user, ext in (("alice", "101"), ("bob", "102"), ("carol", "103")):
        replies.append(await api("POST", f"/api/v1/tenants/{TENANT}/users",
                                 {"id": user, "sip_endpoint": user, "usage_location": "CA",
                                  "extension": ext}))
    for user in ("alice", "bob"):
        replies.append(await api("PUT", f"/api/v1/users/{user}/licences/"
                                        "business_voice_calling_plan"))
    replies.append(await api("POST", "/api/v1/rates", [
        {"kind": "domestic_overage", "prefix": "1", "price_per_minute": "0.02"}]))
    return replies


async def settled(db, call_id, wait: float = 15.0):
    """The call's row once it is settled or released (or as it is after ``wait``)."""
    deadline = time.monotonic() + wait
    while True:
        row = await db.pool.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
        if row["state"] in ("settled", "released") or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.2)


async def last_call(db, caller: str):
    return await db.pool.fetchrow(
        "SELECT * FROM calls WHERE caller = $1 ORDER BY authorised_at DESC LIMIT 1", caller)


async def until_answered(db, caller: str, wait: float = 15.0):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        row = await last_call(db, caller)
        if row is not None and row["state"] == "answered":
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"{caller}'s call was not answered: {row and dict(row)}")


# -- the tests, in order -------------------------------------------------------------------

def test_images_build_from_nothing_and_follow_the_rules(images):
    for image in IMAGES:
        assert podman("image", "exists", f"{image}:latest", check=False).returncode == 0, image
    # the gateway runs unprivileged; every image tells the engine how to check it
    assert podman("image", "inspect", "-f", "{{.Config.User}}",
                  "agi-gateway-gateway:latest").stdout.strip() == "gateway"
    for image in IMAGES:
        health = podman("image", "inspect", "-f", "{{.Config.Healthcheck.Test}}",
                        f"{image}:latest").stdout
        assert "CMD" in health, (image, health)


def test_a_missing_secret_or_phone_list_stops_a_container_with_a_clear_error(images):
    def run(image: str, *args: str):
        return podman("run", "--rm", "--network", "none", *args, f"{image}:latest",
                      check=False, timeout=60)

    gateway = run("agi-gateway-gateway", "-e", "GATEWAY_ADMIN_TOKEN_FILE=/run/secrets/nope")
    assert gateway.returncode == 2, gateway
    assert "GATEWAY_ADMIN_TOKEN_FILE: No such file or directory" in gateway.stderr, gateway
    asterisk = run("agi-gateway-asterisk")
    assert asterisk.returncode == 1, asterisk
    assert "no /etc/asterisk/pjsip.conf: mount the phones and trunks there" in asterisk.stderr
    postgres = run("agi-gateway-postgres")
    assert postgres.returncode == 1, postgres
    assert "cannot read the password file /run/secrets/db_password" in postgres.stderr


async def test_the_stack_comes_up_healthy_with_ami_connected(stack, stack_pbx):
    status, body = await asyncio.to_thread(stack.readyz)
    assert status == 200 and body["status"] == "ready", body
    assert body["components"] == {"database": "up", "ami": "up", "agi": "up"}, body
    for service in SERVICES:
        check = await asyncio.to_thread(stack.healthcheck, service)
        assert check.returncode == 0, (service, check.stdout, check.stderr)
    uid = podman("exec", stack.container("gateway"), "id", "-u").stdout.strip()
    assert uid != "0"
    # cdr_pgsql found the cdr table the gateway's migrations made before it loaded
    assert "Running" in await stack_pbx.acli("module show like cdr_pgsql")
    assert stack_pbx.get_global("GW_PBX") == PBX_NAME


async def test_tenant_provisioned_through_the_admin_api_with_the_secret_file_token(
        stack, api, tenant):
    assert [r.status for r in tenant] == [201, 200, 201, 201, 201, 200, 200, 200], \
        [(r.status, r.body) for r in tenant]
    r = await api("GET", f"/api/v1/tenants/{TENANT}/users")
    assert {u["id"] for u in r.body["users"]} == {"alice", "bob", "carol"}, r.body
    # the token is the file's: any other is refused
    wrong = await api("GET", "/api/v1/tenants", token="adm-not-the-secret")
    assert wrong.status == 401, wrong.body
    async with database(stack) as db:
        assert await db.pool.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1",
                                      TENANT) == 3


async def test_domestic_call_through_the_containers_is_allowed_billed_and_settled(
        stack, stack_pbx, tenant):
    trunk = await stack_pbx.uas("carrier").started()
    phone = await stack_pbx.call("alice", DOMESTIC, hold=2.5)
    trunk_seen = await trunk.result()
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone, trunk_seen)
    assert trunk_seen.invite.first_line.startswith("INVITE sip:12125550100@")
    async with database(stack) as db:
        call = await settled(db, (await last_call(db, "alice"))["id"])
        assert (call["decision"], call["state"], call["route"], call["pbx"]) == (
            "ALLOW", "settled", "pstn", PBX_NAME), dict(call)
        assert 2 <= call["billable_seconds"] <= 4
        assert call["billed_seconds"] == 60  # the pool counts whole minutes
        assert await pool_row(db, TENANT) == (60, 0)
        await ledger_agrees(db)
        # Asterisk's cdr_pgsql wrote the call's CDR into the gateway's database
        deadline = time.monotonic() + 10
        while not await db.pool.fetchval("SELECT count(*) FROM cdr WHERE uniqueid = $1",
                                         call["pbx_uniqueid"]):
            assert time.monotonic() < deadline, await db.pool.fetch("SELECT * FROM cdr")
            await asyncio.sleep(0.2)


async def test_unlicensed_user_gets_its_documented_sip_response(stack, stack_pbx, tenant):
    phone = await stack_pbx.call("carol", DOMESTIC, scenario="expect_error")
    assert phone.final_code == sip_response_for("NO_LICENSE") == 603, explain(phone)
    assert "cause=50" in (phone.final_response.header("Reason") or "")
    async with database(stack) as db:
        call = await last_call(db, "carol")
        assert (call["decision"], call["reason"], call["state"]) == ("REJECT", "NO_LICENSE",
                                                                     "rejected")


async def test_gateway_container_restarted_during_a_live_call(stack, stack_pbx, api, tenant):
    # per-second billing, and 2 minutes in the pool of which the domestic call used 1:
    # the call is funded 60 s, slice by slice, the later slices by the restarted gateway
    r = await api("POST", "/api/v1/rates", [
        {"kind": "domestic_overage", "prefix": "1", "price_per_minute": "0.02",
         "first_increment": 1, "increment": 1}])
    assert r.status == 200, r.body
    r = await api("PUT", "/api/v1/allotments/CA/domestic", {"minutes": 1})
    assert r.status == 200, r.body
    gateway = stack.container("gateway")
    trunk = await stack_pbx.uas("carrier", max_wait=150).started()
    call_task = asyncio.create_task(
        stack_pbx.call("bob", DOMESTIC, scenario="until_bye", max_wait=120))
    async with database(stack) as db:
        answered = await until_answered(db, "bob")
        started = time.monotonic()
        await asyncio.to_thread(podman, "restart", "--time", "10", gateway)
        await stack.wait_ready(60)
        figure("gateway container restart to /readyz ready", time.monotonic() - started)
        phone = await call_task
        trunk_seen = await trunk.result()
        call = await settled(db, answered["id"])
        charges = await db.pool.fetchval(
            "SELECT count(*) FROM ledger WHERE entry = 'charge' AND call_id = $1", call["id"])
        assert phone.bye_from == "pbx" and trunk_seen.bye_from == "pbx", \
            explain(phone, trunk_seen)
        # funded to the pool's last second by renewals after the restart, and cut there
        assert call["funded_seconds"] == 60, dict(call)
        assert phone.talk <= call["funded_seconds"] + 1.5, explain(phone, trunk_seen)
        assert phone.talk >= call["funded_seconds"] - 2, explain(phone, trunk_seen)
        # settled once, after the restart
        assert call["state"] == "settled" and charges == 1, dict(call)
        assert call["billed_seconds"] == 60
        assert await pool_row(db, TENANT) == (120, 0)
        await ledger_agrees(db)
    assert '"adopted": 1' in stack.logs("gateway", tail=200)


async def test_down_and_up_again_keeps_the_database(stack, api, tenant):
    async with database(stack) as db:
        calls_before = await db.pool.fetchval("SELECT count(*) FROM calls")
    started = time.monotonic()
    await asyncio.to_thread(stack.down)
    figure("compose down", time.monotonic() - started)
    assert stack.containers() == {}
    assert len(stack.volumes()) == 1  # the database's volume stays
    started = time.monotonic()
    await asyncio.to_thread(stack.up)
    body = await stack.wait_ready()
    figure("compose up again (existing database) to /readyz ready",
           time.monotonic() - started)
    assert body["components"]["ami"] == "up"
    r = await api("GET", f"/api/v1/tenants/{TENANT}")
    assert r.status == 200 and r.body["name"] == "Acme Ltd", r.body
    async with database(stack) as db:
        assert await db.pool.fetchval("SELECT count(*) FROM calls") == calls_before >= 3
        await ledger_agrees(db)
