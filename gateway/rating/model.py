"""Plain value types of the rater: what the rules read and what they answer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum


class Sku(StrEnum):
    """Licence SKUs (billing rules §2). The International Calling Plan is called the
    add-on in prose and ``addon`` in identifiers; ``international_calling_plan`` is only
    its SKU string."""

    CALLING_PLAN = "business_voice_calling_plan"
    BUSINESS_VOICE = "business_voice"
    ADDON = "international_calling_plan"


BUSINESS_VOICE_SKUS = frozenset({Sku.CALLING_PLAN, Sku.BUSINESS_VOICE})

# Countries with a Domestic Calling Plan (billing rules §3).
CALLING_PLAN_COUNTRIES = frozenset({"CA", "GB", "US"})


class NumberKind(StrEnum):
    USER = "user"
    TOLL_FREE = "toll_free"
    SERVICE = "service"


class NumberClass(StrEnum):
    EMERGENCY = "emergency"
    INTERNAL = "internal"
    DOMESTIC = "domestic"
    INTERNATIONAL = "international"
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    INVALID = "invalid"


class Route(StrEnum):
    EMERGENCY = "emergency"
    INTERNAL = "internal"
    PARTNER = "partner"
    PSTN = "pstn"


class RateKind(StrEnum):
    INTERNATIONAL = "international"
    DOMESTIC_OVERAGE = "domestic_overage"
    TOLL_FREE_INBOUND = "toll_free_inbound"


class Source(StrEnum):
    """Where a call's funded time comes from, in the order the rules list them."""

    POOL = "pool"
    ADDON = "addon"
    WALLET = "wallet"


class Reason(StrEnum):
    """Stable reason codes. ALLOW reasons say why the call may go; the rest reject."""

    EMERGENCY = "EMERGENCY"
    INTERNAL = "INTERNAL"
    PARTNER = "PARTNER"
    TOLL_FREE_FREE = "TOLL_FREE_FREE"
    FUNDED = "FUNDED"
    INBOUND_USER_NUMBER = "INBOUND_USER_NUMBER"
    UNKNOWN_CALLER = "UNKNOWN_CALLER"
    NO_LICENSE = "NO_LICENSE"
    INVALID_NUMBER = "INVALID_NUMBER"
    BLOCKED_DESTINATION = "BLOCKED_DESTINATION"
    NO_BALANCE = "NO_BALANCE"
    NO_RATE = "NO_RATE"
    UNKNOWN_NUMBER = "UNKNOWN_NUMBER"
    GATEWAY_ERROR = "GATEWAY_ERROR"  # the gateway failed while deciding: fail closed


class Direction(StrEnum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


@dataclass(frozen=True)
class Tenant:
    id: str
    country: str
    timezone: str = "UTC"
    currency: str = "USD"
    blocked_classes: frozenset[str] = frozenset({NumberClass.PREMIUM_RATE})


@dataclass(frozen=True)
class User:
    id: str
    tenant_id: str
    sip_endpoint: str
    usage_location: str
    extension: str | None = None
    licences: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Classified:
    """A dialled string read against the caller's location."""

    number_class: NumberClass
    e164: str | None = None  # '+' and digits when the string is a dialable number


@dataclass(frozen=True)
class CallerContext:
    """Everything the outbound rules need about one caller and one dialled string."""

    user: User
    tenant: Tenant
    internal_target: str | None = None  # endpoint reached when the dialled string is internal


@dataclass(frozen=True)
class Ruling:
    """The rules' answer before funding: allow/reject, route, and how to rate it.

    It decides the call's row of the table; the store may still turn an allowed rated
    ruling into NO_RATE or NO_BALANCE when it looks up the rate and reserves funding."""

    allow: bool
    reason: Reason
    number_class: NumberClass
    route: Route | None = None
    destination: str = ""  # E.164 for numbers, the dialled string otherwise
    target: str | None = None  # PBX endpoint for internal and inbound calls
    rate_kind: RateKind | None = None
    sources: tuple[Source, ...] = ()
    pool_country: str | None = None

    @property
    def rated(self) -> bool:
        """True when the call draws on a pool, the add-on or the wallet."""
        return bool(self.sources)


@dataclass(frozen=True)
class Settlement:
    """What settling (or releasing) one call did; a second report repeats the first."""

    outcome: str  # settled | released | already_settled | already_released | rejected
    billed_seconds: int
    charged: Decimal

    @property
    def first_time(self) -> bool:
        """True for the report that actually settled or released the call."""
        return self.outcome in ("settled", "released")


@dataclass(frozen=True)
class Decision:
    """What the rater tells the bridge about one call."""

    allow: bool
    reason: Reason
    call_id: uuid.UUID | None
    route: Route | None = None
    funded_seconds: int | None = None  # None: no time limit (unrated call)
    destination: str = ""
    target: str | None = None
    number_class: NumberClass | None = None
    tenant_id: str | None = None
    price_per_minute: Decimal | None = None
    sources: tuple[Source, ...] = field(default=())
    # the first reservation came back short of a slice: the sources ran dry, so no more
    # funding is coming and funded_seconds is the call's end (the cut-off warning)
    funding_final: bool = False

    @property
    def decision(self) -> str:
        return "ALLOW" if self.allow else "REJECT"
