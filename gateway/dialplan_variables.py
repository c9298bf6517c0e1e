"""The contract with the dialplan (``dialplan/extensions_gateway.conf``), in one place:
the channel variables each side reads or sets, the AGI routes it calls, and the order
of their arguments. Code and tests import these names; ``tests/test_dialplan_variables.py``
checks the shipped dialplan against them.

Why a top-level module and not ``gateway/calls/``: two layers speak this contract. The
AGI wire layer answers the ``ping`` route itself (``PONG``) and must not import ``calls/``,
which answers the other routes. A module of plain strings that imports nothing can be
shared by both without breaking the layering.
"""

from __future__ import annotations

# ---- set by the gateway's answer to outbound/inbound, read by [gateway-decide] ------------

DECISION = "GW_DECISION"  # ALLOW | REJECT; anything else is "no decision" = deny
REASON = "GW_REASON"  # the stable reason code (logged; the phone hears CAUSE)
CALL_ID = "GW_CALL_ID"  # the gateway's call id, reported by the hangup handler
ROUTE = "GW_ROUTE"  # emergency | internal | partner | pstn
NUMBER = "GW_NUMBER"  # digits for a trunk (E.164 without '+')
TARGET = "GW_TARGET"  # PJSIP endpoint (internal and inbound calls)
FUNDED = "GW_FUNDED"  # funded talk seconds; empty = no limit
CAUSE = "GW_CAUSE"  # Q.850 cause of a REJECT

ANNOUNCE = "GW_ANNOUNCE"  # REJECT only: Playback files ('&'-joined) heard before the cause
# Not a variable: the answer pushes the hangup handler that reports the call's end, in
# the same MSet as CALL_ID, so a channel has a handler exactly when it has a call id of
# this answer (one handler per answer; a channel that asks twice gets two, each
# reporting the call id set last, which settles once).
HANGUP_HANDLER = "CHANNEL(hangup_handler_push)"
HANGUP_HANDLER_AT = "gateway-hangup,s,1"  # where it runs: context, extension, priority

# What an answer may carry, in the order it is sent (one MSet). DECISION is last: were
# the variables ever set one by one, a session cut short would never leave an ALLOW
# behind. Each answer sets only what the dialplan reads after that decision, because
# every variable set is a message on the PBX's AMI queue (docs/benchmarks.md); the
# dialplan clears DECISION before asking, and everything else it reads after an ALLOW
# or a REJECT comes in the same MSet as the decision, so a value a parent channel
# handed down is never read (CALL_ID is read only by the hangup handler, which only
# the answer that sets CALL_ID pushes):
# - an ALLOW: REASON (for the operator's own dialplan and logs; the shipped one only
#   logs it off the common path), CALL_ID and HANGUP_HANDLER (when the call has an id),
#   ROUTE, NUMBER (trunk routes: pstn, partner, emergency) or TARGET (internal and
#   inbound calls), FUNDED (empty = no limit), DECISION;
# - a REJECT: REASON, CALL_ID and HANGUP_HANDLER (when the call has an id), CAUSE,
#   ANNOUNCE (empty: nothing is played; sent whenever announcements are configured, as
#   the gateway runs), DECISION.
ALLOW_ANSWER = (REASON, CALL_ID, HANGUP_HANDLER, ROUTE, NUMBER, TARGET, FUNDED, DECISION)
REJECT_ANSWER = (REASON, CALL_ID, HANGUP_HANDLER, CAUSE, ANNOUNCE, DECISION)
CLEARED = (DECISION,)  # emptied by the dialplan before it asks

# ---- set by the gateway over AMI (Originate), read by [gateway-warning] ------------------

WARNING = "GW_WARNING"  # the cut-off warning's prompt, on the Local channel originated
WARNING_CONTEXT = "gateway-warning"  # the dialplan context of that Local channel
WARNING_EXTEN = "warning"  # its extension

# ---- the dialplan's own: settings from [globals] and working variables --------------------
# The gateway never reads or sets these; they are declared so that the dialplan check
# sees every GW_* name and a new one cannot slip in unnoticed.

AGI = "GW_AGI"  # host:port of the gateway's FastAGI server (empty: 127.0.0.1, port 4573)
AGI_BACKUP = "GW_AGI_BACKUP"  # host:port asked once when AGI cannot be reached; empty = none
FAIL_POLICY = "GW_FAIL_POLICY"  # outbound when the gateway is unreachable: closed | open
INBOUND_FAIL_POLICY = "GW_INBOUND_FAIL_POLICY"  # the same for inbound
PSTN_TRUNK = "GW_PSTN_TRUNK"
PARTNER_TRUNK = "GW_PARTNER_TRUNK"
EMERGENCY_TRUNK = "GW_EMERGENCY_TRUNK"
EMERGENCY_NUMBERS = "GW_EMERGENCY_NUMBERS"  # dialled straight, never asking the gateway
DIRECTION = "GW_DIRECTION"  # outbound | inbound, set on entering [gateway-decide]

DIALPLAN_ONLY = frozenset({AGI, AGI_BACKUP, FAIL_POLICY, INBOUND_FAIL_POLICY, PSTN_TRUNK,
                           PARTNER_TRUNK, EMERGENCY_TRUNK, EMERGENCY_NUMBERS, DIRECTION})

# How every AGI() step writes the gateway's address: GW_AGI, or 127.0.0.1 when it is
# empty (agi:// then uses FastAGI's port, 4573). IF() splits on the first ':' only, so
# a host:port goes in its second branch.
AGI_ADDRESS = '${IF($["${GW_AGI}" = ""]?127.0.0.1:${GW_AGI})}'

# ---- the PBX's name ----------------------------------------------------------------------
# A global of the PBX (empty on a PBX set up before names existed). The dialplan passes it
# as the last argument of every AGI request and writes it on the CDR as the custom
# variable CDR_PBX (cdr_pgsql's column "pbx"); the gateway reads the global over AMI
# (Getvar, no channel) to check that it is talking to the PBX it was configured for.

PBX = "GW_PBX"
CDR_PBX = "pbx"  # CDR(pbx) on the PBX, column cdr.pbx in the database

# Every GW_* name the shipped dialplan reads or sets.
DIALPLAN = (frozenset(ALLOW_ANSWER) | frozenset(REJECT_ANSWER) | DIALPLAN_ONLY
            | {PBX, WARNING}) - {HANGUP_HANDLER}

# ---- the health check ------------------------------------------------------------------

# Set by the AGI server's ping route (a monitoring probe, not the shipped dialplan).
PONG = "GW_PONG"

# ---- AGI routes: agi://<AGI_ADDRESS>/<route>,<args> ----------------------------------------
# Each route's arguments as the dialplan writes them, in order; the *_<NAME> indices
# below are where the gateway reads each one. The PBX's name is the LAST argument of
# every route, so a dialplan older than it simply sends one argument fewer.

OUTBOUND_ROUTE = "outbound"
OUTBOUND_ARGS = ("${EXTEN}", "${CHANNEL(endpoint)}", "${CHANNEL(linkedid)}", "${GW_PBX}")
OUTBOUND_DIALLED, OUTBOUND_ENDPOINT, OUTBOUND_LINKEDID, OUTBOUND_PBX = range(4)

INBOUND_ROUTE = "inbound"
INBOUND_ARGS = ("${EXTEN}", "${CALLERID(num)}", "${CHANNEL(linkedid)}", "${GW_PBX}")
INBOUND_CALLED, INBOUND_CALLER, INBOUND_LINKEDID, INBOUND_PBX = range(4)

HANGUP_ROUTE = "hangup"
HANGUP_ARGS = ("${GW_CALL_ID}", '${IF($["${ANSWEREDTIME_MS}" = ""]?0:${ANSWEREDTIME_MS})}',
               "${DIALSTATUS}", "${CDR(billsec)}", "${GW_PBX}")
HANGUP_CALL_ID, HANGUP_ANSWERED_MS, HANGUP_DIALSTATUS, HANGUP_BILLSEC, HANGUP_PBX = range(5)

PING_ROUTE = "ping"  # answered by the AGI server itself with PONG

ROUTES = {OUTBOUND_ROUTE: OUTBOUND_ARGS, INBOUND_ROUTE: INBOUND_ARGS,
          HANGUP_ROUTE: HANGUP_ARGS}
