"""Reason codes: every one has a place in the cause table (or connects the call), and
the reason -> cause -> SIP table in docs/dialplan.md says exactly what the code does.
The steps for adding a reason are in docs/adding-a-billing-rule.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.calls.causes import (
    ALLOW_REASONS,
    DIALPLAN_CAUSES,
    REJECT_CAUSES,
    cause_for,
    sip_response_for,
)
from gateway.rating.model import Reason

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN_DOC = ROOT / "docs" / "dialplan.md"
BILLING_DOC = ROOT / "docs" / "billing.md"
DIALPLAN = ROOT / "dialplan" / "extensions_gateway.conf"


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The body rows of the first table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def leading_int(cell: str) -> int:
    match = re.match(r"\d+", cell)
    assert match, f"no number at the start of {cell!r}"
    return int(match.group())


def documented_causes() -> dict[str, tuple[str, int, int]]:
    """reason -> (set by, Q.850 cause, SIP response), as docs/dialplan.md states it."""
    rows = markdown_table(DIALPLAN_DOC.read_text(encoding="utf-8"),
                          "| reason | set by | Q.850 cause | SIP response |")
    table: dict[str, tuple[str, int, int]] = {}
    for reason, set_by, cause, sip, _why in rows:
        name = reason.strip("`")
        assert name not in table, f"{name} is in the table twice"
        table[name] = (set_by, leading_int(cause), leading_int(sip))
    return table


def test_every_reason_either_connects_or_has_a_cause():
    assert not ALLOW_REASONS & REJECT_CAUSES.keys()
    assert ALLOW_REASONS | REJECT_CAUSES.keys() == set(Reason)
    assert all(isinstance(reason, Reason) for reason in REJECT_CAUSES)


def test_the_cause_helpers_read_the_table():
    for reason, (cause, sip) in REJECT_CAUSES.items():
        assert (cause_for(reason.value), sip_response_for(reason.value)) == (cause, sip)


def test_dialplan_reasons_are_not_gateway_reasons():
    assert not DIALPLAN_CAUSES.keys() & {r.value for r in Reason}


def test_the_dialplan_doc_table_matches_the_code_exactly():
    documented = documented_causes()
    from_code = {reason.value: ("gateway", cause, sip)
                 for reason, (cause, sip) in REJECT_CAUSES.items()}
    from_code |= {reason: ("dialplan", cause, sip)
                  for reason, (cause, sip) in DIALPLAN_CAUSES.items()}
    assert documented == from_code


def test_each_cause_gives_the_measured_sip_response():
    """The SIP column agrees with the sweep of every cause on the real PBX (the same page):
    causes not listed elsewhere come back as 603."""
    measured: dict[int, int] = {}
    for sip, causes in markdown_table(DIALPLAN_DOC.read_text(encoding="utf-8"),
                                      "| SIP response | causes |"):
        if leading_int(sip) == 603:
            continue  # "every other cause"
        listed = causes.split("—")[0].split("(")[0]
        measured |= {int(c): leading_int(sip) for c in re.findall(r"\d+", listed)}
    for reason, (cause, sip) in {**REJECT_CAUSES, **DIALPLAN_CAUSES}.items():
        assert measured.get(cause, 603) == sip, reason


def test_the_shipped_dialplan_sets_its_own_reasons_with_their_causes():
    """Each ``Set(GW_REASON=X)`` in the dialplan is followed by ``Hangup(cause)``."""
    lines = DIALPLAN.read_text(encoding="utf-8").splitlines()
    found: set[tuple[str, int]] = set()
    for i, line in enumerate(lines):
        m = re.search(r"Set\(GW_REASON=([A-Z_]+)\)", line)
        if m:
            hangup = re.search(r"Hangup\((\d+)\)", lines[i + 1])
            assert hangup, f"no Hangup(cause) after line {i + 1}: {line}"
            found.add((m.group(1), int(hangup.group(1))))
    assert found == {(reason, cause) for reason, (cause, _sip) in DIALPLAN_CAUSES.items()}


def test_every_reason_is_documented_for_operators():
    text = BILLING_DOC.read_text(encoding="utf-8")
    missing = [r.value for r in Reason if f"`{r.value}`" not in text]
    assert missing == []


@pytest.mark.db
async def test_the_reasons_the_database_can_give_have_causes(db_pool):
    """gw_authorise may overturn an allowed ruling (docs/architecture.md, "Where decisions
    are made"): every reason its latest definition can write is a rejecting Reason."""
    source = await db_pool.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'gw_authorise'")
    written = set(re.findall(r"v_reason := '([A-Z_]+)'", source))
    assert written == {"NO_RATE", "NO_BALANCE"}  # the two ways docs/architecture.md names
    assert written <= {r.value for r in REJECT_CAUSES}
