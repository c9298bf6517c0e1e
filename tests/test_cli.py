"""Operator commands against the real PostgreSQL: provisioning is idempotent and
converges, refusals exit 1 with a code and write nothing, usage and calls read as
tables and CSV, 'live' asks a running gateway."""

from __future__ import annotations

import asyncio
import csv
import io
import pathlib
import sys
import tomllib
from dataclasses import fields
from decimal import Decimal

import pytest

from gateway import cli
from gateway.billing.views import as_dict
from gateway.config import Config, load
from tests.support.agi import agi_outbound
from tests.support.database import dump_tables
from tests.support.gateway import READ, running_gateway
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "provision.toml"


class Cli:
    """Runs one command in this event loop with a config file of its own."""

    def __init__(self, config: pathlib.Path):
        self.config = config

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = await cli.run(list(argv), config_path=str(self.config), environ={}, out=out,
                           err=err)
        return rc, out.getvalue(), err.getvalue()


def config_file(path: pathlib.Path, database_url: str = "", **extra: object) -> pathlib.Path:
    lines = [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
    lines += ["[database]", f'url = "{database_url}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def run(tmp_path, database_url, repo):  # repo: the tables start empty
    return Cli(config_file(tmp_path / "gateway.toml", database_url))


# ---- provision -----------------------------------------------------------------------------


async def test_provisioning_the_example_twice_gives_the_same_state(run, db_pool, admin, views):
    rc, out, err = await run("provision", str(EXAMPLE))
    assert (rc, err) == (0, ""), err
    assert "maple-dental: tenant created" in out
    first = await dump_tables(db_pool)

    rc, out, err = await run("provision", str(EXAMPLE))
    assert (rc, err) == (0, "")
    assert out.strip().endswith("no changes (already applied)"), out
    assert await dump_tables(db_pool) == first

    # what the file says is what exists
    usage = as_dict(await views.usage("maple-dental"))
    assert [(p["country"], p["capacity_minutes"]) for p in usage["pools"]] == [
        ("CA", Decimal("9000.00"))]  # 3 users hold the Calling Plan
    assert [a["user_id"] for a in usage["international_addon"]] == [
        "sophie.tremblay@maple-dental"]
    assert usage["wallet"]["balance"] == 0  # top-ups are not provisioned
    assert usage["wallet"]["auto_recharge"]["enabled"] is True
    assert usage["wallet"]["auto_recharge"]["amount"] == Decimal("50")
    lab = await admin.get_user("lab@maple-dental")
    assert lab["licences"] == [] and lab["extension"] == "209"
    subs = {r["sku"]: (r["quantity"], r["assigned"])
            for r in await admin.repo.subscriptions("maple-dental")}
    assert subs == {"business_voice_calling_plan": (5, 3), "international_calling_plan": (1, 1),
                    "business_voice": (0, 0)}
    numbers = {r["e164"]: r["kind"] for r in await admin.repo.list_numbers("maple-dental")}
    assert numbers == {"+14165550140": "user", "+14165550141": "user",
                       "+18885550142": "toll_free"}
    own = await admin.repo.list_rates("maple-dental")
    assert [(r["prefix"], r["price_per_minute"]) for r in own] == [("33", Decimal("0.04"))]
    assert len(await admin.repo.list_rates(None)) == 5
    assert first["ledger"] == []


V1 = """
[[tenants]]
id = "acme"
name = "Acme"
country = "CA"
[tenants.subscriptions]
business_voice_calling_plan = 2
international_calling_plan = 1
business_voice = 0
[[tenants.users]]
id = "alice"
sip_endpoint = "alice"
usage_location = "CA"
extension = "101"
licences = ["business_voice_calling_plan"]
[[tenants.users]]
id = "bob"
sip_endpoint = "bob"
usage_location = "CA"
licences = ["international_calling_plan", "business_voice_calling_plan"]
[[tenants.numbers]]
e164 = "+18005550199"
kind = "toll_free"
target = "alice"
"""

# bob gives up his Calling Plan (and the add-on) for Business Voice; carol takes the
# freed Calling Plan licence; the add-on purchase drops to 0; the toll-free number now
# rings bob; the tenant is renamed.
V2 = """
[[tenants]]
id = "acme"
name = "Acme Inc"
country = "CA"
blocked_classes = ["premium_rate", "international"]
[tenants.subscriptions]
business_voice_calling_plan = 2
international_calling_plan = 0
business_voice = 1
[[tenants.users]]
id = "alice"
sip_endpoint = "alice"
usage_location = "CA"
extension = "101"
display_name = "Alice"
licences = ["business_voice_calling_plan"]
[[tenants.users]]
id = "bob"
sip_endpoint = "bob"
usage_location = "CA"
licences = ["business_voice"]
[[tenants.users]]
id = "carol"
sip_endpoint = "carol"
usage_location = "CA"
licences = ["business_voice_calling_plan"]
[[tenants.numbers]]
e164 = "+18005550199"
kind = "toll_free"
target = "bob"
"""


async def test_provisioning_converges_on_what_the_file_says(run, db_pool, admin, tmp_path):
    v1, v2 = tmp_path / "v1.toml", tmp_path / "v2.toml"
    v1.write_text(V1)
    v2.write_text(V2)
    assert (await run("provision", str(v1)))[0] == 0
    rc, out, err = await run("provision", str(v2))
    assert rc == 0, err
    assert "acme: user bob: unassigned international_calling_plan" in out
    assert "acme: user bob: assigned business_voice" in out
    state = await dump_tables(db_pool)
    assert (await run("provision", str(v2)))[1].strip().endswith("no changes (already applied)")
    assert await dump_tables(db_pool) == state

    users = {u["id"]: u for u in await admin.repo.list_users(TENANT)}
    assert {k: u["licences"] for k, u in users.items()} == {
        "alice": ["business_voice_calling_plan"], "bob": ["business_voice"],
        "carol": ["business_voice_calling_plan"]}
    assert users["alice"]["display_name"] == "Alice"
    tenant = await admin.get_tenant(TENANT)
    assert tenant["name"] == "Acme Inc"
    assert sorted(tenant["blocked_classes"]) == ["international", "premium_rate"]
    subs = {r["sku"]: r["quantity"] for r in await admin.repo.subscriptions(TENANT)}
    assert subs == {"business_voice_calling_plan": 2, "international_calling_plan": 0,
                    "business_voice": 1}
    number = await admin.repo.find_inbound_number("+18005550199")
    assert number.target == "bob"


async def test_a_deleted_user_in_the_file_again_is_reactivated_with_its_history(
        run, admin, rater, tmp_path, views):
    # issue 8 item 4: deleting bob cascaded to his add-on counter, so provisioning him
    # again gave the month's used add-on minutes back
    v1 = tmp_path / "v1.toml"
    v1.write_text(V1)
    assert (await run("provision", str(v1)))[0] == 0
    await admin.set_rates([{"kind": "international", "prefix": "44",
                            "price_per_minute": "0.10"}])
    call = await rater.authorise_outbound("bob", "+442079460000")
    await rater.settle(call.call_id, 290)  # 300 s of add-on minutes
    await admin.deactivate_user("bob")
    assert await admin.repo.find_user("bob") is None
    rc, out, err = await run("provision", str(v1))
    assert rc == 0, err
    assert "acme: user bob reactivated" in out
    assert "acme: user bob: assigned international_calling_plan" in out
    usage = as_dict(await views.usage(TENANT))
    [addon] = usage["international_addon"]
    assert (addon["user_id"], addon["used_seconds"]) == ("bob", 300)
    await ledger_agrees(admin.repo)


BAD_FILES = [
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\ncolour = 'red'\n",
     "UNKNOWN_FIELD", "tenants[0].colour"),
    ("[[topups]]\ntenant = 'a'\namount = '5'\n", "UNKNOWN_FIELD", "not part of provisioning"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\n[tenants.wallet]\nbalance = '9'\n",
     "UNKNOWN_FIELD", "gateway topup"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\n", "MISSING_FIELD", "tenants[0].country"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\n[tenants.subscriptions]\n"
     "business_voice = '3'\n", "INVALID_TYPE", "tenants[0].subscriptions.business_voice"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\n[[tenants.users]]\nid = 'u'\n"
     "sip_endpoint = 'u'\nusage_location = 'CA'\n[[tenants.users]]\nid = 'u'\n"
     "sip_endpoint = 'v'\nusage_location = 'CA'\n", "DUPLICATE", "tenants[0].users[1].id"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\n[[tenants.users]]\nid = 'u'\n"
     "sip_endpoint = 'u'\nusage_location = 'CA'\nlicences = 'business_voice'\n",
     "INVALID_TYPE", "tenants[0].users[0].licences"),
    ("[[rates]]\nkind = 'international'\nprefix = '33'\nprice_per_minute = 0.05\n",
     "INVALID_AMOUNT", "decimal string, not a float"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'QQ'\n", "UNKNOWN_COUNTRY",
     "tenants[0] a: country"),
    ("[[allotments]]\ncountry = 'CA'\nplan = 'monthly'\nminutes = 5\n", "INVALID_PLAN",
     "allotments[0]"),
    # the file's entities are checked by the admin API's own schemas
    ("[[rates]]\nkind = 'international'\nprefix = '33'\nprice_per_minute = '1_000'\n",
     "INVALID_AMOUNT", "rates[0].price_per_minute"),
    ("[[tenants]]\nid = 'a'\nname = \"A\\u0000\"\ncountry = 'CA'\n", "INVALID_TEXT",
     "tenants[0].name"),
    ("[[tenants]]\nid = 'a'\nname = 'A'\ncountry = 'CA'\n[tenants.wallet.auto_recharge]\n"
     "enabled = true\nthreshold = '5'\namount = '1E+2'\nmonthly_cap = 3\n",
     "INVALID_AMOUNT", "tenants[0].wallet.auto_recharge.amount"),
    ("tenants = [\n", "INVALID_TOML", "bad.toml"),
    ("tenants = 'acme'\n", "INVALID_TYPE", "tenants must be a list"),
]


@pytest.mark.parametrize("text,code,detail", BAD_FILES, ids=[b[1] for b in BAD_FILES])
async def test_a_bad_file_exits_1_with_its_code_and_writes_nothing(run, db_pool, tmp_path,
                                                                   text, code, detail):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    before = await dump_tables(db_pool)
    rc, out, err = await run("provision", str(path))
    assert rc == 1
    assert err.startswith(f"gateway: {code}: "), err
    assert detail in err
    assert out == ""
    assert await dump_tables(db_pool) == before


async def test_a_conflict_with_the_database_names_where(run, admin, tmp_path):
    await standard_tenant(admin)
    path = tmp_path / "moved.toml"
    path.write_text("[[tenants]]\nid = 'acme'\nname = 'Acme'\ncountry = 'US'\n")
    rc, _, err = await run("provision", str(path))
    assert rc == 1
    assert err.startswith("gateway: READ_ONLY_FIELD: tenants[0] acme: country is CA"), err
    path.write_text("[[tenants]]\nid = 'other'\nname = 'O'\ncountry = 'CA'\n"
                    "[[tenants.users]]\nid = 'alice'\nsip_endpoint = 'alice'\n"
                    "usage_location = 'CA'\n")
    rc, _, err = await run("provision", str(path))
    assert err.startswith("gateway: USER_OF_OTHER_TENANT: tenants[0] other: users[0] alice: "
                          "user alice belongs to tenant acme"), err
    rc, _, err = await run("provision", str(tmp_path / "missing.toml"))
    assert rc == 1 and err.startswith("gateway: FILE_NOT_FOUND: ")


def six_users(tenant: str, name: str) -> str:
    """A file whose 6th user asks for a Calling Plan licence beyond the 5 purchased: only
    the licence rules, under the subscription's row lock, can refuse it."""
    users = "".join(f"[[tenants.users]]\nid = 'u{i}'\nsip_endpoint = 'u{i}'\n"
                    f"usage_location = 'CA'\nlicences = ['business_voice_calling_plan']\n"
                    for i in range(1, 7))
    return ("[[allotments]]\ncountry = 'CA'\nplan = 'domestic'\nminutes = 1234\n"
            "[[rates]]\nkind = 'international'\nprefix = '33'\nprice_per_minute = '0.05'\n"
            f"[[tenants]]\nid = '{tenant}'\nname = '{name}'\ncountry = 'CA'\n"
            "[tenants.subscriptions]\nbusiness_voice_calling_plan = 5\n" + users)


async def test_a_file_refused_at_its_sixth_user_writes_nothing(run, db_pool, tmp_path):
    path = tmp_path / "six.toml"
    path.write_text(six_users("acme", "Acme"))
    before = await dump_tables(db_pool)
    rc, out, err = await run("provision", str(path))
    assert rc == 1
    assert err.startswith("gateway: LICENCE_LIMIT: tenants[0] acme: users[5] u6: "), err
    # not the allotment and rates written first, not the tenant, nor the 5 users before
    counts = await db_pool.fetchrow(
        "SELECT (SELECT count(*) FROM tenants) AS tenants,"
        " (SELECT count(*) FROM users) AS users,"
        " (SELECT count(*) FROM licence_assignments) AS licences,"
        " (SELECT count(*) FROM subscriptions) AS subscriptions,"
        " (SELECT count(*) FROM wallets) AS wallets,"
        " (SELECT count(*) FROM rates) AS rates,"
        " (SELECT count(*) FROM allotments WHERE minutes = 1234) AS allotments")
    assert dict(counts) == {"tenants": 0, "users": 0, "licences": 0, "subscriptions": 0,
                            "wallets": 0, "rates": 0, "allotments": 0}
    assert await dump_tables(db_pool) == before
    assert out == ""  # no change is reported: none was made


async def test_a_refused_file_leaves_an_existing_tenant_as_it_was(run, db_pool, admin,
                                                                  tmp_path):
    await standard_tenant(admin)
    before = await dump_tables(db_pool)
    path = tmp_path / "six.toml"
    # the rename and the 6 users are written first; the purchase of 10 shrinks to 5
    # last, below the 8 licences assigned by then, and is refused
    path.write_text(six_users(TENANT, "Renamed"))
    rc, out, err = await run("provision", str(path))
    assert rc == 1
    assert err.startswith("gateway: LICENCES_IN_USE: tenants[0] acme: subscriptions."), err
    assert await dump_tables(db_pool) == before
    assert out == ""
    assert await db_pool.fetchval("SELECT name FROM tenants WHERE id = $1", TENANT) != "Renamed"


async def test_dry_run_prints_the_changes_and_writes_nothing(run, db_pool, tmp_path):
    v1 = tmp_path / "v1.toml"
    v1.write_text(V1)
    before = await dump_tables(db_pool)
    rc, dry, err = await run("provision", "--dry-run", str(v1))
    assert (rc, err) == (0, ""), err
    assert await dump_tables(db_pool) == before
    assert await db_pool.fetchval("SELECT count(*) FROM tenants") == 0
    assert dry.splitlines()[-1] == f"{v1}: 10 changes to make (dry run: nothing written)"

    rc, out, err = await run("provision", str(v1))
    assert (rc, err) == (0, "")
    assert dry.splitlines()[:-1] == out.splitlines()[:-1]  # the changes it said it would make
    assert "acme: tenant created" in out and "acme: user bob: assigned " \
        "international_calling_plan" in out
    after = await dump_tables(db_pool)
    rc, dry, err = await run("provision", str(v1), "--dry-run")
    assert (rc, dry, err) == (0, f"{v1}: no changes to make (dry run)\n", "")

    # a dry run is refused where the real run would be, by the same rules
    six = tmp_path / "six.toml"
    six.write_text(six_users("other", "Other"))
    rc, out, err = await run("provision", "--dry-run", str(six))
    assert (rc, out) == (1, "") and err.startswith("gateway: LICENCE_LIMIT: "), err
    assert await dump_tables(db_pool) == after


# ---- topup, import-rates, usage, calls -------------------------------------------------


async def test_topup_and_usage_as_table_and_csv(run, admin, rater):
    await standard_tenant(admin)
    rc, out, err = await run("topup", TENANT, "12.50", "--note", "invoice 7")
    assert (rc, err) == (0, "")
    assert out.strip() == "acme: topped up 12.50 USD; balance 12.50 USD"
    assert [(x["d_balance"], x["note"]) for x in await admin.repo.ledger(TENANT)] == [
        (Decimal("12.5"), "invoice 7")]
    call = await rater.authorise_outbound("alice", "+15145550123")
    await rater.settle(call.call_id, 61)

    rc, out, _ = await run("usage", TENANT, "--month", "2026-11")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "acme (Acme Ltd) - 2026-11 - USD, America/Toronto"
    pool_line = next(line for line in lines if line.startswith("CA "))
    assert pool_line.split() == ["CA", "6000.00", "2.00", "0.00", "5998.00"]
    wallet = lines[lines.index("Wallet (USD)") + 3].split()
    assert wallet[:4] == ["12.50", "0.00", "12.50", "off"]
    calls = next(line for line in lines if line.startswith("outbound "))
    assert calls.split() == ["outbound", "domestic", "ALLOW", "1", "2:00", "0.00"]

    rc, out, _ = await run("usage", TENANT, "--month", "2026-11", "--csv")
    assert rc == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["tenant", "month", "section", "item", "metric", "value"]
    figures = {(r[2], r[3], r[4]): r[5] for r in rows[1:]}
    assert figures[("pool", "CA", "capacity_minutes")] == "6000.00"
    assert figures[("pool", "CA", "used_minutes")] == "2.00"
    assert figures[("wallet", "USD", "balance")] == "12.500000"
    assert figures[("wallet", "USD", "auto_recharge_enabled")] == "false"
    assert figures[("calls", "outbound/domestic/ALLOW", "billed_seconds")] == "120"
    assert figures[("international_addon", "bob", "capacity_minutes")] == "600.00"

    rc, out, _ = await run("usage", TENANT, "--month", "2026-10", "--csv")
    assert "used_minutes,0.00" in out and "outbound/" not in out


async def test_calls_as_table_and_csv(run, admin, rater):
    await standard_tenant(admin, wallet="5")
    ok = await rater.authorise_outbound("alice", "+442071234567")  # international
    refused = await rater.authorise_outbound("carol", "+15145550123")
    await rater.settle(ok.call_id, 30)
    rc, out, _ = await run("calls", TENANT, "--month", "2026-11")
    assert rc == 0
    assert out.splitlines()[0].split()[:3] == ["authorised", "(UTC)", "dir"]
    assert "NO_LICENSE" in out and "+442071234567" in out
    rc, out, _ = await run("calls", TENANT, "--csv", "--limit", "5")
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {str(ok.call_id), str(refused.call_id)}
    assert rows[str(ok.call_id)]["state"] == "settled"
    assert rows[str(ok.call_id)]["billed_seconds"] == "60"
    assert Decimal(rows[str(ok.call_id)]["charged_amount"]) == Decimal("0.05")
    assert rows[str(ok.call_id)]["sources"] == "wallet"
    assert rows[str(refused.call_id)]["reason"] == "NO_LICENSE"
    rc, out, _ = await run("calls", TENANT, "--month", "2026-01")
    assert (rc, out.strip()) == (0, "acme: no calls in 2026-01")


async def test_import_rates(run, admin, tmp_path):
    await standard_tenant(admin)
    sheet = tmp_path / "rates.csv"
    sheet.write_text("kind,prefix,price_per_minute,increment,description\n"
                     "international,33,0.031,6,France\ninternational,+49,0.04,,Germany\n")
    rc, out, err = await run("import-rates", str(sheet), "--tenant", TENANT)
    assert (rc, err) == (0, ""), err
    assert out.strip() == "imported 2 rates for tenant acme"
    own = {r["prefix"]: r for r in await admin.repo.list_rates(TENANT)}
    assert own["33"]["increment"] == 6 and own["49"]["price_per_minute"] == Decimal("0.04")

    before = await admin.repo.list_rates(None)
    sheet.write_text("kind,prefix,price_per_minute\ninternational,34,0.1\nbogus,35,0.1\n")
    rc, out, err = await run("import-rates", str(sheet))
    assert rc == 1 and err.startswith("gateway: INVALID_KIND: ") and "line 3" in err
    assert await admin.repo.list_rates(None) == before  # all or nothing


@pytest.mark.parametrize("argv,code", [
    (["usage", "nope"], "UNKNOWN_TENANT"),
    (["usage", TENANT, "--month", "2026-13"], "INVALID_MONTH"),
    (["calls", TENANT, "--limit", "0"], "INVALID_LIMIT"),
    (["topup", TENANT, "ten"], "INVALID_AMOUNT"),
    (["topup", TENANT, "-1"], "INVALID_AMOUNT"),
    (["topup", "nope", "1"], "UNKNOWN_TENANT"),
])
async def test_refusals_exit_1_with_a_code(run, admin, db_pool, argv, code):
    await standard_tenant(admin)
    before = await dump_tables(db_pool)
    rc, out, err = await run(*argv)
    assert (rc, out) == (1, "")
    assert err.startswith(f"gateway: {code}: "), err
    assert await dump_tables(db_pool) == before


async def test_command_line_mistakes_and_help(run, tmp_path):
    rc, out, err = await run("frobnicate")
    assert rc == 2 and err.startswith("gateway: USAGE: ") and "frobnicate" in err
    rc, out, err = await run("usage")
    assert rc == 2 and "tenant" in err
    rc, out, err = await run("help")
    assert rc == 0 and err == ""
    for command in ("provision", "topup", "import-rates", "usage", "calls", "live"):
        assert f"gateway {command}" in out
    # no database URL: the commands open the embedded database of data_dir
    embedded = Cli(config_file(tmp_path / "empty.toml", data_dir=str(tmp_path / "var")))
    rc, out, err = await embedded("usage", TENANT)
    assert rc == 1 and err.startswith("gateway: UNKNOWN_TENANT: "), err
    assert (tmp_path / "var" / "pgdata" / "PG_VERSION").exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("agi_port = 'many'\n")
    rc, out, err = await Cli(broken)("usage", TENANT)
    assert rc == 1 and err.startswith("gateway: CONFIG_ERROR: agi_port")


# ---- live ------------------------------------------------------------------------------


async def test_live_reads_the_running_gateway(tmp_path, database_url, admin):
    await standard_tenant(admin, wallet="5")
    async with running_gateway(database_url) as gw:
        reply = await agi_outbound(gw.agi.port, "alice", "+15145550123")
        assert reply["GW_DECISION"] == "ALLOW"
        live = Cli(config_file(tmp_path / "live.toml", read_token=READ,
                               http_port=gw.http_port))
        rc, out, err = await live("live")
        assert (rc, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == "gateway ready; 1 live call"
        row = lines[3].split()
        assert row[:6] == ["out", TENANT, "alice", "+15145550123", "pstn", "ringing"]
        assert row[-1] == "pool+wallet"

        wrong = Cli(config_file(tmp_path / "wrong.toml", read_token="nope",
                                http_port=gw.http_port))
        rc, out, err = await wrong("live")
        assert rc == 1 and err.startswith("gateway: UNAUTHORIZED: ")
        port = gw.http_port
    rc, out, err = await Cli(config_file(tmp_path / "gone.toml", http_port=port))("live")
    assert rc == 1 and err.startswith("gateway: GATEWAY_UNREACHABLE: ")


# ---- the shipped files and the entry point ------------------------------------------------


def test_example_configuration_documents_every_key():
    path = ROOT / "gateway.example.toml"
    assert load(path, environ={}) == Config()  # every value shown is the default
    data = tomllib.loads(path.read_text())
    flat = set()
    for section, value in data.items():
        if isinstance(value, dict):
            flat |= {f"{section}_{k}" for k in value}
        else:
            flat.add(section)
    documented = {f.name for f in fields(Config) if f.name != "extra"}
    assert flat == documented


async def test_the_entry_point_runs_operator_commands(run, admin):
    await standard_tenant(admin, wallet="3")

    async def gateway(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--config", str(run.config), *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={"PATH": "/usr/bin:/bin"})
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    (rc, out, err), (rc2, out2, err2) = await asyncio.gather(
        gateway("usage", TENANT, "--month", "2026-11", "--csv"),
        gateway("usage", "nope"))
    assert rc == 0, err
    assert out.splitlines()[0] == "tenant,month,section,item,metric,value"
    assert "acme,2026-11,wallet,USD,balance,3.000000" in out
    assert (rc2, out2) == (1, "")
    assert err2.strip() == "gateway: UNKNOWN_TENANT: no such tenant: nope"
