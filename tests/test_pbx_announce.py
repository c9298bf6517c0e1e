"""What callers hear, end to end through the real Asterisk 22 with SIPp phones and the
real gateway: a rejected call's announcement (early media, then the same SIP response),
the warning before a funded cut-off, and emergency calls that never wait for either.

Timings on the PBX side are read from the PBX's own log (one clock, millisecond
stamps): when the callee answered, when the warning's Local channel started, when the
call was cut."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time

import pytest
import pytest_asyncio

from gateway import dialplan_variables as var
from gateway.calls.announce import DEFAULT_PROMPTS
from gateway.calls.causes import sip_response_for
from gateway.rating.model import Reason
from tests.support.e2e import (
    DOMESTIC,
    callee,
    explain,
    gateways,
    per_second_overage,
    running_pbx,
    settled,
)
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.pbx import Pbx, free_port
from tests.support.tenant import TENANT, standard_tenant

pytestmark = [pytest.mark.pbx, pytest.mark.db, pytest.mark.timeout(180)]

ANNOUNCED = dict(announce_rejections=True)
NUMBER = "15551234567"


@pytest.fixture(scope="module")
def agi_port():
    return free_port()


@pytest.fixture(scope="module")
def e2e_pbx(pbx_root, agi_port, database_url, db_pool):
    # db_pool has run the migrations: cdr_pgsql needs its table when it loads
    with running_pbx(pbx_root, agi_port, database_url) as asterisk:
        yield asterisk


@pytest_asyncio.fixture
async def pbx(e2e_pbx: Pbx):
    yield e2e_pbx
    await e2e_pbx.clear()


@pytest_asyncio.fixture
async def start_gateway(pbx, database_url, agi_port, repo):
    async with gateways(pbx, database_url, agi_port) as start:
        yield start
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]")


def log_mark(asterisk: Pbx) -> int:
    """Where the PBX's log ends now (the PBX is shared by the module's tests)."""
    return len(asterisk.log_text())


def log_lines(asterisk: Pbx, pattern: str, since: int) -> list[tuple[float, str]]:
    """(PBX clock in seconds, line) of the PBX log lines written after ``since``
    that match ``pattern``."""
    found = []
    for line in asterisk.log_text()[since:].splitlines():
        m = STAMP.match(line)
        if m and re.search(pattern, line):
            at = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            found.append((at.timestamp(), line))
    return found


async def test_no_balance_hears_its_prompt_as_early_media_then_480(pbx, start_gateway,
                                                                   admin, repo):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 0)  # no minutes, no wallet
    await start_gateway(**ANNOUNCED)
    mark = log_mark(pbx)
    phone = await pbx.call("alice", DOMESTIC, scenario="expect_error", max_wait=30)
    why = explain(phone) + "\n" + pbx.log_tail(40)
    # the documented SIP response, with the documented cause, unchanged
    assert phone.final_code == sip_response_for(Reason.NO_BALANCE) == 480, why
    assert phone.final_response.header("Reason") == "Q.850;cause=31", why
    # before it: 183 Session Progress with SDP (early media), and the prompt played
    early = [m for m in phone.messages if m.code == 183]
    assert early and "application/sdp" in (early[0].header("Content-Type") or ""), why
    assert "m=audio" in early[0].text, why
    final = next(m for m in phone.messages if m.code == 480)
    assert early[0].at < final.at, why
    files = DEFAULT_PROMPTS[Reason.NO_BALANCE].split("&")
    played = log_lines(pbx, r"Playing '(" + "|".join(map(re.escape, files)) + r")\.", mark)
    assert len(played) == len(files), why
    print(f"\nNO_BALANCE: 183 -> 480 after {final.at - early[0].at:.2f} s of prompt")
    # nothing answered, nothing billed
    [call] = await settled(repo)
    assert (call["decision"], call["reason"]) == ("REJECT", "NO_BALANCE")
    assert not call["billed_seconds"]
    assert await pool_row(repo) == (0, 0)
    assert (await repo.get_wallet(TENANT))["balance"] == 0
    await ledger_agrees(repo)


async def test_a_reason_switched_off_is_rejected_at_once_without_early_media(
        pbx, start_gateway, admin):
    await standard_tenant(admin)
    await start_gateway(announce_prompts={"NO_LICENSE": ""}, **ANNOUNCED)
    phone = await pbx.call("carol", DOMESTIC, scenario="expect_error")  # carol: no licence
    assert phone.final_code == sip_response_for(Reason.NO_LICENSE) == 603, explain(phone)
    assert 183 not in phone.provisional_codes, explain(phone)


async def test_funding_that_runs_dry_warns_the_caller_before_the_cut(pbx, start_gateway,
                                                                      admin, repo, rater):
    """The issue's case: 60 s funded, nothing more to come: the caller hears the warning
    30 s (the default) before the cut, the PBX cuts on time and the call is billed as
    without the warning."""
    await standard_tenant(admin)
    await per_second_overage(admin)
    await admin.set_allotment("CA", "domestic", 1)  # 120 s in the pool
    used = await rater.authorise_outbound("bob", DOMESTIC)  # burn 60 s of it
    await rater.settle(used.call_id, 60)
    gw = await start_gateway(**ANNOUNCED)  # the default warning: 30 s before the end
    trunk = await callee(pbx, max_wait=90)
    mark = log_mark(pbx)
    phone = await pbx.call("alice", DOMESTIC, scenario="until_bye", max_wait=90)
    trunk_seen = await trunk.result()
    why = explain(phone, trunk_seen) + "\n" + pbx.log_tail(60)
    assert phone.bye_from == "pbx" and trunk_seen.bye_from == "pbx", why
    assert abs(phone.talk - 60) <= 1.5, why
    # on the PBX's clock: answer, the warning's start, the cut
    [(answered, _)] = log_lines(pbx, r"Channel PJSIP/carrier-\S+ joined ", mark)
    starts = log_lines(pbx, r"Executing \[warning@gateway-warning:1\]", mark)
    spied = log_lines(pbx, r"chanspy.c: Spying on channel PJSIP/alice-", mark)
    [(cut, _)] = log_lines(pbx, r"Channel PJSIP/carrier-\S+ left ", mark)
    assert len(starts) == 1 and len(spied) == 1, why  # once, whispered to the caller
    warned = starts[0][0]
    print(f"\nwarning {warned - answered:.2f} s after answer, {cut - warned:.2f} s "
          f"before the cut at {cut - answered:.2f} s")
    assert abs((cut - warned) - 30) <= 2, why
    assert abs((cut - answered) - 60) <= 1, why
    assert gw.metrics.cutoff_warnings.labels("sent")._value.get() == 1
    rows = await settled(repo, count=2)
    call = rows[-1]
    assert call["funded_seconds"] == 60 and call["billed_seconds"] == 60, dict(call)
    assert await pool_row(repo) == (120, 0)
    await ledger_agrees(repo)
    # the warning's Local channel wrote no CDR (cdr_pgsql writes the caller's row when
    # the call ends, the Local channel's at the same time: wait for the caller's)
    for _ in range(50):
        if await repo.pool.fetchval("SELECT count(*) FROM cdr WHERE uniqueid = $1",
                                    call["pbx_uniqueid"]):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the call's CDR never came")
    assert await repo.pool.fetchval(
        "SELECT count(*) FROM cdr WHERE channel LIKE 'Local/%'") == 0


async def test_emergency_calls_are_never_delayed_by_announcements(pbx, start_gateway, admin,
                                                                  repo):
    """Announcements on, and a caller who would be rejected for any other number (carol:
    no licence, no minutes): 911 is dialled at once, no prompt, no early media."""
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 0)
    await start_gateway(announce_warning_seconds=30, **ANNOUNCED)
    psap = await callee(pbx, "emergency")
    mark = log_mark(pbx)
    started = time.time()
    phone = await pbx.call("carol", "911", hold=1)
    psap_seen = await psap.result()
    why = explain(phone, psap_seen)
    assert phone.final_code == 200 and psap_seen.invite is not None, why
    assert 183 not in phone.provisional_codes, why
    assert not log_lines(pbx, r"Playback\(|Progress\(|gateway-warning", mark), why
    print(f"\n911 answered {phone.answered_at - phone.messages[0].at:.3f} s after the "
          f"INVITE ({phone.answered_at - started:.3f} s after the test placed it)")
    assert await pool_row(repo) == (0, 0)


@contextlib.asynccontextmanager
async def scripted_gateway(answers: list[dict[str, object]]):
    """A FastAGI server on a free port answering each outbound request, in turn, with
    the next variables of ``answers`` (one SET VARIABLE each); yields its port."""
    left = list(answers)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            script = ""
            while (line := await asyncio.wait_for(reader.readline(), 5)).strip():
                if line.startswith(b"agi_network_script:"):
                    script = line.split(b":", 1)[1].strip().decode()
            if script == var.OUTBOUND_ROUTE and left:
                for name, value in left.pop(0).items():
                    writer.write(f'SET VARIABLE {name} "{value}"\n'.encode())
                    await writer.drain()
                    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"200")
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_the_dialplan_plays_only_a_well_formed_announcement(make_pbx):
    """The dialplan's side alone (a scripted gateway): a SIP user name's rejection is
    announced like a number's, and a GW_ANNOUNCE that is not plain file names joined by
    '&' is not played (a ',' would reach Playback's options): rejected at once."""
    cases = (("front.desk", "beep", 21, 403, True),
             (NUMBER, "beep,skip", 31, 480, False),
             (NUMBER, "beep&../x", 31, 480, True))  # played (a missing file: nothing heard)
    answers = [{var.REASON: "NO_BALANCE", var.CAUSE: cause, var.ANNOUNCE: announce,
                var.DECISION: "REJECT"} for _, announce, cause, _, _ in cases]
    async with scripted_gateway(answers) as port:
        asterisk = make_pbx(gw_agi=f"127.0.0.1:{port}", pbx_name="pbx-announce",
                            globals={var.AGI_BACKUP: ""})
        for dialled, _, cause, code, early in cases:
            mark = log_mark(asterisk)
            phone = await asterisk.call("alice", dialled, scenario="expect_error",
                                        max_wait=20)
            why = explain(phone) + "\n" + asterisk.log_tail(30)
            assert phone.final_code == code, why
            assert phone.final_response.header("Reason") == f"Q.850;cause={cause}", why
            assert (183 in phone.provisional_codes) is early, why
            assert bool(log_lines(asterisk, r"Playback\(", mark)) is early, why
            await asterisk.clear()
