"""Reason code -> Q.850 hangup cause the dialplan uses to reject a call, and so the SIP
response the caller hears (chan_pjsip's mapping, measured on Asterisk 22: see
docs/dialplan.md). One table, used by the AGI reply and by the docs."""

from __future__ import annotations

# Provisional until measured on the PBX; docs/dialplan.md holds the measured table.
REASON_CAUSES: dict[str, int] = {
    "UNKNOWN_CALLER": 21,  # call rejected -> 403
    "NO_LICENSE": 21,  # -> 403
    "INVALID_NUMBER": 28,  # invalid number format -> 484
    "BLOCKED_DESTINATION": 21,  # -> 403
    "NO_BALANCE": 21,  # -> 403
    "NO_RATE": 3,  # no route to destination -> 404
    "UNKNOWN_NUMBER": 1,  # unallocated number -> 404
    "GATEWAY_ERROR": 34,  # no circuit available -> 503
}
DEFAULT_CAUSE = 21


def cause_for(reason: str) -> int:
    return REASON_CAUSES.get(reason, DEFAULT_CAUSE)
