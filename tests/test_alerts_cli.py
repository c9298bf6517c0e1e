"""The operator commands for alerts and webhooks against the real PostgreSQL: list,
acknowledge, clear, settings, subscriptions (secrets shown once, never listed),
deliveries; refusals exit 1 with a code."""

from __future__ import annotations

import csv
import io
import json

import pytest

from gateway import cli
from gateway.billing.rater import Rater
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db


@pytest.fixture
def run(tmp_path, database_url, repo):  # repo: the tables start empty
    config = tmp_path / "gateway.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')

    async def command(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = await cli.run(list(argv), config_path=str(config), environ={}, out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    return command


async def test_alerts_listed_acknowledged_and_cleared(run, admin, repo, clock):
    await standard_tenant(admin)
    rc, out, err = await run("alert-settings", TENANT, "--set", "no_balance_count=1",
                             "--set", "pool_percents=50,90", "--set", "wallet_below=off")
    assert (rc, err) == (0, ""), err
    assert "no_balance_count             1" in out
    assert "pool_percents                50,90" in out
    assert "wallet_below                 off" in out
    await admin.set_allotment("CA", "international", 0)
    await Rater(repo, clock=clock).authorise_outbound("alice", "+442079460000")
    rc, out, err = await run("alerts", TENANT)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["id", "raised", "(UTC)", "tenant", "kind", "subject",
                                "period", "line", "state"]
    assert "no_balance_rejections" in lines[2] and lines[2].endswith("active")
    alert_id = lines[2].split()[0]
    rc, out, _ = await run("alert-ack", alert_id, "--note", "calling them")
    assert (rc, out.strip()) == (0, f"alert {alert_id} ({TENANT} no_balance_rejections): "
                                    "acknowledged")
    rc, out, _ = await run("alert-clear", alert_id)
    assert rc == 0 and out.strip().endswith(": cleared")
    rc, out, _ = await run("alerts", "--state", "cleared", "--csv")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert (row["id"], row["state"], row["note"]) == (alert_id, "cleared", "calling them")
    assert json.loads(row["details"])["rejections"] == 1
    rc, out, _ = await run("alerts", TENANT, "--state", "active")
    assert (rc, out.strip()) == (0, f"no alerts for {TENANT}")


async def test_refusals_exit_1_with_a_code(run, admin):
    await standard_tenant(admin)
    rc, _, err = await run("alert-ack", "999")
    assert (rc, err.split(":")[1].strip()) == (1, "UNKNOWN_ALERT")
    rc, _, err = await run("alerts", "nobody")
    assert (rc, err.split(":")[1].strip()) == (1, "UNKNOWN_TENANT")
    rc, _, err = await run("alert-settings", TENANT, "--set", "pool_percents=80,120")
    assert rc == 1 and "INVALID_POOL_PERCENTS" in err
    rc, _, err = await run("alert-settings", TENANT, "--set", "colour=red")
    assert rc == 1 and "UNKNOWN_FIELD" in err
    rc, _, err = await run("webhook-add", "ftp://example.com/x")
    assert rc == 1 and "INVALID_URL" in err
    rc, _, err = await run("delivery-retry", "not-a-uuid")
    assert rc == 1 and "INVALID_ID" in err


async def test_webhooks_added_listed_without_secret_and_removed(run, admin, tmp_path):
    await standard_tenant(admin)
    rc, out, err = await run("webhook-add", "https://hooks.example.com/gw", "--tenant",
                             TENANT, "--events", "pool_used,wallet_below")
    assert (rc, err) == (0, ""), err
    secret = out.split("signatures): ")[1].strip()
    assert len(secret) == 64
    secret_file = tmp_path / "secret"
    secret_file.write_text("given-secret-0123456789\n")
    rc, out, err = await run("webhook-add", "http://10.0.0.5:8080/in", "--secret-file",
                             str(secret_file))
    assert rc == 0 and "shown once" not in out
    rc, out, _ = await run("webhooks")
    assert rc == 0
    assert secret not in out and "given-secret" not in out
    rows = out.splitlines()[2:]
    assert [r.split()[1] for r in rows] == [TENANT, "(all)"]
    assert "pool_used,wallet_below" in rows[0]
    hook_id = rows[0].split()[0]
    rc, out, _ = await run("deliveries", "--webhook", hook_id)
    assert (rc, out.strip()) == (0, "no deliveries")
    rc, out, _ = await run("webhook-remove", hook_id)
    assert (rc, out.strip()) == (0, f"webhook {hook_id} removed")
    rc, out, _ = await run("webhooks", "--tenant", TENANT)
    assert len(out.splitlines()) == 3  # the global one is still there
