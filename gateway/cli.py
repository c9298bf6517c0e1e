"""Operator commands that work directly on the database (``database_url``), plus
``live``, which asks a running gateway over HTTP.

    gateway provision FILE.toml          declarative, idempotent provisioning
    gateway topup TENANT AMOUNT [--note TEXT]
    gateway import-rates FILE.csv [--tenant TENANT]
    gateway usage TENANT [--month YYYY-MM] [--csv]
    gateway calls TENANT [--month YYYY-MM] [--limit N] [--csv]
    gateway live                         live calls of the running gateway (GET /status)
    gateway help

Errors print ``gateway: CODE: message`` on stderr and exit 1 (2 for a wrong command
line). Every write goes through Provisioning, which checks it before writing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import pathlib
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, TextIO

from .config import Config, ConfigError, load
from .errors import Conflict, GatewayError, InvalidInput

HELP = "Operator commands (serve and migrate: see 'gateway --help'):\n\n" + \
    __doc__.split("\n\n")[1].rstrip() + """

provision FILE.toml applies the file: tenants are created or updated; subscriptions,
users, numbers, rates, allotments and wallet auto-recharge are set to what it says;
each user listed ends up with exactly the licences listed for them. Users, numbers and
rates the file does not mention are left alone. Top-ups are not part of provisioning
(running a file twice must not pay twice): use 'gateway topup'. See
examples/provision.toml.

Options before the command: --config FILE (default $GATEWAY_CONFIG)."""


class CliError(GatewayError):
    """A failure of the command itself (file, database, gateway unreachable)."""

    code = "CLI_ERROR"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit(2) on its own
        raise _UsageError(message)


# ---- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str], config_path: str | None = None,
         environ: dict[str, str] | None = None) -> int:
    """Run one operator command; return the exit code."""
    return asyncio.run(run(argv, config_path=config_path, environ=environ))


async def run(argv: Sequence[str], config_path: str | None = None,
              environ: dict[str, str] | None = None, *, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _parser().parse_args(list(argv))
    except _UsageError as exc:
        print(f"gateway: USAGE: {exc} (see 'gateway help')", file=err)
        return 2
    if args.command in (None, "help"):
        print(HELP, file=out)
        return 0
    try:
        cfg = load(config_path, environ)
        await args.handler(cfg, args, out)
    except ConfigError as exc:
        print(f"gateway: CONFIG_ERROR: {exc}", file=err)
        return 1
    except GatewayError as exc:
        where = f" (field {exc.field})" if exc.field and exc.field not in exc.message else ""
        print(f"gateway: {exc.code}: {exc.message}{where}", file=err)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", add_help=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("help", add_help=False)
    p = sub.add_parser("provision", add_help=False)
    p.add_argument("file")
    p.set_defaults(handler=_provision)
    p = sub.add_parser("topup", add_help=False)
    p.add_argument("tenant")
    p.add_argument("amount")
    p.add_argument("--note", default="manual top-up")
    p.set_defaults(handler=_topup)
    p = sub.add_parser("import-rates", add_help=False)
    p.add_argument("file")
    p.add_argument("--tenant")
    p.set_defaults(handler=_import_rates)
    p = sub.add_parser("usage", add_help=False)
    p.add_argument("tenant")
    p.add_argument("--month")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(handler=_usage)
    p = sub.add_parser("calls", add_help=False)
    p.add_argument("tenant")
    p.add_argument("--month")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--csv", action="store_true")
    p.set_defaults(handler=_calls)
    p = sub.add_parser("live", add_help=False)
    p.set_defaults(handler=_live)
    return parser


class _Db:
    """The database of the configuration, opened for one command."""

    def __init__(self, cfg: Config):
        # no URL: the same embedded database `gateway serve` uses (shared, not stopped
        # while the gateway holds it)
        self.url = cfg.database_url
        self.data_path = pathlib.Path(cfg.data_dir).resolve() / "pgdata"
        self.embedded: Any = None
        self.pool: Any = None

    async def __aenter__(self) -> Any:
        import asyncpg

        from .billing.provisioning import Provisioning
        from .store.pool import open_pool, start_embedded_async
        from .store.repository import Repository

        if not self.url:
            try:
                self.url, self.embedded = await start_embedded_async(self.data_path)
            except Exception as exc:  # noqa: BLE001 - pgserver raises its own kinds
                raise CliError(f"cannot start the embedded database in {self.data_path}: "
                               f"{exc}", code="DATABASE_UNAVAILABLE") from exc
        try:
            self.pool = await asyncio.wait_for(
                open_pool(self.url, min_size=1, max_size=4), timeout=15)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise CliError(f"cannot connect to the database: {exc}",
                           code="DATABASE_UNAVAILABLE") from exc
        return Provisioning(Repository(self.pool))

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.embedded is not None:
            self.embedded.cleanup()


def _read(path: str, what: str) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise CliError(f"{what} {path}: no such file", code="FILE_NOT_FOUND") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} {path}: {exc}", code="FILE_UNREADABLE") from exc


def _month(value: str | None) -> dt.date | None:
    from .http.api import parse_month

    return parse_month(value)


# ---- small commands --------------------------------------------------------------------


async def _topup(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with _Db(cfg) as admin:
        tenant = await admin.get_tenant(args.tenant)
        balance = await admin.topup(args.tenant, args.amount, args.note)
    print(f"{args.tenant}: topped up {args.amount} {tenant['currency']}; balance "
          f"{_money(balance)} {tenant['currency']}", file=out)


async def _import_rates(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    text = _read(args.file, "rate file")
    async with _Db(cfg) as admin:
        count = await admin.import_rates_csv(text, args.tenant)
    scope = f"tenant {args.tenant}" if args.tenant else "every tenant"
    print(f"imported {count} rates for {scope}", file=out)


async def _usage(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    month = _month(args.month)
    async with _Db(cfg) as admin:
        usage = await admin.usage(args.tenant, month)
        tenant = await admin.get_tenant(args.tenant)
    if args.csv:
        _usage_csv(usage, out)
    else:
        _usage_table(usage, tenant, out)


async def _calls(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    month = _month(args.month)
    if not 1 <= args.limit <= 100_000:
        raise InvalidInput("--limit must be from 1 to 100000", code="INVALID_LIMIT",
                           field="limit")
    async with _Db(cfg) as admin:
        await admin.get_tenant(args.tenant)
        rows = [dict(r) for r in await admin.repo.list_calls(args.tenant, month, args.limit)]
    if args.csv:
        columns = ["id", "authorised_at", "direction", "user_id", "caller", "destination",
                   "number_class", "decision", "reason", "route", "state", "answered_at",
                   "ended_at", "billed_seconds", "charged_amount", "rate_kind",
                   "price_per_minute", "sources"]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_csv_cell(r.get(c)) for c in columns])
        return
    if not rows:
        print(f"{args.tenant}: no calls" + (f" in {args.month}" if args.month else ""),
              file=out)
        return
    print(_table(
        ["authorised (UTC)", "dir", "caller", "destination", "decision", "reason", "state",
         "billed", "charged"],
        [[r["authorised_at"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
          r["direction"][:3], r["caller"], r["destination"], r["decision"], r["reason"],
          r["state"], _duration(r["billed_seconds"]),
          _money(r["charged_amount"]) if r["charged_amount"] is not None else ""]
         for r in rows]), file=out)


async def _live(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    import aiohttp

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.http_host,
                                                                     cfg.http_host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.http_port}/status"
    token = cfg.read_token or cfg.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
                s.get(url, headers=headers) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise CliError(f"cannot read {url}: {exc or type(exc).__name__}",
                       code="GATEWAY_UNREACHABLE") from exc
    if response.status != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise CliError(f"{url} answered {response.status}: {error.get('message', '')}",
                       code=error.get("code", "GATEWAY_ERROR"))
    calls = body.get("live_calls", [])
    print(f"gateway {'ready' if body.get('ready') else 'NOT READY'}; "
          f"{len(calls)} live call{'s' if len(calls) != 1 else ''}", file=out)
    if calls:
        print(_table(
            ["dir", "tenant", "caller", "destination", "route", "state", "talk", "funded",
             "source"],
            [[c["direction"][:3], c.get("tenant_id") or "", c["caller"], c["destination"],
              c.get("route") or "", c["state"], _duration(c.get("talk_seconds")),
              "unlimited" if c.get("funded_seconds") is None
              else _duration(c["funded_seconds"]), c.get("source") or ""]
             for c in calls]), file=out)


# ---- rendering -----------------------------------------------------------------------------


def _money(value: Decimal | None) -> str:
    """At least two decimals, more only when they matter: 12.50, 0.0125."""
    if value is None:
        return ""
    value = Decimal(value)
    normal = value.normalize()
    if normal.as_tuple().exponent > -2:  # type: ignore[operator]
        return f"{value.quantize(Decimal('0.01'))}"
    return f"{normal:f}"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    s = int(round(float(seconds)))
    return f"{s // 60}:{s % 60:02d}"


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])


def _usage_table(u: dict[str, Any], tenant: dict[str, Any], out: TextIO) -> None:
    cur = u["currency"]
    print(f"{u['tenant_id']} ({tenant['name']}) - {u['month'][:7]} - {cur}, "
          f"{tenant['timezone']}", file=out)
    minutes = ["capacity min", "used min", "reserved min", "remaining min"]

    def mins(r: dict[str, Any]) -> list[Any]:
        return [r["capacity_minutes"], r["used_minutes"], r["reserved_minutes"],
                r["remaining_minutes"]]

    print("\nDomestic Calling Plan pools", file=out)
    if u["pools"]:
        print(_table(["country", *minutes], [[p["country"], *mins(p)] for p in u["pools"]]),
              file=out)
    else:
        print("(none: no user holds business_voice_calling_plan)", file=out)
    if u["international_addon"]:
        print("\nInternational Calling Plan", file=out)
        print(_table(["user", *minutes],
                     [[a["user_id"], *mins(a)] for a in u["international_addon"]]), file=out)
    w = u["wallet"]
    ar = w["auto_recharge"]
    recharge = (f"{_money(ar['amount'])} below {_money(ar['threshold'])}, "
                f"{ar['recharges_this_month']}/{ar['monthly_cap']} this month"
                if ar["enabled"] else "off")
    print(f"\nWallet ({cur})", file=out)
    print(_table(["balance", "reserved", "available", "auto-recharge"],
                 [[_money(w["balance"]), _money(w["reserved"]), _money(w["available"]),
                   recharge]]), file=out)
    print("\nCalls", file=out)
    if u["calls"]:
        print(_table(["direction", "class", "decision", "calls", "billed", f"charged {cur}"],
                     [[c["direction"], c["number_class"], c["decision"], c["calls"],
                       _duration(c["billed_seconds"]), _money(c["charged"])]
                      for c in u["calls"]]), file=out)
    else:
        print("(none this month)", file=out)


def _usage_csv(u: dict[str, Any], out: TextIO) -> None:
    """Long format, one figure per row: tenant,month,section,item,metric,value."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tenant", "month", "section", "item", "metric", "value"])
    month = u["month"][:7]

    def row(section: str, item: str, metric: str, value: Any) -> None:
        writer.writerow([u["tenant_id"], month, section, item, metric, _csv_cell(value)])

    for section, key, items in (("pool", "country", u["pools"]),
                                ("international_addon", "user_id", u["international_addon"])):
        for p in items:
            for metric in ("capacity_minutes", "used_minutes", "reserved_minutes",
                           "remaining_minutes"):
                row(section, p[key], metric, p[metric])
    w = u["wallet"]
    for metric in ("balance", "reserved", "available"):
        row("wallet", u["currency"], metric, w[metric])
    for metric, value in w["auto_recharge"].items():
        row("wallet", u["currency"], f"auto_recharge_{metric}", value)
    for c in u["calls"]:
        item = f"{c['direction']}/{c['number_class']}/{c['decision']}"
        for metric in ("calls", "billed_seconds", "charged"):
            row("calls", item, metric, c[metric])


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return str(value)


# ---- provision -----------------------------------------------------------------------------

_TOP = {"tenants": list, "rates": list, "allotments": list}
_TENANT = {"id": str, "name": str, "country": str, "timezone": str, "currency": str,
           "blocked_classes": list, "subscriptions": dict, "users": list, "numbers": list,
           "rates": list, "wallet": dict}
_USER = {"id": str, "display_name": str, "sip_endpoint": str, "extension": str,
         "usage_location": str, "licences": list}
_NUMBER = {"e164": str, "kind": str, "user_id": str, "target": str}
_RATE = {"kind": str, "prefix": str, "price_per_minute": object, "first_increment": int,
         "increment": int, "currency": str, "description": str}
_ALLOTMENT = {"country": str, "plan": str, "minutes": int}
_WALLET = {"auto_recharge": dict}
_AUTO_RECHARGE = {"enabled": bool, "threshold": object, "amount": object, "monthly_cap": int}
_TYPE_NAMES = {str: "a string", int: "a whole number", bool: "true or false",
               list: "a list", dict: "a table", object: "a value"}
# Assign the base licence before the add-on, unassign the add-on before the base.
_LICENCE_ORDER = {"business_voice_calling_plan": 0, "business_voice": 0,
                  "international_calling_plan": 1}


def _check(table: Any, fields: dict[str, type], where: str, required: tuple[str, ...] = (),
           hints: dict[str, str] | None = None) -> dict[str, Any]:
    """The shape of one TOML table: known keys of the right type, required ones present."""
    if not isinstance(table, dict):
        raise InvalidInput(f"{where} must be a table", code="INVALID_FILE", field=where)
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            hint = (hints or {}).get(key, f"allowed: {', '.join(fields)}")
            raise InvalidInput(f"{path}: unknown key; {hint}", code="UNKNOWN_FIELD",
                               field=path)
        kind = fields[key]
        wrong = (not isinstance(value, kind) or (kind is int and isinstance(value, bool)))
        if wrong:
            raise InvalidInput(f"{path} must be {_TYPE_NAMES[kind]}", code="INVALID_TYPE",
                               field=path)
    for key in required:
        if key not in table:
            path = f"{where}.{key}" if where else key
            raise InvalidInput(f"{path} is required", code="MISSING_FIELD", field=path)
    return table


def _strings(value: list[Any], where: str) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{where} must be a list of strings", code="INVALID_TYPE",
                           field=where)
    return value


def _ids(items: list[dict[str, Any]], key: str, where: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item[key] in seen:
            raise InvalidInput(f"{where}[{i}].{key}: {item[key]} appears twice",
                               code="DUPLICATE", field=f"{where}[{i}].{key}")
        seen.add(item[key])


def check_provision_file(data: dict[str, Any]) -> dict[str, Any]:
    """Check the whole file's shape before anything is written."""
    _check(data, _TOP, "", hints={"topups": "top-ups are not part of provisioning "
                                  "(use 'gateway topup')"})
    for i, r in enumerate(data.get("rates", [])):
        _check(r, _RATE, f"rates[{i}]", ("kind", "prefix", "price_per_minute"))
    for i, a in enumerate(data.get("allotments", [])):
        _check(a, _ALLOTMENT, f"allotments[{i}]", ("country", "plan", "minutes"))
    tenants = data.get("tenants", [])
    for i, t in enumerate(tenants):
        w = f"tenants[{i}]"
        _check(t, _TENANT, w, ("id", "name", "country"))
        _strings(t.get("blocked_classes", []), f"{w}.blocked_classes")
        for sku, qty in t.get("subscriptions", {}).items():
            if isinstance(qty, bool) or not isinstance(qty, int):
                raise InvalidInput(f"{w}.subscriptions.{sku} must be a whole number",
                                   code="INVALID_TYPE", field=f"{w}.subscriptions.{sku}")
        users = t.get("users", [])
        for j, u in enumerate(users):
            _check(u, _USER, f"{w}.users[{j}]", ("id", "sip_endpoint", "usage_location"))
            _strings(u.get("licences", []), f"{w}.users[{j}].licences")
        _ids(users, "id", f"{w}.users")
        numbers = t.get("numbers", [])
        for j, n in enumerate(numbers):
            _check(n, _NUMBER, f"{w}.numbers[{j}]", ("e164", "kind"))
        _ids(numbers, "e164", f"{w}.numbers")
        for j, r in enumerate(t.get("rates", [])):
            _check(r, _RATE, f"{w}.rates[{j}]", ("kind", "prefix", "price_per_minute"))
        wallet = _check(t.get("wallet", {}), _WALLET, f"{w}.wallet", hints={
            k: "top-ups are not part of provisioning (use 'gateway topup')"
            for k in ("balance", "topup", "topups")})
        if "auto_recharge" in wallet:
            _check(wallet["auto_recharge"], _AUTO_RECHARGE, f"{w}.wallet.auto_recharge",
                   tuple(_AUTO_RECHARGE))
    _ids(tenants, "id", "tenants")
    return data


class _Where:
    """Prefixes the location in the file to a Provisioning error: 'tenants[0] acme: ...'."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, GatewayError):  # nested: the outer location comes first
            exc.message = f"{self.where}: {exc.message}"
            exc.args = (exc.message,)


async def provision(admin: Any, data: dict[str, Any], report: Callable[[str], None]) -> int:
    """Apply a checked provisioning file; return the number of changes made."""
    repo = admin.repo
    changes = 0

    def changed(line: str) -> None:
        nonlocal changes
        changes += 1
        report(line)

    if data.get("allotments"):
        before = {(a["country"], a["plan"]): a["minutes"] for a in await repo.allotments()}
        for i, a in enumerate(data["allotments"]):
            with _Where(f"allotments[{i}]"):
                await admin.set_allotment(a["country"], a["plan"], a["minutes"])
            if before.get((a["country"], a["plan"])) != a["minutes"]:
                changed(f"allotment {a['country']} {a['plan']}: {a['minutes']} minutes")
    if data.get("rates"):
        changes += await _rates(admin, data["rates"], None, "rates", report)
    for i, t in enumerate(data.get("tenants", [])):
        with _Where(f"tenants[{i}] {t['id']}"):
            changes += await _tenant(admin, t, report)
    return changes


async def _rates(admin: Any, rates: list[dict[str, Any]], tenant_id: str | None, where: str,
                 report: Callable[[str], None]) -> int:
    def snapshot(rows: Any) -> set[tuple[Any, ...]]:
        return {(r["currency"], r["kind"], r["prefix"], r["price_per_minute"],
                 r["first_increment"], r["increment"], r["description"]) for r in rows}

    before = snapshot(await admin.repo.list_rates(tenant_id))
    with _Where(where):
        await admin.set_rates(rates, tenant_id)
    after = snapshot(await admin.repo.list_rates(tenant_id))
    n = len(after - before)
    if n:
        report(f"rates{' of ' + tenant_id if tenant_id else ''}: {n} added or changed")
    return n


async def _tenant(admin: Any, t: dict[str, Any], report: Callable[[str], None]) -> int:
    repo = admin.repo
    tid = t["id"]
    changes = 0

    def changed(line: str) -> None:
        nonlocal changes
        changes += 1
        report(f"{tid}: {line}")

    existing = await repo.find_tenant(tid)
    if existing is None:
        await admin.create_tenant(tid, t["name"], t["country"], t.get("timezone", "UTC"),
                                  t.get("currency", "USD"),
                                  t.get("blocked_classes", ["premium_rate"]))
        changed("tenant created")
    else:
        for key, default in (("country", None), ("currency", "USD")):
            want = t.get(key, default)
            if want is not None and existing[key] != want:
                raise Conflict(f"{key} is {existing[key]} in the database and cannot be "
                               f"changed to {want}", code="READ_ONLY_FIELD", field=key)
        want = {"name": t["name"], "timezone": t.get("timezone", "UTC"),
                "blocked_classes": sorted(set(t.get("blocked_classes", ["premium_rate"])))}
        have = {"name": existing["name"], "timezone": existing["timezone"],
                "blocked_classes": sorted(existing["blocked_classes"])}
        diff = {k: v for k, v in want.items() if have[k] != v}
        if diff:
            await admin.update_tenant(tid, **diff)
            changed(f"tenant updated ({', '.join(diff)})")

    # Subscriptions grow first and shrink last, so that licences can move between users.
    subs = t.get("subscriptions", {})
    current = {r["sku"]: r["quantity"] for r in await repo.subscriptions(tid)}
    for sku, qty in subs.items():
        if qty > current.get(sku, 0) or sku not in current:
            with _Where(f"subscriptions.{sku}"):
                await admin.set_subscription(tid, sku, qty)
            changed(f"subscription {sku} = {qty}")

    users = t.get("users", [])
    found = {u["id"]: await repo.find_user(u["id"]) for u in users}
    for j, u in enumerate(users):  # unassign first: frees licences for the others
        row = found[u["id"]]
        if row is None:
            continue
        with _Where(f"users[{j}] {u['id']}"):
            if row["tenant_id"] != tid:
                raise Conflict(f"user {u['id']} belongs to tenant {row['tenant_id']}",
                               code="USER_OF_OTHER_TENANT", field="id")
            extra = set(row["licences"]) - set(u.get("licences", []))
            for sku in sorted(extra, key=lambda s: -_LICENCE_ORDER.get(s, 0)):
                await admin.unassign_licence(u["id"], sku)
                changed(f"user {u['id']}: unassigned {sku}")
    for j, u in enumerate(users):
        row = found[u["id"]]
        with _Where(f"users[{j}] {u['id']}"):
            if row is None:
                await admin.create_user(u["id"], tid, u["sip_endpoint"], u["usage_location"],
                                        u.get("extension"), u.get("display_name", ""))
                changed(f"user {u['id']} created")
                held: set[str] = set()
            else:
                if row["sip_endpoint"] != u["sip_endpoint"]:
                    raise Conflict(f"sip_endpoint is {row['sip_endpoint']} and cannot be "
                                   "changed", code="READ_ONLY_FIELD", field="sip_endpoint")
                want = {"display_name": u.get("display_name", ""),
                        "extension": u.get("extension"),
                        "usage_location": u["usage_location"]}
                diff = {k: v for k, v in want.items() if row[k] != v}
                if diff:
                    await admin.update_user(u["id"], **diff)
                    changed(f"user {u['id']} updated ({', '.join(diff)})")
                held = set(row["licences"]) & set(u.get("licences", []))
            for sku in sorted(set(u.get("licences", [])) - held,
                              key=lambda s: _LICENCE_ORDER.get(s, 0)):
                await admin.assign_licence(u["id"], sku)
                changed(f"user {u['id']}: assigned {sku}")

    for sku, qty in subs.items():
        if qty < current.get(sku, 0):
            with _Where(f"subscriptions.{sku}"):
                await admin.set_subscription(tid, sku, qty)
            changed(f"subscription {sku} = {qty}")

    have_numbers = {r["e164"]: r for r in await repo.list_numbers(tid)}
    for j, n in enumerate(t.get("numbers", [])):
        with _Where(f"numbers[{j}] {n['e164']}"):
            want = (n["kind"], n.get("user_id"), n.get("target"))
            row = have_numbers.get(n["e164"])
            if row is not None and (row["kind"], row["user_id"], row["target"]) == want:
                continue
            if row is None:
                other = await repo.find_inbound_number(n["e164"])
                if other is not None:
                    raise Conflict(f"{n['e164']} belongs to tenant {other.tenant_id}",
                                   code="NUMBER_OF_OTHER_TENANT", field="e164")
            else:
                # no update in place: replace it (its calls keep their own copy)
                await admin.delete_number(n["e164"])
            await admin.add_number(n["e164"], tid, n["kind"], n.get("user_id"),
                                   n.get("target"))
            changed(f"number {n['e164']} {'changed' if row is not None else 'added'}")

    if t.get("rates"):
        changes += await _rates(admin, t["rates"], tid, "rates", report)

    ar = t.get("wallet", {}).get("auto_recharge")
    if ar is not None:
        before = await repo.get_wallet(tid)
        with _Where("wallet.auto_recharge"):
            await admin.set_auto_recharge(tid, **ar)
        after = await repo.get_wallet(tid)
        keys = ("auto_recharge_enabled", "auto_recharge_threshold", "auto_recharge_amount",
                "auto_recharge_monthly_cap")
        if any(before[k] != after[k] for k in keys):
            changed("wallet auto-recharge set")
    return changes


async def _provision(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    text = _read(args.file, "provisioning file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{args.file}: {exc}", code="INVALID_TOML") from exc
    check_provision_file(data)
    async with _Db(cfg) as admin:
        changes = await provision(admin, data, lambda line: print(line, file=out))
    print(f"{args.file}: {changes} change{'s' if changes != 1 else ''}"
          if changes else f"{args.file}: no changes (already applied)", file=out)
