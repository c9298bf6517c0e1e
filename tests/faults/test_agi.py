"""AGI faults against a real started gateway (in-process) and real PostgreSQL: the AGI
port at max_sessions, and a bounded fuzz with a fixed seed (issue 8, fault suite).

The PBX is played by a scripted fake Asterisk over TCP: what matters here is what the
gateway does with what arrives on its AGI port, which a real Asterisk cannot be made
to send (garbage, truncated environments, connections dropped mid-session).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shlex
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from gateway import dialplan_variables as var
from gateway.app import Gateway
from gateway.config import Config
from tests.faults.invariants import assert_invariants
from tests.support.agi import mset_items
from tests.support.clock import Clock
from tests.support.gateway import NOW, running_gateway
from tests.support.tenant import standard_tenant

pytestmark = [pytest.mark.faults, pytest.mark.db, pytest.mark.timeout(120)]

DOMESTIC = "2125550100"
SEED = 20261127


def environment(script: str, args: Sequence[str] = (), *, uniqueid: str | None = None,
                channel: str = "PJSIP/alice-00000001", extra: Sequence[str] = ()) -> bytes:
    """An environment block as Asterisk 22 sends it for agi://host/<script>,<args>."""
    lines = [
        "agi_network: yes", f"agi_network_script: {script}",
        f"agi_request: agi://127.0.0.1:4573/{script}", f"agi_channel: {channel}",
        "agi_language: en", "agi_type: PJSIP",
        f"agi_uniqueid: {uniqueid or uuid.uuid4().hex[:16]}", "agi_version: 22.1.0",
        "agi_callerid: alice", "agi_context: gateway-outbound", "agi_extension: 100",
        "agi_priority: 5", "agi_enhanced: 0.0", "agi_accountcode: ", "agi_threadid: 1",
        *extra,
    ]
    lines += [f"agi_arg_{i}: {a}" for i, a in enumerate(args, start=1)]
    return ("\n".join(lines) + "\n\n").encode()


async def play(port: int, payload: bytes, *, eof: bool = False, drop_at: int | None = None,
               within: float = 10.0) -> list[str]:
    """Play Asterisk for one connection: send ``payload`` (then end the stream with
    ``eof``), answer each command ``200 result=1`` until the gateway closes; with
    ``drop_at``, close without replying once that many commands arrived (0: at once).
    Returns the commands received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    commands: list[str] = []
    try:
        writer.write(payload)
        await writer.drain()
        if eof:
            writer.write_eof()
        if drop_at == 0:
            return commands
        async with asyncio.timeout(within):
            while line := await reader.readline():
                commands.append(line.decode(errors="replace").rstrip("\n"))
                if drop_at is not None and len(commands) >= drop_at:
                    return commands
                writer.write(b"200 result=1\n")
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
    return commands


def variables_set(commands: Sequence[str]) -> dict[str, str]:
    """The channel variables the gateway set with SET VARIABLE or EXEC MSet."""
    out: dict[str, str] = {}
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["SET", "VARIABLE"] and len(words) == 4:
            out[words[2]] = words[3]
        elif words[:2] == ["EXEC", "MSet"] and len(words) == 3:
            out.update(mset_items(words[2]))
    return out


async def hangup_report(port: int, call_id: str, answered_ms: int) -> list[str]:
    args = [call_id, str(answered_ms), "ANSWER" if answered_ms else "NOANSWER",
            str(answered_ms // 1000)]
    return await play(port, environment(var.HANGUP_ROUTE, args))


@contextlib.asynccontextmanager
async def gateway_with_clock(database_url: str, clock: Clock, **config) -> AsyncIterator[Gateway]:
    """``running_gateway`` on a clock the test moves (for the reconciliation's rule)."""
    values = dict(database_url=database_url, agi_port=0, http_port=0, ami_host="",
                  reconcile_interval_seconds=3600, db_pool_size=4, **config)
    gw = Gateway(Config(**values), clock=clock, configure_logs=False)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def written(pool) -> tuple[int, int]:
    return (await pool.fetchval("SELECT count(*) FROM calls"),
            await pool.fetchval("SELECT count(*) FROM ledger"))


# ---- AGI at max_sessions ----------------------------------------------------------------

async def test_hangup_reports_settle_while_decisions_are_at_max_sessions(database_url, repo,
                                                                         admin):
    """Issue 8 item 1 (the AGI part): a hangup report refused with agi.busy lost its
    settlement. Decisions at max_sessions are refused; hangup reports still run."""
    await standard_tenant(admin)
    async with running_gateway(database_url, agi_max_sessions=2) as gw:
        port = gw.agi.port
        answer = variables_set(await play(port, environment(
            var.OUTBOUND_ROUTE, [DOMESTIC, "alice", "1.1"])))
        assert answer[var.DECISION] == "ALLOW", answer
        # Two decision-class sessions wait for the PBX's reply to their command (a PBX
        # slow to answer; the ping route writes nothing) for the gateway's command
        # timeout (5 s): decisions are at max_sessions meanwhile.
        stuck = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(environment(var.PING_ROUTE))
            assert (await reader.readline()).startswith(b"SET VARIABLE")
            stuck.append(writer)
        assert gw.agi.stats["sessions_active"] == 2

        refused = await play(port, environment(var.OUTBOUND_ROUTE, [DOMESTIC, "alice", "1.2"]))
        assert refused == [] and gw.agi.stats["rejected_busy"] == 1  # the PBX denies it
        await hangup_report(port, answer[var.CALL_ID], 5_000)
        row = await repo.pool.fetchrow("SELECT state, settled_by, billed_seconds FROM calls"
                                       " WHERE id = $1", uuid.UUID(answer[var.CALL_ID]))
        assert dict(row) == {"state": "settled", "settled_by": "agi", "billed_seconds": 60}
        assert gw.agi.stats["rejected_busy_unread"] == 0
        for writer in stuck:
            writer.close()
    assert await repo.pool.fetchval("SELECT count(*) FROM calls") == 1  # nothing for the refused
    await assert_invariants(repo.pool, all_ended=True)


# ---- AGI fuzz ---------------------------------------------------------------------------

def garbage_payloads(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """Connections that are not a well-formed session of a known route with usable
    arguments: each must write nothing."""
    def text(k: int) -> str:
        alphabet = "agi_:/ \t=()\"'\\;%$#*+-.,0123456789abcXYZé€\x7f"
        return "".join(rng.choice(alphabet) for _ in range(k))

    out: list[tuple[str, bytes]] = []
    valid = environment(var.OUTBOUND_ROUTE, [DOMESTIC, "alice", "x"])
    for i in range(n):
        kind = i % 10
        if kind == 0:
            out.append(("random bytes", rng.randbytes(rng.randint(1, 3000))))
        elif kind == 1:
            out.append(("truncated environment", valid[: rng.randint(0, len(valid) - 2)]))
        elif kind == 2:
            out.append(("line over max_line_bytes",
                        b"agi_network: yes\nagi_channel: " + b"A" * 9000 + b"\n\n"))
        elif kind == 3:
            lines = "".join(f"agi_x{j}: {j}\n" for j in range(300))
            out.append(("too many environment lines", lines.encode() + b"\n"))
        elif kind == 4:
            out.append(("not agi lines", f"{text(40)}\n{text(20)}\n\n".encode()))
        elif kind == 5:
            out.append(("repeated key", b"agi_network: yes\nagi_network: no\n\n"))
        elif kind == 6:
            route = rng.choice(["", "/", "outbound2", "OUTBOUND", "hangup/../x", text(30),
                                "x" * 4000])
            out.append(("unknown route", environment(route, [DOMESTIC, "alice"])))
        elif kind == 7:
            call_id = rng.choice(["", "not-a-uuid", text(36), str(uuid.uuid4()),
                                  "00000000-0000-0000-0000-000000000000"])
            args = [call_id, rng.choice(["", "-1", "99999999999999999999", "5000", text(8)]),
                    text(6), text(4)]
            out.append(("hangup report of no call", environment(var.HANGUP_ROUTE, args)))
        elif kind == 8:
            if rng.random() < 0.5:
                out.append(("binary environment line", b"agi_network: yes\n"
                            + rng.randbytes(200).replace(b"\n", b"") + b"\n\n"))
            else:  # a NUL cannot come from Asterisk (C strings)
                out.append(("NUL in an argument", environment(
                    var.OUTBOUND_ROUTE, [DOMESTIC + "\x00", "alice\x00", "x"])))
        else:
            out.append(("empty then close", b""))
    return out


def odd_decision(rng: random.Random, i: int) -> tuple[str, list[str]]:
    """A well-formed decision session with usable or hostile arguments."""
    endpoints = ["alice", "bob", "carol", "dave", "nobody", "", "ALICE", "alice\t",
                 "al'ice;--", "é" * 50, "x" * 2000, "PJSIP/alice"]
    numbers = [DOMESTIC, "+442079460000", "+33142685300", "911", "102", "18005550199",
               "+", "", "١٢٣٤٥٦٧٨٩٠", "1" * 40, "+1 (212) 555-0100", "2125550100\ufffd",
               "'; DROP TABLE calls; --", "*67" + DOMESTIC, "0" * 3, "%s%s%n"]
    if i % 3 == 2:
        return var.INBOUND_ROUTE, [rng.choice(numbers + ["+15145550100", "+18005550199"]),
                                   rng.choice(numbers), f"fz.{i}"]
    return var.OUTBOUND_ROUTE, [rng.choice(numbers), rng.choice(endpoints), f"fz.{i}"][
        : rng.choice([0, 1, 2, 3, 3, 3])]


async def test_agi_fuzz_never_crashes_answers_well_formed_sessions_writes_nothing_for_garbage(
        database_url, repo, admin):
    rng = random.Random(SEED)
    await standard_tenant(admin, wallet="5.00")
    clock = Clock(NOW)
    async with gateway_with_clock(database_url, clock, agi_max_sessions=50) as gw:
        port = gw.agi.port
        before = await written(repo.pool)  # no call; the wallet's top-up in the ledger

        # 1. garbage, 8 connections at a time: nothing written, nothing answered
        payloads = garbage_payloads(rng, 200)
        for start in range(0, len(payloads), 8):
            batch = payloads[start:start + 8]
            seen = await asyncio.gather(*(play(port, p, eof=True) for _, p in batch))
            for (kind, payload), commands in zip(batch, seen, strict=True):
                assert var.DECISION not in variables_set(commands), (kind, payload[:200])
        assert await written(repo.pool) == before == (0, 1)
        assert gw.agi.listening and gw.agi.stats["handler_errors"] == 0, gw.agi.stats

        # 2. well-formed decisions with odd arguments: each gets a decision; the
        #    allowed ones are then hung up as the PBX would
        sessions = [odd_decision(rng, i) for i in range(150)]
        answers = []
        for start in range(0, len(sessions), 10):
            batch = sessions[start:start + 10]
            answers += await asyncio.gather(
                *(play(port, environment(route, args)) for route, args in batch))
        allowed = []
        for (route, args), commands in zip(sessions, answers, strict=True):
            got = variables_set(commands)
            assert got.get(var.DECISION) in ("ALLOW", "REJECT"), (route, args, commands)
            if got[var.DECISION] == "ALLOW" and got.get(var.CALL_ID):
                allowed.append(got[var.CALL_ID])
        assert allowed, "the fuzz allowed no call at all"
        await asyncio.gather(*(hangup_report(port, c, rng.randint(0, 90_000)) for c in allowed))
        await assert_invariants(repo.pool, all_ended=True)

        # 3. connections dropped mid-session: before the environment ends, right after
        #    it, or on the gateway's answer
        dropped_answers: set[str] = set()
        for i in range(60):
            uniqueid = f"drop.{i}"
            payload = environment(var.OUTBOUND_ROUTE, [DOMESTIC, "alice", uniqueid],
                                  uniqueid=uniqueid)
            how = i % 3
            if how == 0:
                await play(port, payload[: rng.randint(1, len(payload) - 3)], drop_at=0)
            elif how == 1:
                await play(port, payload, drop_at=0)
                dropped_answers.add(uniqueid)  # the decision may be made: answer lost
            else:
                await play(port, payload, drop_at=1)
                dropped_answers.add(uniqueid)
        await asyncio.sleep(0.5)  # let the gateway finish the sessions it still holds
        assert gw.agi.stats["handler_errors"] == 0, gw.agi.stats
        for _ in range(100):
            if gw.agi.stats["sessions_active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert gw.agi.stats["sessions_active"] == 0

        # still answering, and a decision after all that is ordinary
        final = variables_set(await play(port, environment(
            var.OUTBOUND_ROUTE, [DOMESTIC, "alice", "last"])))
        assert final[var.DECISION] == "ALLOW"
        await hangup_report(port, final[var.CALL_ID], 1_000)

        # A decision whose answer never reached the PBX leaves its call open (no
        # hangup report can name it): only those, each holding its own reservation ...
        open_calls = await repo.pool.fetch(
            "SELECT pbx_uniqueid FROM calls WHERE state IN ('authorised', 'answered')")
        assert {r["pbx_uniqueid"] for r in open_calls} <= dropped_answers
        assert len(open_calls) >= 20  # at least those dropped on the gateway's answer
        await assert_invariants(repo.pool, all_ended=False)
        # ... until reconciliation closes them past their funded end, the ringing
        # allowance and the grace (docs/billing.md, "Recovery"): never answered, unbilled
        clock.advance(hours=1)
        counts = await gw.calls.reconcile()
        assert counts["expired"] == len(open_calls), counts
    await assert_invariants(repo.pool, all_ended=True)
