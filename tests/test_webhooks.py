"""Webhook delivery against a real HTTP receiver on loopback and the real PostgreSQL:
a receiver that fails (500), hangs (past the timeout) and recovers gets every event,
none twice under the same key after its success, each signed; a delivery that keeps
failing is dead after N attempts and can be sent again; two workers on one database
never send one attempt twice; secrets stay out of the API and the logs; and a gateway
whose receiver hangs keeps deciding calls."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.billing.alerts import Alerts
from gateway.billing.rater import Rater
from gateway.billing.webhooks import WebhookSender, backoff, sign, verify
from gateway.http.bodies import dumps
from gateway.store.alerts import AlertStore
from gateway.store.pool import open_pool
from tests.support.gateway import running_gateway
from tests.support.http import Client
from tests.support.receiver import receiver
from tests.support.tenant import TENANT, standard_tenant
from tests.support.waiting import eventually

pytestmark = pytest.mark.db

SECRET = "whsec-test-0123456789abcdef"


@pytest.fixture
def alerts(repo):
    return Alerts(AlertStore(repo.pool))


def sender(pool, **kw) -> WebhookSender:
    values = dict(instance="test", timeout=0.5, max_attempts=10, retry_base=0.1,
                  retry_max=0.2, concurrency=4, poll=0.05)
    values.update(kw)
    return WebhookSender(AlertStore(pool), **values)


async def raise_alerts(pool, n: int, kind: str = "pool_used") -> list[int]:
    """n alerts of the standard tenant, as the triggers raise them."""
    return [await pool.fetchval(
        "SELECT gw_raise_alert($1, $2, 'CA', '2026-11', $3, '{}'::jsonb)", TENANT, kind, i)
        for i in range(1, n + 1)]


async def settled(alerts, hook_id: int, within: float = 30.0) -> list:
    """The subscription's deliveries once none is pending."""
    deadline = time.monotonic() + within
    while True:
        found = await alerts.deliveries(webhook_id=hook_id)
        if found and all(d.state != "pending" for d in found):
            return found
        assert time.monotonic() < deadline, [(d.state, d.attempts) for d in found]
        await asyncio.sleep(0.05)


async def running(worker: WebhookSender):
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_signature_and_back_off():
    body = b'{"event":"pool_used"}'
    header = sign(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_100)
    assert not verify("another-secret-0123", header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # too old: a replay
    assert not verify(SECRET, "garbage", body)
    # doubled from the base, capped, each wait between half and all of it
    assert [backoff(n, 30, 3600, rand=lambda: 1.0) for n in (1, 2, 3, 8, 9)] == \
        [30, 60, 120, 3600, 3600]
    assert [backoff(n, 30, 3600, rand=lambda: 0.0) for n in (1, 2, 8)] == [15, 30, 1800]


async def test_fails_hangs_recovers_nothing_lost_nothing_twice(admin, repo, alerts):
    await standard_tenant(admin)
    # per delivery: 500, then no answer, then 500, then 200
    plan = {1: "fail", 2: "hang", 3: "fail"}
    async with receiver(SECRET, lambda key, n: plan.get(n, "ok")) as hook_server:
        hook = await alerts.create_webhook(hook_server.url, tenant_id=TENANT, secret=SECRET)
        ids = await raise_alerts(repo.pool, 5)
        worker = await running(sender(repo.pool))
        try:
            found = await settled(alerts, hook.id)
            await asyncio.sleep(0.5)  # time for a wrong second sending to show
        finally:
            await stop(worker)
    assert sorted(d.alert_id for d in found) == sorted(ids)
    assert {d.state for d in found} == {"delivered"}
    keys = {str(d.id) for d in found}
    assert hook_server.delivered() == keys  # nothing lost
    for key in keys:
        got = hook_server.for_key(key)
        # after the success, never again under the same key
        assert [r.answer for r in got] == ["fail", "hang", "fail", "ok"]
        assert all(r.signed for r in got)
        assert {r.body["id"] for r in got} == {key}
        assert got[-1].body["event"] == "pool_used"
        assert got[-1].body["alert"]["tenant_id"] == TENANT
        detail = await alerts.delivery(got[0].key)
        assert detail.attempts == 4
        assert [a.status for a in detail.log] == [500, None, 500, 200]
        assert "no answer within 0.5 s" in detail.log[1].error


async def test_dead_after_n_attempts_then_sent_again_by_the_operator(admin, repo, alerts):
    await standard_tenant(admin)
    failing = True
    async with receiver(SECRET, lambda key, n: "fail" if failing else "ok") as hook_server:
        hook = await alerts.create_webhook(hook_server.url, secret=SECRET)  # global
        await raise_alerts(repo.pool, 1, kind="wallet_below")
        worker = await running(sender(repo.pool, max_attempts=3))
        try:
            [dead] = await settled(alerts, hook.id)
            await asyncio.sleep(0.5)
            assert (dead.state, dead.attempts, dead.last_status) == ("dead", 3, 500)
            assert len(hook_server.got) == 3  # nothing after the last attempt
            assert [d.id for d in await alerts.deliveries(state="dead")] == [dead.id]
            failing = False
            again = await alerts.retry_delivery(dead.id)
            assert (again.state, again.attempts) == ("pending", 0)
            [done] = await settled(alerts, hook.id)
        finally:
            await stop(worker)
    assert (done.state, done.attempts) == ("delivered", 1)
    assert [r.answer for r in hook_server.got] == ["fail", "fail", "fail", "ok"]
    assert len((await alerts.delivery(done.id)).log) == 4  # the log keeps every attempt


async def test_two_workers_never_send_one_attempt_twice(admin, repo, alerts, database_url):
    await standard_tenant(admin)
    other_pool = await open_pool(database_url, min_size=1, max_size=2, run_migrations=False)
    try:
        async with receiver(SECRET) as hook_server:
            hook = await alerts.create_webhook(hook_server.url, secret=SECRET)
            await raise_alerts(repo.pool, 30)
            workers = [await running(sender(repo.pool, instance="one")),
                       await running(sender(other_pool, instance="two"))]
            try:
                found = await settled(alerts, hook.id)
            finally:
                for w in workers:
                    await stop(w)
    finally:
        await other_pool.close()
    assert len(found) == 30 and {d.state for d in found} == {"delivered"}
    assert sorted(r.key for r in hook_server.got) == sorted(str(d.id) for d in found)
    by = await repo.pool.fetch("SELECT DISTINCT by FROM webhook_attempts")
    assert {r["by"] for r in by} <= {"one", "two"}


async def test_a_disabled_or_unsubscribed_webhook_gets_nothing(admin, repo, alerts):
    await standard_tenant(admin)
    await admin.create_tenant("other", "Other Ltd", "CA")
    off = await alerts.create_webhook("http://127.0.0.1:9/off", enabled=False)
    other = await alerts.create_webhook("http://127.0.0.1:9/o", tenant_id="other")
    wallet_only = await alerts.create_webhook("http://127.0.0.1:9/w", events=["wallet_below"])
    everything = await alerts.create_webhook("http://127.0.0.1:9/all", tenant_id=TENANT)
    await raise_alerts(repo.pool, 2)
    counts = {h.id: len(await alerts.deliveries(webhook_id=h.id))
              for h in (off, other, wallet_only, everything)}
    assert counts == {off.id: 0, other.id: 0, wallet_only.id: 0, everything.id: 2}
    assert [h.id for h in await alerts.webhooks("other")] == [off.id, other.id,
                                                              wallet_only.id]


async def test_secrets_never_in_listings_or_logs(admin, repo, alerts):
    await standard_tenant(admin)
    made = await alerts.create_webhook("http://127.0.0.1:9/x?token=query-token-55")
    assert made.secret is not None and len(made.secret) == 64  # shown once, here
    given = await alerts.create_webhook("http://127.0.0.1:9/y", secret=SECRET)
    assert given.secret is None  # the operator knows it
    listed = dumps(await alerts.webhooks()) + dumps(await alerts.webhook(made.id))
    assert made.secret not in listed and SECRET not in listed
    async with receiver(made.secret) as hook_server:
        await alerts.update_webhook(made.id, url=hook_server.url + "?token=query-token-55")
        await alerts.update_webhook(given.id, url="http://127.0.0.1:9/refused?token=t-77")
        await raise_alerts(repo.pool, 1)
        worker = sender(repo.pool, max_attempts=1)
        with capture_logs() as logs:
            await worker.run_once()
        await worker.close()
    assert hook_server.got and hook_server.got[0].signed
    text = repr(logs) + dumps(await alerts.deliveries())
    for secret in (made.secret, SECRET, "query-token-55", "t-77"):
        assert secret not in text
    events = {e["event"] for e in logs}
    assert {"webhook_delivered", "webhook_dead"} <= events


async def test_the_gateway_delivers_and_a_hung_receiver_never_holds_calls(admin, database_url):
    await standard_tenant(admin)
    hang = True
    async with receiver(SECRET, lambda key, n: "hang" if hang else "ok") as hook_server, \
            running_gateway(database_url, webhook_enabled=True, webhook_timeout_seconds=2,
                            webhook_retry_base_seconds=1,
                            webhook_retry_max_seconds=1) as gw:
        await gw.alerts.set_settings(TENANT, no_balance_count=1)
        await gw.provisioning.set_allotment("CA", "international", 0)
        async with aiohttp.ClientSession() as session:
            client = Client(session, gw.http_port)
            r = await client("POST", "/api/v1/webhooks",
                             {"url": hook_server.url, "secret": SECRET, "tenant_id": TENANT})
            assert r.status == 201 and r.body["secret"] is None
            rater = Rater(gw.repo, clock=gw.clock, slice_seconds=60)
            # one rejection, one alert (no_balance_count 1); five more by hand
            d = await rater.authorise_outbound("alice", "+442079460000")
            assert d.reason.value == "NO_BALANCE"
            await gw.pool.execute(
                "SELECT gw_raise_alert($1, 'pool_used', 'CA', '2026-11', n, '{}'::jsonb)"
                " FROM generate_series(1, 5) n", TENANT)
            await eventually(lambda: len(hook_server.got) >= gw.config.webhook_concurrency,
                             within=10)
            # the worker's attempts are all hung; calls are decided meanwhile, on the
            # gateway's own pool (the worker has a pool of its own)
            assert gw.webhook_pool is not gw.pool
            decisions = await asyncio.gather(
                *(rater.authorise_outbound("alice", "2125550100") for _ in range(20)))
            assert all(d.allow for d in decisions)
            hang = False
            hook_server.release.set()
            await eventually(lambda: len(hook_server.delivered()) == 6, within=30)
            r = await client("GET", "/api/v1/webhooks")
            assert SECRET not in json.dumps(r.body)
            r = await client("GET", f"/api/v1/tenants/{TENANT}/alerts")
            assert r.status == 200 and len(r.body["alerts"]) == 6
            r = await client("GET", "/api/v1/webhook-deliveries?state=delivered")
            assert r.status == 200
            assert {d["state"] for d in r.body["deliveries"]} == {"delivered"}
            assert len(r.body["deliveries"]) == 6


async def test_an_attempt_whose_process_died_is_made_again_after_its_lease(admin, repo, alerts):
    await standard_tenant(admin)
    async with receiver(SECRET) as hook_server:
        hook = await alerts.create_webhook(hook_server.url, secret=SECRET)
        await raise_alerts(repo.pool, 1)
        store = AlertStore(repo.pool)
        # a process claims the delivery, then dies before sending or recording anything
        [lost] = await store.claim_deliveries(10, 0.3, "dead-process")
        assert await store.claim_deliveries(10, 0.3, "other") == []  # leased: not twice
        worker = await running(sender(repo.pool))
        try:
            [done] = await settled(alerts, hook.id)
        finally:
            await stop(worker)
        # the dead process's claim is no longer the delivery's: its late word is ignored
        assert not await store.record_attempt(
            lost["id"], lost["claim"], attempt=1, by="dead-process", status=500,
            error="late", duration_ms=1, outcome="retry", retry_in=0)
    assert (done.state, done.attempts) == ("delivered", 2)
    assert [r.answer for r in hook_server.got] == ["ok"]
    log = (await alerts.delivery(done.id)).log
    assert [(a.attempt, a.by, a.status) for a in log] == [(2, "test", 200),
                                                          (1, "dead-process", 500)]
    assert (await alerts.delivery(done.id)).state == "delivered"
