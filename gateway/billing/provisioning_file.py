"""The provisioning file: one TOML file says what tenants, users, licences, numbers,
rates, allotments and wallet settings exist; applying it converges the database on it.

``check_provision_file`` checks the file's shape before anything is written;
``apply_provision_file`` applies it in ONE transaction (all of it or nothing: a file
refused at its 6th user must not leave its tenant and 5 users behind, half provisioned)
and reports each change, or with ``dry_run`` reports what it would change and writes
nothing.
Every write goes through Provisioning, which checks it; the database is the last line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..errors import Conflict, GatewayError, InvalidInput
from . import schemas
from .provisioning import Provisioning

_TOP = {"tenants": list, "rates": list, "allotments": list}
# Keys only a file has, beside the fields of the API's request model of the same entity.
_TENANT_NESTED = {"subscriptions": dict, "users": list, "numbers": list, "rates": list,
                  "wallet": dict}
_USER_NESTED = {"licences": list}
# An allotment's country and plan are the API's path, not its body.
_ALLOTMENT = {"country": str, "plan": str, "minutes": int}
_WALLET = {"auto_recharge": dict}
_TYPE_NAMES = {str: "a string", int: "a whole number", list: "a list", dict: "a table"}
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


def _entity(model: type, table: Any, where: str, nested: dict[str, type] | None = None
            ) -> dict[str, Any]:
    """One entity of the file, checked by the API's own schema of it (``schemas.check``:
    the same keys, types, required fields and money grammar as the admin API), plus the
    keys only a file has (a tenant's users, a user's licences), checked here."""
    nested = nested or {}
    if not isinstance(table, dict):
        raise InvalidInput(f"{where} must be a table", code="INVALID_FILE", field=where)
    allowed = [f.name for f in dataclasses.fields(model)] + list(nested)
    for key in table:
        if key not in allowed:
            raise InvalidInput(f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}",
                               code="UNKNOWN_FIELD", field=f"{where}.{key}")
    schemas.check(model, {k: v for k, v in table.items() if k not in nested}, where=where)
    _check({k: v for k, v in table.items() if k in nested}, nested, where)
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
        _entity(schemas.RateInput, r, f"rates[{i}]")
    for i, a in enumerate(data.get("allotments", [])):
        _check(a, _ALLOTMENT, f"allotments[{i}]", ("country", "plan", "minutes"))
    tenants = data.get("tenants", [])
    for i, t in enumerate(tenants):
        w = f"tenants[{i}]"
        _entity(schemas.TenantCreate, t, w, _TENANT_NESTED)
        for sku, qty in t.get("subscriptions", {}).items():
            if isinstance(qty, bool) or not isinstance(qty, int):
                raise InvalidInput(f"{w}.subscriptions.{sku} must be a whole number",
                                   code="INVALID_TYPE", field=f"{w}.subscriptions.{sku}")
        users = t.get("users", [])
        for j, u in enumerate(users):
            _entity(schemas.UserCreate, u, f"{w}.users[{j}]", _USER_NESTED)
            _strings(u.get("licences", []), f"{w}.users[{j}].licences")
        _ids(users, "id", f"{w}.users")
        numbers = t.get("numbers", [])
        for j, n in enumerate(numbers):
            _entity(schemas.NumberCreate, n, f"{w}.numbers[{j}]")
        _ids(numbers, "e164", f"{w}.numbers")
        for j, r in enumerate(t.get("rates", [])):
            _entity(schemas.RateInput, r, f"{w}.rates[{j}]")
        wallet = _check(t.get("wallet", {}), _WALLET, f"{w}.wallet", hints={
            k: "top-ups are not part of provisioning (use 'gateway topup')"
            for k in ("balance", "topup", "topups")})
        if "auto_recharge" in wallet:
            _entity(schemas.AutoRechargeSettings, wallet["auto_recharge"],
                    f"{w}.wallet.auto_recharge")
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


async def _apply(provisioning: Provisioning, data: dict[str, Any],
                 report: Callable[[str], None]) -> int:
    """Apply a checked file through ``provisioning`` (one transaction: the caller's);
    return the number of changes made."""
    repo = provisioning.repo
    changes = 0

    def changed(line: str) -> None:
        nonlocal changes
        changes += 1
        report(line)

    if data.get("allotments"):
        before = {(a["country"], a["plan"]): a["minutes"] for a in await repo.allotments()}
        for i, a in enumerate(data["allotments"]):
            with _Where(f"allotments[{i}]"):
                await provisioning.set_allotment(a["country"], a["plan"], a["minutes"])
            if before.get((a["country"], a["plan"])) != a["minutes"]:
                changed(f"allotment {a['country']} {a['plan']}: {a['minutes']} minutes")
    if data.get("rates"):
        changes += await _rates(provisioning, data["rates"], None, "rates", report)
    for i, t in enumerate(data.get("tenants", [])):
        with _Where(f"tenants[{i}] {t['id']}"):
            changes += await _tenant(provisioning, t, report)
    return changes


async def _rates(provisioning: Provisioning, rates: list[dict[str, Any]],
                 tenant_id: str | None, where: str, report: Callable[[str], None]) -> int:
    def snapshot(rows: Any) -> set[tuple[Any, ...]]:
        return {(r["currency"], r["kind"], r["prefix"], r["price_per_minute"],
                 r["first_increment"], r["increment"], r["description"]) for r in rows}

    before = snapshot(await provisioning.repo.list_rates(tenant_id))
    with _Where(where):
        await provisioning.set_rates(rates, tenant_id)
    after = snapshot(await provisioning.repo.list_rates(tenant_id))
    n = len(after - before)
    if n:
        report(f"rates{' of ' + tenant_id if tenant_id else ''}: {n} added or changed")
    return n


async def _tenant(provisioning: Provisioning, t: dict[str, Any],
                  report: Callable[[str], None]) -> int:
    repo = provisioning.repo
    tid = t["id"]
    changes = 0

    def changed(line: str) -> None:
        nonlocal changes
        changes += 1
        report(f"{tid}: {line}")

    existing = await repo.find_tenant(tid)
    if existing is None:
        await provisioning.create_tenant(tid, t["name"], t["country"], t.get("timezone", "UTC"),
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
            await provisioning.update_tenant(tid, **diff)
            changed(f"tenant updated ({', '.join(diff)})")

    # Subscriptions grow first and shrink last, so that licences can move between users.
    subs = t.get("subscriptions", {})
    current = {r["sku"]: r["quantity"] for r in await repo.subscriptions(tid)}
    for sku, qty in subs.items():
        if qty > current.get(sku, 0) or sku not in current:
            with _Where(f"subscriptions.{sku}"):
                await provisioning.set_subscription(tid, sku, qty)
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
                await provisioning.unassign_licence(u["id"], sku)
                changed(f"user {u['id']}: unassigned {sku}")
    for j, u in enumerate(users):
        row = found[u["id"]]
        with _Where(f"users[{j}] {u['id']}"):
            if row is None:
                reactivated = await provisioning.create_user(
                    u["id"], tid, u["sip_endpoint"], u["usage_location"], u.get("extension"),
                    u.get("display_name", ""))
                changed(f"user {u['id']} {'reactivated' if reactivated else 'created'}")
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
                    await provisioning.update_user(u["id"], **diff)
                    changed(f"user {u['id']} updated ({', '.join(diff)})")
                held = set(row["licences"]) & set(u.get("licences", []))
            for sku in sorted(set(u.get("licences", [])) - held,
                              key=lambda s: _LICENCE_ORDER.get(s, 0)):
                await provisioning.assign_licence(u["id"], sku)
                changed(f"user {u['id']}: assigned {sku}")

    for sku, qty in subs.items():
        if qty < current.get(sku, 0):
            with _Where(f"subscriptions.{sku}"):
                await provisioning.set_subscription(tid, sku, qty)
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
                await provisioning.delete_number(n["e164"])
            await provisioning.add_number(n["e164"], tid, n["kind"], n.get("user_id"),
                                   n.get("target"))
            changed(f"number {n['e164']} {'changed' if row is not None else 'added'}")

    if t.get("rates"):
        changes += await _rates(provisioning, t["rates"], tid, "rates", report)

    ar = t.get("wallet", {}).get("auto_recharge")
    if ar is not None:
        before = await repo.get_wallet(tid)
        with _Where("wallet.auto_recharge"):
            await provisioning.set_auto_recharge(tid, **ar)
        after = await repo.get_wallet(tid)
        keys = ("auto_recharge_enabled", "auto_recharge_threshold", "auto_recharge_amount",
                "auto_recharge_monthly_cap")
        if any(before[k] != after[k] for k in keys):
            changed("wallet auto-recharge set")
    return changes


async def apply_provision_file(provisioning: Provisioning, data: dict[str, Any],
                               report: Callable[[str], None], *, dry_run: bool = False
                               ) -> int:
    """Check and apply one provisioning file as one transaction; return the number of
    changes. ``report`` gets one line per change, once the transaction has committed
    (a refused file reports nothing: nothing was changed). With ``dry_run`` the changes
    are made inside the transaction, so that the database's own checks run too, then
    rolled back: the lines say what applying the file would change."""
    check_provision_file(data)
    lines: list[str] = []
    async with provisioning.one_transaction(rollback=dry_run) as tx:
        changes = await _apply(tx, data, lines.append)
    for line in lines:
        report(line)
    return changes
