"""Classify a dialled string against the caller's location with libphonenumber's data.

No hand-written prefix tables: the numbering plans come from the ``phonenumbers``
package. Prefixes are used only to look up rates.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneNumberType, shortnumberinfo

from .model import Classified, NumberClass

# Always treated as emergency, whatever the caller's location (billing rules §6 row 1).
# 933 is the US emergency-address test number; libphonenumber does not list it.
ALWAYS_EMERGENCY = frozenset({"911", "933", "112", "999"})

# The US and Canada share one domestic zone (billing rules §3).
_ZONES = {"US": "NANP-DOMESTIC", "CA": "NANP-DOMESTIC"}

_SEPARATORS = re.compile(r"[\s().\-/]")
_DIALLABLE = re.compile(r"^\+?[0-9]{1,20}$")


def domestic_zone(country: str) -> str:
    return _ZONES.get(country, country)


def is_domestic(caller_country: str, number_country: str | None) -> bool:
    return number_country is not None and domestic_zone(caller_country) == domestic_zone(
        number_country
    )


def normalise(dialled: str) -> str:
    """Drop the separators people type; keep '+' and digits (and anything invalid)."""
    return _SEPARATORS.sub("", dialled or "")


def is_emergency(dialled: str, region: str | None) -> bool:
    digits = normalise(dialled)
    if digits in ALWAYS_EMERGENCY:
        return True
    if region and digits.isdigit() and len(digits) <= 6:
        return shortnumberinfo.is_emergency_number(digits, region)
    return False


def to_e164(dialled: str, region: str | None) -> str | None:
    """The E.164 form of a dialable number, or None when it is not one."""
    digits = normalise(dialled)
    if not _DIALLABLE.match(digits):
        return None
    try:
        number = phonenumbers.parse(digits, region if not digits.startswith("+") else None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=65536)
def classify(dialled: str, caller_country: str) -> Classified:
    """Emergency, toll-free, premium-rate, domestic, international or invalid.

    Internal calls are not decided here: they depend on the tenant's own users and
    numbers, which the rater looks up.
    """
    if is_emergency(dialled, caller_country):
        return Classified(NumberClass.EMERGENCY)
    e164 = to_e164(dialled, caller_country)
    if e164 is None:
        return Classified(NumberClass.INVALID)
    number = phonenumbers.parse(e164)
    kind = phonenumbers.number_type(number)
    region = phonenumbers.region_code_for_number(number)
    if kind == PhoneNumberType.PREMIUM_RATE:
        return Classified(NumberClass.PREMIUM_RATE, e164)
    domestic = is_domestic(caller_country, region)
    if kind == PhoneNumberType.TOLL_FREE and domestic:
        return Classified(NumberClass.TOLL_FREE, e164)
    return Classified(NumberClass.DOMESTIC if domestic else NumberClass.INTERNATIONAL, e164)


def inbound_e164(dialled: str) -> str | None:
    """Carriers present the called number in E.164, with or without the '+'."""
    digits = normalise(dialled)
    if not _DIALLABLE.match(digits):
        return None
    digits = digits.lstrip("+")
    if not 2 <= len(digits) <= 15 or digits[0] == "0":
        return None
    return "+" + digits
