"""Operator commands that work directly on the database (``database_url``), plus
``live``, which asks a running gateway over HTTP.

    gateway provision FILE.toml [--dry-run]  declarative, idempotent provisioning
    gateway topup TENANT AMOUNT [--note TEXT]
    gateway import-rates FILE.csv [--tenant TENANT]
    gateway usage TENANT [--month YYYY-MM] [--csv]
    gateway calls TENANT [--month YYYY-MM] [--limit N] [--csv] [--user USER]
                 [--direction inbound|outbound] [--decision ALLOW|REJECT]
                 [--from YYYY-MM-DD] [--to YYYY-MM-DD]
    gateway forecast TENANT [--json]         when pools, add-ons and wallet run out
    gateway export TENANT [--month YYYY-MM] [--json] [--output FILE]
                                             a month's calls and totals (CSV or JSON)
    gateway live                             live calls of the running gateway (GET /status)
    gateway alerts [TENANT] [--state S] [--limit N] [--csv]
    gateway alert-ack ID [--note TEXT]       acknowledge an alert (seen)
    gateway alert-clear ID [--note TEXT]     clear an alert (resolved; lifts its block)
    gateway alert-settings TENANT [--set KEY=VALUE ...]
    gateway webhooks [--tenant TENANT]       subscriptions (secrets never shown)
    gateway webhook-add URL [--tenant T] [--events K,K] [--secret-file F]
    gateway webhook-remove ID
    gateway deliveries [--webhook ID] [--tenant T] [--state S] [--limit N]
    gateway delivery-retry DELIVERY_ID       send a dead delivery again
    gateway help

Errors print ``gateway: CODE: message`` on stderr and exit 1 (2 for a wrong command
line). This package is a surface: the command line, reading files, printing
(``render``). The billing layer comes from ``gateway.app.open_billing``; every write goes
through Provisioning, which checks it before writing, and a provisioning file is applied
by ``gateway.billing.provisioning_file``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import pathlib
import sys
import tomllib
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

from ..app import open_billing
from ..billing import reports, schemas
from ..billing.provisioning_file import apply_provision_file, check_provision_file
from ..billing.views import as_dict
from ..config import Config, ConfigError, load
from ..errors import GatewayError, InvalidInput
from . import render

HELP = "Operator commands (serve and migrate: see 'gateway --help'):\n\n" + \
    __doc__.split("\n\n")[1].rstrip() + """

provision FILE.toml applies the file: tenants are created or updated; subscriptions,
users, numbers, rates, allotments and wallet auto-recharge are set to what it says;
each user listed ends up with exactly the licences listed for them. Users, numbers and
rates the file does not mention are left alone. One file is one transaction: if any
part of it is refused, nothing is written. --dry-run prints the changes the file would
make and writes nothing. Top-ups are not part of provisioning (running a file twice
must not pay twice): use 'gateway topup'. See examples/provision.toml.

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
    p.add_argument("--dry-run", action="store_true")
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
    p.add_argument("--user")
    p.add_argument("--direction", choices=["inbound", "outbound"])
    p.add_argument("--decision", choices=["ALLOW", "REJECT"])
    p.add_argument("--from", dest="first_day")
    p.add_argument("--to", dest="last_day")
    p.set_defaults(handler=_calls)
    p = sub.add_parser("forecast", add_help=False)
    p.add_argument("tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_forecast)
    p = sub.add_parser("export", add_help=False)
    p.add_argument("tenant")
    p.add_argument("--month")
    p.add_argument("--json", action="store_true")
    p.add_argument("--output")
    p.set_defaults(handler=_export)
    p = sub.add_parser("live", add_help=False)
    p.set_defaults(handler=_live)
    p = sub.add_parser("alerts", add_help=False)
    p.add_argument("tenant", nargs="?")
    p.add_argument("--state")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--csv", action="store_true")
    p.set_defaults(handler=_alerts)
    for name, handler in (("alert-ack", _alert_ack), ("alert-clear", _alert_clear)):
        p = sub.add_parser(name, add_help=False)
        p.add_argument("id", type=int)
        p.add_argument("--note", default="")
        p.set_defaults(handler=handler)
    p = sub.add_parser("alert-settings", add_help=False)
    p.add_argument("tenant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=_alert_settings)
    p = sub.add_parser("webhooks", add_help=False)
    p.add_argument("--tenant")
    p.set_defaults(handler=_webhooks)
    p = sub.add_parser("webhook-add", add_help=False)
    p.add_argument("url")
    p.add_argument("--tenant")
    p.add_argument("--events", default="")
    p.add_argument("--secret-file")
    p.add_argument("--description", default="")
    p.set_defaults(handler=_webhook_add)
    p = sub.add_parser("webhook-remove", add_help=False)
    p.add_argument("id", type=int)
    p.set_defaults(handler=_webhook_remove)
    p = sub.add_parser("deliveries", add_help=False)
    p.add_argument("--webhook", type=int)
    p.add_argument("--tenant")
    p.add_argument("--state")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=_deliveries)
    p = sub.add_parser("delivery-retry", add_help=False)
    p.add_argument("id")
    p.set_defaults(handler=_delivery_retry)
    return parser


def _read(path: str, what: str) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise CliError(f"{what} {path}: no such file", code="FILE_NOT_FOUND") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} {path}: {exc}", code="FILE_UNREADABLE") from exc


def _write(path: str, text: str, what: str) -> None:
    try:
        pathlib.Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc}", code="FILE_UNWRITABLE") from exc


def _month(value: str | None) -> dt.date | None:
    return schemas.parse_month(value)


# ---- small commands --------------------------------------------------------------------


async def _topup(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        tenant = await billing.views.tenant(args.tenant)
        balance = await billing.provisioning.topup(args.tenant, args.amount, args.note)
    print(f"{args.tenant}: topped up {args.amount} {tenant.currency}; balance "
          f"{render.money(balance)} {tenant.currency}", file=out)


async def _import_rates(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    text = _read(args.file, "rate file")
    async with open_billing(cfg) as billing:
        count = await billing.provisioning.import_rates_csv(text, args.tenant)
    scope = f"tenant {args.tenant}" if args.tenant else "every tenant"
    print(f"imported {count} rates for {scope}", file=out)


async def _usage(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    month = _month(args.month)
    async with open_billing(cfg) as billing:
        usage = as_dict(await billing.views.usage(args.tenant, month))
        tenant = as_dict(await billing.views.tenant(args.tenant))
    usage["month"] = usage["month"].isoformat()
    if args.csv:
        render.usage_csv(usage, out)
    else:
        render.usage_table(usage, tenant, out)


async def _calls(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    month = _month(args.month)
    if not 1 <= args.limit <= 100_000:
        raise InvalidInput("--limit must be from 1 to 100000", code="INVALID_LIMIT",
                           field="limit")
    first = schemas.parse_day(args.first_day, "from") if args.first_day else None
    last = schemas.parse_day(args.last_day, "to") if args.last_day else None
    async with open_billing(cfg) as billing:
        rows = [as_dict(c) for c in await billing.views.calls(
            args.tenant, month, args.limit, user_id=args.user, direction=args.direction,
            decision=args.decision, first_day=first, last_day=last)]
    if args.csv:
        columns = ["id", "authorised_at", "direction", "user_id", "caller", "destination",
                   "number_class", "decision", "reason", "route", "state", "answered_at",
                   "ended_at", "billed_seconds", "charged_amount", "rate_kind",
                   "price_per_minute", "sources"]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([render.csv_cell(r.get(c)) for c in columns])
        return
    if not rows:
        print(f"{args.tenant}: no calls" + (f" in {args.month}" if args.month else ""),
              file=out)
        return
    print(render.table(
        ["authorised (UTC)", "dir", "caller", "destination", "decision", "reason", "state",
         "billed", "charged"],
        [[r["authorised_at"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
          r["direction"][:3], r["caller"], r["destination"], r["decision"], r["reason"],
          r["state"], render.duration(r["billed_seconds"]),
          render.money(r["charged_amount"]) if r["charged_amount"] is not None else ""]
         for r in rows]), file=out)


async def _forecast(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        forecast = await billing.views.forecast(args.tenant)
    if args.json:
        out.write(reports.to_json(forecast))
    else:
        render.forecast_table(forecast, out)


async def _export(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    month = _month(args.month)
    async with open_billing(cfg) as billing:
        export = await billing.views.month_export(args.tenant, month)
    text = reports.to_json(export) if args.json else reports.export_csv(export)
    if args.output is None:
        out.write(text)
        return
    _write(args.output, text, "export")
    print(f"{args.tenant} {export.month.isoformat()[:7]}: {len(export.calls)} calls written "
          f"to {args.output}", file=out)


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
        print(render.table(
            ["dir", "tenant", "caller", "destination", "route", "state", "talk", "funded",
             "source"],
            [[c["direction"][:3], c.get("tenant_id") or "", c["caller"], c["destination"],
              c.get("route") or "", c["state"], render.duration(c.get("talk_seconds")),
              "unlimited" if c.get("funded_seconds") is None
              else render.duration(c["funded_seconds"]), c.get("source") or ""]
             for c in calls]), file=out)


# ---- alerts and webhooks ------------------------------------------------------------------


def _utc(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


async def _alerts(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        if args.tenant:
            await billing.views.tenant(args.tenant)  # UNKNOWN_TENANT
        alerts = await billing.alerts.list(args.tenant, args.state, args.limit)
    rows = [as_dict(a) for a in alerts]
    if args.csv:
        columns = ["id", "raised_at", "tenant_id", "kind", "subject", "period", "threshold",
                   "state", "blocked", "acknowledged_at", "cleared_at", "note", "details"]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            r["details"] = json.dumps(r["details"], sort_keys=True)
            writer.writerow([render.csv_cell(r.get(c)) for c in columns])
        return
    if not rows:
        print("no alerts" + (f" for {args.tenant}" if args.tenant else ""), file=out)
        return
    print(render.table(
        ["id", "raised (UTC)", "tenant", "kind", "subject", "period", "line", "state"],
        [[r["id"], _utc(r["raised_at"]), r["tenant_id"], r["kind"], r["subject"],
          r["period"], "" if r["threshold"] is None else r["threshold"],
          r["state"] + (" (blocking)" if r["blocked"] and r["state"] != "cleared" else "")]
         for r in rows]), file=out)


async def _alert_ack(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        alert = await billing.alerts.acknowledge(args.id, "cli", args.note)
    print(f"alert {alert.id} ({alert.tenant_id} {alert.kind}): {alert.state}", file=out)


async def _alert_clear(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        alert = await billing.alerts.clear(args.id, "cli", args.note)
    lifted = "; international calls allowed again" if alert.blocked else ""
    print(f"alert {alert.id} ({alert.tenant_id} {alert.kind}): {alert.state}{lifted}",
          file=out)


def _setting(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise InvalidInput(f"--set {item!r}: give KEY=VALUE", code="INVALID_SETTING",
                           field=key)
    if value in ("", "off", "none"):
        return key, None
    if value in ("true", "false"):
        return key, value == "true"
    if key.endswith("_percents"):
        return key, [int(p) if p.strip().isdigit() else p for p in value.split(",")]
    if key in ("no_balance_count", "no_balance_minutes"):
        return key, int(value) if value.isdigit() else value
    return key, value


async def _alert_settings(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    changes = dict(_setting(item) for item in args.set)
    async with open_billing(cfg) as billing:
        if changes:
            settings = await billing.alerts.set_settings(args.tenant, **changes)
        else:
            settings = await billing.alerts.settings(args.tenant)
    for key, value in as_dict(settings).items():
        shown = ("off" if value is None else ",".join(map(str, value))
                 if isinstance(value, list) else str(value).lower()
                 if isinstance(value, bool) else value)
        print(f"{key:28} {shown}", file=out)


async def _webhooks(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        hooks = await billing.alerts.webhooks(args.tenant)
    if not hooks:
        print("no webhooks", file=out)
        return
    print(render.table(
        ["id", "tenant", "url", "events", "enabled", "description"],
        [[h.id, h.tenant_id or "(all)", h.url, ",".join(h.events) or "(all)",
          "yes" if h.enabled else "no", h.description] for h in hooks]), file=out)


async def _webhook_add(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    secret = _read(args.secret_file, "secret file").strip() if args.secret_file else None
    events = [e for e in args.events.split(",") if e]
    async with open_billing(cfg) as billing:
        hook = await billing.alerts.create_webhook(args.url, args.tenant, events, secret,
                                                   description=args.description)
    print(f"webhook {hook.id} added for {hook.tenant_id or 'every tenant'}", file=out)
    if hook.secret is not None:
        print(f"secret (shown once, keep it for checking signatures): {hook.secret}",
              file=out)


async def _webhook_remove(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        await billing.alerts.delete_webhook(args.id)
    print(f"webhook {args.id} removed", file=out)


async def _deliveries(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    async with open_billing(cfg) as billing:
        found = await billing.alerts.deliveries(webhook_id=args.webhook, tenant_id=args.tenant,
                                                state=args.state, limit=args.limit)
    if not found:
        print("no deliveries", file=out)
        return
    print(render.table(
        ["id", "created (UTC)", "webhook", "event", "state", "attempts", "last"],
        [[d.id, _utc(d.created_at), d.webhook_id, d.event, d.state, d.attempts,
          d.last_error or (d.last_status or "")] for d in found]), file=out)


async def _delivery_retry(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    try:
        delivery_id = uuid.UUID(args.id)
    except ValueError as exc:
        raise InvalidInput("the delivery id is a UUID", code="INVALID_ID",
                           field="id") from exc
    async with open_billing(cfg) as billing:
        detail = await billing.alerts.retry_delivery(delivery_id)
    print(f"delivery {detail.id}: {detail.state}", file=out)


# ---- provision -----------------------------------------------------------------------------


async def _provision(cfg: Config, args: argparse.Namespace, out: TextIO) -> None:
    text = _read(args.file, "provisioning file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{args.file}: {exc}", code="INVALID_TOML") from exc
    check_provision_file(data)  # a malformed file never opens the database
    async with open_billing(cfg) as billing:
        changes = await apply_provision_file(billing.provisioning, data,
                                             lambda line: print(line, file=out),
                                             dry_run=args.dry_run)
    plural = "s" if changes != 1 else ""
    if args.dry_run:
        print(f"{args.file}: {changes} change{plural} to make (dry run: nothing written)"
              if changes else f"{args.file}: no changes to make (dry run)", file=out)
    else:
        print(f"{args.file}: {changes} change{plural}"
              if changes else f"{args.file}: no changes (already applied)", file=out)
