"""Reason code -> Q.850 hangup cause the dialplan rejects a call with, and the SIP
final response the caller then hears. Measured end to end on Asterisk 22 chan_pjsip
(tests/test_pbx_dialplan.py). One table, used by the AGI reply; the table in
docs/dialplan.md must match it exactly (tests/test_reasons.py).

Every ``Reason`` is either an allow reason (the call connects: no cause) or has a row
here, so a new reason code cannot be added without choosing what the phone hears
(docs/adding-a-billing-rule.md).
"""

from __future__ import annotations

from ..rating.model import Reason

# reason -> (Q.850 cause sent as GW_CAUSE, SIP response the phone hears)
# Keys are Reason members (a StrEnum), so the plain reason string finds them too.
REJECT_CAUSES: dict[str, tuple[int, int]] = {
    Reason.UNKNOWN_CALLER: (21, 403),
    Reason.NO_LICENSE: (50, 603),
    Reason.INVALID_NUMBER: (28, 484),
    Reason.BLOCKED_DESTINATION: (21, 403),
    Reason.NO_BALANCE: (31, 480),
    Reason.NO_RATE: (3, 404),
    Reason.UNKNOWN_NUMBER: (1, 404),
    Reason.GATEWAY_ERROR: (34, 503),  # the gateway failed while deciding: fail closed
}

# Reasons of an allowed call: it connects, so no cause is ever sent for them.
ALLOW_REASONS: frozenset[Reason] = frozenset({
    Reason.EMERGENCY,
    Reason.INTERNAL,
    Reason.PARTNER,
    Reason.TOLL_FREE_FREE,
    Reason.FUNDED,
    Reason.INBOUND_USER_NUMBER,
})

# Reasons the shipped dialplan sets by itself when it has no usable answer from the
# gateway (dialplan/extensions_gateway.conf); never sent by the gateway.
DIALPLAN_CAUSES: dict[str, tuple[int, int]] = {
    "GATEWAY_UNAVAILABLE": (34, 503),  # the gateway is unreachable (fail policy closed)
    "NO_DECISION": (34, 503),  # the answer is missing or unsafe (default deny)
}

# What the dialplan itself does with a missing or non-numeric GW_CAUSE.
DEFAULT_CAUSE = 21


def cause_for(reason: str) -> int:
    """The Q.850 cause to reject a call with; an unknown reason gets the default."""
    return REJECT_CAUSES.get(reason, (DEFAULT_CAUSE, 403))[0]


def sip_response_for(reason: str) -> int:
    """The SIP final response the phone hears for a rejected call."""
    return REJECT_CAUSES.get(reason, (DEFAULT_CAUSE, 403))[1]
