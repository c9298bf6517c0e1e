"""Reason code -> Q.850 hangup cause the dialplan rejects a call with, and the SIP
final response the caller then hears. Measured end to end on Asterisk 22 chan_pjsip
(tests/test_pbx_dialplan.py; the full table and the reasons are in docs/dialplan.md).
One table, used by the AGI reply and by the docs."""

from __future__ import annotations

# reason -> (Q.850 cause sent as GW_CAUSE, SIP response the phone hears)
REJECT_CAUSES: dict[str, tuple[int, int]] = {
    "UNKNOWN_CALLER": (21, 403),
    "NO_LICENSE": (50, 603),
    "INVALID_NUMBER": (28, 484),
    "BLOCKED_DESTINATION": (21, 403),
    "NO_BALANCE": (31, 480),
    "NO_RATE": (3, 404),
    "UNKNOWN_NUMBER": (1, 404),
    "GATEWAY_ERROR": (34, 503),  # the gateway failed while deciding: fail closed
}
DEFAULT_CAUSE = 21


def cause_for(reason: str) -> int:
    return REJECT_CAUSES.get(reason, (DEFAULT_CAUSE, 403))[0]


def sip_response_for(reason: str) -> int:
    return REJECT_CAUSES.get(reason, (DEFAULT_CAUSE, 403))[1]
