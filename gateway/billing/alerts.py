"""Alerts and webhook subscriptions, for the operator: typed views, request models and
the operations the API and the CLI call (docs/operations.md, "Alerts" and "Webhooks").

The alerts are raised by the database itself (migration 011: triggers on the tables
that move), in the transaction of the movement that caused them; here they are read,
acknowledged and cleared. A webhook's secret is written, never read back: no view
holds it, except the one answer that creates a subscription with a generated secret.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import secrets
import uuid
from decimal import Decimal
from typing import Any, ClassVar

from ..errors import InvalidInput, NotFound
from ..store.alerts import AlertStore
from . import schemas as s
from .provisioning import check_amount, check_int

#: what an alert is about; also the event types of webhooks
KINDS = ["addon_used", "auto_recharge", "international_spend", "no_balance_rejections",
         "pool_used", "recharge_cap_reached", "wallet_below"]
STATES = ["acknowledged", "active", "cleared"]
DELIVERY_STATES = ["dead", "delivered", "pending"]
MAX_LIST = 1000
#: what a webhook URL may be: http(s), a host name or IPv4 address, a port, a path
URL_PATTERN = (r"^https?://[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})"
               r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}"
               r"|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(?:[/?#][!-~]*)?$")
_URL = re.compile(URL_PATTERN)


# ---- views --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alert:
    """One alert: what crossed which line when, and what the operator did with it."""

    id: int
    tenant_id: str
    kind: str
    subject: str
    period: str
    threshold: Decimal | None
    details: dict[str, Any]
    state: str
    raised_at: dt.datetime
    blocked: bool
    acknowledged_at: dt.datetime | None
    acknowledged_by: str | None
    cleared_at: dt.datetime | None
    cleared_by: str | None
    note: str


@dataclasses.dataclass(frozen=True)
class AlertSettings:
    """A tenant's alert lines (null: that alert is off)."""

    tenant_id: str
    pool_percents: list[int]
    addon_percents: list[int]
    wallet_below: Decimal | None
    auto_recharge: bool
    recharge_cap: bool
    no_balance_count: int | None
    no_balance_minutes: int
    international_hourly_limit: Decimal | None
    international_block: bool


@dataclasses.dataclass(frozen=True)
class Webhook:
    """A subscription, without its secret."""

    id: int
    tenant_id: str | None
    url: str
    events: list[str]
    enabled: bool
    description: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class WebhookCreated(Webhook):
    """The answer to a creation: the secret is shown here only when the gateway made it
    (null when it was given), and never again."""

    secret: str | None


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One event to one subscription; its id is the idempotency key the receiver sees."""

    id: uuid.UUID
    webhook_id: int
    alert_id: int | None
    tenant_id: str | None
    event: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class DeliveryAttempt:
    attempt: int
    at: dt.datetime
    by: str
    status: int | None
    error: str | None
    duration_ms: int


@dataclasses.dataclass(frozen=True)
class DeliveryDetail(Delivery):
    """A delivery with its body as sent and its log."""

    body: str
    log: list[DeliveryAttempt]


# ---- request bodies and envelopes ------------------------------------------------------

PERCENTS = {"items": {"minimum": 1, "maximum": 100}, "maxItems": 10}


@dataclasses.dataclass(frozen=True)
class AlertSettingsPatch:
    AT_LEAST_ONE: ClassVar[bool] = True
    pool_percents: list[int] = s.optional(**PERCENTS)
    addon_percents: list[int] = s.optional(**PERCENTS)
    wallet_below: s.Money | None = s.optional(pattern=s.MONEY_PATTERN)
    auto_recharge: bool = s.optional()
    recharge_cap: bool = s.optional()
    no_balance_count: int | None = s.optional(minimum=1, maximum=100000)
    no_balance_minutes: int = s.optional(minimum=1, maximum=1440)
    international_hourly_limit: s.Money | None = s.optional(
        pattern=s.POSITIVE_MONEY_PATTERN)
    international_block: bool = s.optional()


@dataclasses.dataclass(frozen=True)
class AlertAction:
    note: str = s.spec("", maxLength=500, **s.TEXT)


WEBHOOK_URL = {"pattern": URL_PATTERN, "maxLength": 2000,
               "examples": ["https://example.com/hooks/gateway"]}
EVENTS = {"items": {"enum": KINDS}, "maxItems": len(KINDS)}
SECRET = {"minLength": 16, "maxLength": 200, "pattern": r"^[!-~]+$"}


@dataclasses.dataclass(frozen=True)
class WebhookCreate:
    url: str = s.spec(**WEBHOOK_URL)
    tenant_id: str | None = s.spec(None, pattern=s.TENANT_ID_PATTERN,
                                   description="null: every tenant's events")
    events: list[str] = s.spec([], **EVENTS, description="empty: every event")
    secret: str | None = s.spec(None, **SECRET,
                                description="null: the gateway makes one and shows it once")
    enabled: bool = s.spec(True)
    description: str = s.spec("", maxLength=200, **s.TEXT)


@dataclasses.dataclass(frozen=True)
class WebhookPatch:
    AT_LEAST_ONE: ClassVar[bool] = True
    url: str = s.optional(**WEBHOOK_URL)
    events: list[str] = s.optional(**EVENTS)
    secret: str = s.optional(**SECRET)
    enabled: bool = s.optional()
    description: str = s.optional(maxLength=200, **s.TEXT)


@dataclasses.dataclass(frozen=True)
class AlertList:
    tenant_id: str | None
    alerts: list[Alert]


@dataclasses.dataclass(frozen=True)
class WebhookList:
    tenant_id: str | None
    webhooks: list[Webhook]


@dataclasses.dataclass(frozen=True)
class DeliveryList:
    deliveries: list[Delivery]


# ---- checks ------------------------------------------------------------------------------


def _percents(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or len(value) > 10:
        raise InvalidInput(f"{field} must be a list of at most 10 percentages",
                           code="INVALID_PERCENTS", field=field)
    for p in value:
        check_int(p, field, 1, 100)
    return sorted(set(value))


def check_url(value: Any, field: str = "url") -> str:
    """An http:// or https:// URL of a host name or IPv4 address (URL_PATTERN)."""
    if not isinstance(value, str) or len(value) > 2000 or not _URL.fullmatch(value):
        raise InvalidInput(f"{field} must be an http:// or https:// URL with a host name "
                           "or IPv4 address, printable ASCII", code="INVALID_URL",
                           field=field)
    return value


def _events(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > len(KINDS) \
            or any(e not in KINDS for e in value):
        raise InvalidInput(f"events may hold {', '.join(KINDS)} (empty: every event)",
                           code="INVALID_EVENTS", field="events")
    return sorted(set(value))


def _secret(value: Any) -> str:
    if not isinstance(value, str) or not 16 <= len(value) <= 200 or not value.isascii() \
            or not value.isprintable() or " " in value:
        raise InvalidInput("secret must be 16 to 200 printable ASCII characters, no space",
                           code="INVALID_SECRET", field="secret")
    return value


def _states(value: str | None, allowed: list[str], field: str = "state") -> list[str] | None:
    """A comma-separated list of states from a query (None: any)."""
    if value is None or value == "":
        return None
    states = value.split(",")
    if any(x not in allowed for x in states):
        raise InvalidInput(f"{field} may be {', '.join(allowed)} (comma-separated)",
                           code="INVALID_STATE", field=field)
    return states


def _pick(cls: type, row: Any, **extra: Any) -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    return cls(**{n: row[n] for n in names}, **extra)


def _alert(row: Any) -> Alert:
    details = row["details"]
    return _pick(Alert, row, details=json.loads(details) if isinstance(details, str)
                 else dict(details))


# ---- operations --------------------------------------------------------------------------


class Alerts:
    """What an operator does with alerts and webhook subscriptions."""

    def __init__(self, store: AlertStore):
        self.store = store

    # ---- alerts ------------------------------------------------------------------------

    async def list(self, tenant_id: str | None = None, state: str | None = None,
                   limit: int = 100) -> list[Alert]:
        """Alerts newest first; ``state`` a comma-separated list (default: any)."""
        check_int(limit, "limit", 1, MAX_LIST)
        rows = await self.store.alerts(tenant_id, _states(state, STATES), limit)
        return [_alert(r) for r in rows]

    async def get(self, alert_id: int) -> Alert:
        row = await self.store.find_alert(alert_id)
        if row is None:
            raise NotFound(f"no such alert: {alert_id}", code="UNKNOWN_ALERT")
        return _alert(row)

    async def acknowledge(self, alert_id: int, by: str = "operator", note: str = "") -> Alert:
        """Seen: an active alert becomes acknowledged (it stays listed until cleared)."""
        return _alert(await self.store.acknowledge(alert_id, by, _note(note)))

    async def clear(self, alert_id: int, by: str = "operator", note: str = "") -> Alert:
        """Resolved: the alert is cleared; an international-spend alert that blocked the
        tenant's international calls lifts the block (docs/operations.md)."""
        return _alert(await self.store.clear(alert_id, by, _note(note)))

    # ---- settings ----------------------------------------------------------------------

    async def settings(self, tenant_id: str) -> AlertSettings:
        return _pick(AlertSettings, await self.store.settings(tenant_id))

    async def set_settings(self, tenant_id: str, **changes: Any) -> AlertSettings:
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("pool_percents", "addon_percents"):
                fields[key] = _percents(value, key)
            elif key == "wallet_below":
                fields[key] = None if value is None else check_amount(value, key,
                                                                      allow_zero=True)
            elif key == "international_hourly_limit":
                fields[key] = None if value is None else check_amount(value, key)
            elif key in ("auto_recharge", "recharge_cap", "international_block"):
                if not isinstance(value, bool):
                    raise InvalidInput(f"{key} must be true or false",
                                       code="INVALID_" + key.upper(), field=key)
                fields[key] = value
            elif key == "no_balance_count":
                fields[key] = None if value is None else check_int(value, key, 1, 100000)
            elif key == "no_balance_minutes":
                fields[key] = check_int(value, key, 1, 1440)
            else:
                raise InvalidInput(f"unknown setting {key}", code="UNKNOWN_FIELD", field=key)
        await self.store.set_settings(tenant_id, fields)
        return await self.settings(tenant_id)

    # ---- webhooks ----------------------------------------------------------------------

    async def create_webhook(self, url: str, tenant_id: str | None = None,
                             events: list[str] | None = None, secret: str | None = None,
                             enabled: bool = True, description: str = "") -> WebhookCreated:
        """Subscribe ``url`` to a tenant's events (None: every tenant's). Without a secret
        one is made (32 random bytes, hex) and shown in this answer only."""
        url = check_url(url)
        made = secret is None
        secret = secrets.token_hex(32) if made else _secret(secret)
        if not isinstance(enabled, bool):
            raise InvalidInput("enabled must be true or false", code="INVALID_ENABLED",
                               field="enabled")
        if not isinstance(description, str) or len(description) > 200:
            raise InvalidInput("description must be at most 200 characters",
                               code="INVALID_DESCRIPTION", field="description")
        row = await self.store.create_webhook(tenant_id, url, _events(events or []), secret,
                                              enabled, description)
        return _pick(WebhookCreated, row, secret=secret if made else None)

    async def webhooks(self, tenant_id: str | None = None) -> list[Webhook]:
        return [_pick(Webhook, r) for r in await self.store.webhooks(tenant_id)]

    async def webhook(self, webhook_id: int) -> Webhook:
        row = await self.store.find_webhook(webhook_id)
        if row is None:
            raise NotFound(f"no such webhook: {webhook_id}", code="UNKNOWN_WEBHOOK")
        return _pick(Webhook, row)

    async def update_webhook(self, webhook_id: int, **changes: Any) -> Webhook:
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "url":
                fields[key] = check_url(value)
            elif key == "events":
                fields[key] = _events(value)
            elif key == "secret":
                fields[key] = _secret(value)
            elif key == "enabled":
                if not isinstance(value, bool):
                    raise InvalidInput("enabled must be true or false",
                                       code="INVALID_ENABLED", field=key)
                fields[key] = value
            elif key == "description":
                if not isinstance(value, str) or len(value) > 200:
                    raise InvalidInput("description must be at most 200 characters",
                                       code="INVALID_DESCRIPTION", field=key)
                fields[key] = value
            else:
                raise InvalidInput(f"{key} cannot be changed", code="READ_ONLY_FIELD",
                                   field=key)
        await self.store.update_webhook(webhook_id, fields)
        return await self.webhook(webhook_id)

    async def delete_webhook(self, webhook_id: int) -> None:
        await self.store.delete_webhook(webhook_id)

    # ---- deliveries --------------------------------------------------------------------

    async def deliveries(self, *, webhook_id: int | None = None, tenant_id: str | None = None,
                         state: str | None = None, limit: int = 100) -> list[Delivery]:
        check_int(limit, "limit", 1, MAX_LIST)
        rows = await self.store.deliveries(webhook_id=webhook_id, tenant_id=tenant_id,
                                           states=_states(state, DELIVERY_STATES),
                                           limit=limit)
        return [_pick(Delivery, r) for r in rows]

    async def delivery(self, delivery_id: uuid.UUID) -> DeliveryDetail:
        row = await self.store.find_delivery(delivery_id)
        if row is None:
            raise NotFound(f"no such delivery: {delivery_id}", code="UNKNOWN_DELIVERY")
        log = [_pick(DeliveryAttempt, a) for a in await self.store.attempts(delivery_id)]
        return _pick(DeliveryDetail, row, log=log)

    async def retry_delivery(self, delivery_id: uuid.UUID) -> DeliveryDetail:
        """Send a dead delivery again (its attempts start afresh; its log is kept)."""
        await self.store.retry_delivery(delivery_id)
        return await self.delivery(delivery_id)


def _note(note: Any) -> str:
    if not isinstance(note, str) or len(note) > 500:
        raise InvalidInput("note must be at most 500 characters", code="INVALID_NOTE",
                           field="note")
    return s.check_text(note, "note")
