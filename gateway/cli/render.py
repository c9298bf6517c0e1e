"""How operator commands print: aligned text tables and CSV. Money is printed from its
Decimal, never through a float."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TextIO
from zoneinfo import ZoneInfo


def money(value: Decimal | None) -> str:
    """At least two decimals, more only when they matter: 12.50, 0.0125."""
    if value is None:
        return ""
    value = Decimal(value)
    normal = value.normalize()
    if normal.as_tuple().exponent > -2:  # type: ignore[operator]
        return f"{value.quantize(Decimal('0.01'))}"
    return f"{normal:f}"


def duration(seconds: Any) -> str:
    """Seconds as m:ss (125 -> 2:05); empty when unknown."""
    if seconds is None:
        return ""
    s = int(round(float(seconds)))
    return f"{s // 60}:{s % 60:02d}"


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """Left-aligned columns under a dashed rule, two spaces apart."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])


def usage_table(u: dict[str, Any], tenant: dict[str, Any], out: TextIO) -> None:
    """A tenant's month as text: pools, add-on minutes, wallet, call totals."""
    cur = u["currency"]
    print(f"{u['tenant_id']} ({tenant['name']}) - {u['month'][:7]} - {cur}, "
          f"{tenant['timezone']}", file=out)
    minutes = ["capacity min", "used min", "reserved min", "remaining min"]

    def mins(r: dict[str, Any]) -> list[Any]:
        return [r["capacity_minutes"], r["used_minutes"], r["reserved_minutes"],
                r["remaining_minutes"]]

    print("\nDomestic Calling Plan pools", file=out)
    if u["pools"]:
        print(table(["country", *minutes], [[p["country"], *mins(p)] for p in u["pools"]]),
              file=out)
    else:
        print("(none: no user holds business_voice_calling_plan)", file=out)
    if u["international_addon"]:
        print("\nInternational Calling Plan", file=out)
        print(table(["user", *minutes],
                     [[a["user_id"], *mins(a)] for a in u["international_addon"]]), file=out)
    w = u["wallet"]
    ar = w["auto_recharge"]
    recharge = (f"{money(ar['amount'])} below {money(ar['threshold'])}, "
                f"{ar['recharges_this_month']}/{ar['monthly_cap']} this month"
                if ar["enabled"] else "off")
    print(f"\nWallet ({cur})", file=out)
    print(table(["balance", "reserved", "available", "auto-recharge"],
                 [[money(w["balance"]), money(w["reserved"]), money(w["available"]),
                   recharge]]), file=out)
    print("\nCalls", file=out)
    if u["calls"]:
        print(table(["direction", "class", "decision", "calls", "billed", f"charged {cur}"],
                     [[c["direction"], c["number_class"], c["decision"], c["calls"],
                       duration(c["billed_seconds"]), money(c["charged"])]
                      for c in u["calls"]]), file=out)
    else:
        print("(none this month)", file=out)


def usage_csv(u: dict[str, Any], out: TextIO) -> None:
    """Long format, one figure per row: tenant,month,section,item,metric,value."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tenant", "month", "section", "item", "metric", "value"])
    month = u["month"][:7]

    def row(section: str, item: str, metric: str, value: Any) -> None:
        writer.writerow([u["tenant_id"], month, section, item, metric, csv_cell(value)])

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


def csv_cell(value: Any) -> str:
    """One CSV cell: ISO dates, true/false, lists joined with '+', empty for None."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return str(value)


def forecast_table(f: Any, out: TextIO) -> None:
    """A tenant's forecast as text: one row per pool, add-on and the wallet."""
    print(f"{f.tenant_id} - {f.month.isoformat()[:7]} - {f.currency}, {f.timezone}; "
          "burn rate by hour of week over the last 4 weeks (flat below a week)", file=out)

    def amount(a: Any, value: Decimal | None) -> str:
        if value is None:
            return ""
        return f"{(value / 60).quantize(Decimal('0.01'))} min" if a.unit == "seconds" \
            else f"{money(value)} {f.currency}"

    def outlook(a: Any) -> str:
        if a.status == "runs_out":
            return f"runs out {a.runs_out_on.isoformat()} " \
                   f"{a.runs_out_at.astimezone(ZoneInfo(f.timezone)).strftime('%H:%M')}"
        return {"lasts": "lasts the month" if a.account != "wallet" else "lasts a year",
                "no_recent_use": "no recent use", "exhausted": "used up"}[a.status]

    print(table(["account", "item", "capacity", "used", "reserved", "left", "per day",
                 "basis", "outlook"],
                [[a.account, a.item, amount(a, a.capacity), amount(a, a.used),
                  amount(a, a.reserved), amount(a, a.remaining), amount(a, a.burn_per_day),
                  a.basis, outlook(a)] for a in f.accounts]), file=out)
