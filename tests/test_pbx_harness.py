"""The real-PBX harness itself (tests/support/pbx/): a SIPp phone started on an
endpoint's port hears only its own calls, whatever the previous phone on that port
left unanswered (issue 8 item 16)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.pbx import CallResult, Pbx, free_port
from tests.support.pbx.ports import (
    SIP_PORTS,
    SIPP_BLOCK,
    free_sip_port,
    free_sipp_block,
    free_udp_ports,
    release_sipp_block,
)

pytestmark = [pytest.mark.pbx, pytest.mark.timeout(120)]

NUMBER = "15551234567"


def explain(*results: CallResult) -> str:
    return "\n".join(r.summary() for r in results)


async def answered_call_with_a_dead_callee(pbx: Pbx) -> None:
    """A call whose callee (the carrier) dies after answering: when the phone hangs
    up, Asterisk sends the carrier a BYE that nobody answers, and retransmits it to
    the carrier's port for 32 s (SIP timer F)."""
    carrier = await pbx.uas("carrier").started()
    call = asyncio.create_task(pbx.call("alice", NUMBER, hold=2))
    for _ in range(100):  # until both legs are answered
        out = await pbx.acli("core show channels concise")
        states = [line.split("!")[4] for line in out.splitlines() if line.count("!") > 4]
        if states == ["Up", "Up"]:
            break
        await asyncio.sleep(0.05)
    carrier.kill()
    await carrier.result()
    phone = await call
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone)
    assert await asyncio.to_thread(pbx.wait_no_channels, 10)


async def test_a_new_callee_on_a_port_does_not_hear_the_last_calls_retransmissions(make_pbx):
    pbx = make_pbx(gw_agi=f"127.0.0.1:{free_port()}", fail_policy="open")
    await answered_call_with_a_dead_callee(pbx)
    # The next carrier on the same port, as the next test of a module would start it.
    carrier = await pbx.uas("carrier").started()
    await asyncio.sleep(4.5)  # longer than SIP's T2 (4 s): a live BYE is resent by then
    assert carrier.proc.returncode is None, explain(await carrier.result())
    phone = await pbx.call("alice", NUMBER, hold=1)
    seen = await carrier.result()
    assert phone.final_code == 200 and seen.final_code == 200, explain(phone, seen)
    assert seen.messages[0].first_line.startswith("INVITE "), explain(seen)


def test_ports_are_never_handed_out_twice_in_a_run():
    # 2,000 ports drawn from the kernel's ~28,000 ephemeral ones: without the
    # registry some would repeat (birthday bound: all but certain)
    ports = [free_port("udp") for _ in range(1000)] + [free_port("both") for _ in range(500)]
    sip = free_udp_ports(500, set())
    assert len(set(ports + sip)) == len(ports + sip) == 2000


def test_sip_ports_are_outside_the_ephemeral_range_and_asterisks_rtp_range():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in (*free_udp_ports(20, set()), free_sip_port()):
        assert port in SIP_PORTS and not low <= port <= high and not 20000 <= port <= 30000
    a, b = free_sipp_block(), free_sipp_block()
    assert abs(a - b) >= SIPP_BLOCK and not set(range(a, a + 8)) & set(range(b, b + 8))
    release_sipp_block(a)
    release_sipp_block(b)
