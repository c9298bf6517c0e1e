"""The contract with the dialplan: the shipped ``dialplan/extensions_gateway.conf`` and the
gateway use the same channel variables, AGI routes and argument order, all named in
``gateway/dialplan_variables.py``. Fast: reads files and runs the routes with stubs."""

from __future__ import annotations

import ast
import asyncio
import re
import uuid
from pathlib import Path

from gateway import dialplan_variables as var
from gateway.agi import AgiReply, AgiServer, parse_environment
from gateway.calls.announce import Announcements
from gateway.calls.service import CallService
from gateway.rating.model import Decision, Reason, Route, Source

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplan" / "extensions_gateway.conf"
NAME = re.compile(r"\bGW_[A-Z0-9_]+\b")


def dialplan_code() -> list[str]:
    """The dialplan's lines without their comments (';' to the end of the line)."""
    lines = DIALPLAN.read_text(encoding="utf-8").splitlines()
    return [line.split(";", 1)[0] for line in lines if line.split(";", 1)[0].strip()]


def declared() -> dict[str, str]:
    """Every GW_* name the module declares, by its Python name."""
    return {attr: value for attr, value in vars(var).items()
            if isinstance(value, str) and value.startswith("GW_")}


def test_the_dialplan_uses_exactly_the_declared_names():
    used = {name for line in dialplan_code() for name in NAME.findall(line)}
    assert used == var.DIALPLAN, (
        f"in the dialplan only: {sorted(used - var.DIALPLAN)}; "
        f"declared only: {sorted(var.DIALPLAN - used)}")


def test_every_declared_name_is_used_by_one_side_or_the_other():
    names = set(declared().values())
    gateway_sets = set(var.REJECT_ANSWER) | {var.PONG, var.WARNING}
    assert names == var.DIALPLAN | gateway_sets
    assert len(names) == len(declared())  # no name declared twice
    # what the gateway answers (or originates with), the dialplan reads
    assert set(var.REJECT_ANSWER) | {var.WARNING} <= var.DIALPLAN
    assert not var.DIALPLAN_ONLY & set(var.REJECT_ANSWER)
    # a REJECT carries the announcement too, the decision still last
    assert var.REJECT_ANSWER == (*var.ANSWER[:-1], var.ANNOUNCE, var.DECISION)


def test_no_gateway_module_spells_a_channel_variable_itself():
    """Code uses the names from the module; prose (comments, docstrings) may mention them."""
    spelled = {}
    for path in (ROOT / "gateway").rglob("*.py"):
        if path.name == "dialplan_variables.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and NAME.fullmatch(node.value)]
        if names:
            spelled[str(path.relative_to(ROOT))] = names
    assert spelled == {}


def agi_calls() -> list[tuple[str, str]]:
    """(route, arguments) of every AGI() step of the dialplan."""
    agi = re.compile(r"AGI\(agi://\$\{" + var.AGI + r"\}/(\w+),(.*)\)\s*$")
    return [m.groups() for line in dialplan_code() if (m := agi.search(line))]


def test_the_dialplan_calls_the_declared_routes_with_the_declared_arguments():
    calls = agi_calls()
    assert {route for route, _ in calls} == set(var.ROUTES)
    # every AGI() step passes the declared arguments: outbound is asked from two places
    # (numbers, SIP user names), and each route once more on the backup
    assert all(tuple(args.split(",")) == var.ROUTES[route] for route, args in calls)
    assert sorted(route for route, _ in calls) == sorted(
        [*var.ROUTES, "outbound", "outbound", "outbound", "inbound"])
    assert var.PING_ROUTE not in var.ROUTES  # the probe's, not the dialplan's
    # no AGI() goes anywhere but ${GW_AGI} (the backup is swapped into it)
    assert sum("AGI(" in line for line in dialplan_code()) == len(calls)


def test_the_pbx_name_is_the_last_argument_of_every_route():
    assert var.OUTBOUND_PBX == 3 and var.INBOUND_PBX == 3 and var.HANGUP_PBX == 4
    for route, index in ((var.OUTBOUND_ROUTE, var.OUTBOUND_PBX),
                         (var.INBOUND_ROUTE, var.INBOUND_PBX),
                         (var.HANGUP_ROUTE, var.HANGUP_PBX)):
        args = var.ROUTES[route]
        assert index == len(args) - 1 and args[index] == "${" + var.PBX + "}", route


def settings_mset() -> dict[str, str]:
    """name -> value of the one MSet of [gateway-settings] that copies the globals."""
    code = "\n".join(dialplan_code())
    section = code.split("[gateway-settings]", 1)[1].split("\n[", 1)[0]
    msets = [m for m in re.findall(r"MSet\((.*)\)\s*$", section, re.M) if var.DIRECTION in m]
    assert len(msets) == 1, msets
    # MSet splits on commas outside parentheses
    items, depth, item = [], 0, ""
    for ch in msets[0]:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += ch
    items.append(item)
    return dict(item.split("=", 1) for item in items)


def test_the_settings_copy_the_pbx_name_and_the_backup_and_put_the_name_on_the_cdr():
    """In the existing MSet: no extra dialplan step for either."""
    copied = settings_mset()
    assert copied[var.PBX] == "${GLOBAL(" + var.PBX + ")}"
    assert copied[var.AGI_BACKUP] == "${GLOBAL(" + var.AGI_BACKUP + ")}"
    assert copied[f"CDR({var.CDR_PBX})"] == "${GLOBAL(" + var.PBX + ")}"


def steps(context: str, extension: str) -> list[str]:
    """The steps of one extension of one context, in order, without labels."""
    code, out, current = dialplan_code(), [], None
    for line in code:
        if line.startswith("["):
            current = line.strip()[1:-1]
            continue
        if current != context:
            continue
        m = re.match(r"\s*(exten => (\S+?),1,|same => n(?:\([\w]+\))?,)(.*)$", line)
        assert m, line
        if m.group(2) is not None:
            out.append((m.group(2), m.group(3)))
        elif out:
            out.append((out[-1][0], m.group(3)))
    return [step for exten, step in out if exten == extension]


def test_a_delivered_hangup_report_takes_three_steps():
    """Check, report, ExecIf that returns: the fail-over costs nothing when the gateway
    answers (every step is a message on the AMI queue, docs/benchmarks.md)."""
    handler = steps("gateway-hangup", "s")
    assert handler[1].startswith("AGI(agi://${" + var.AGI + "}/hangup,")
    assert handler[2].startswith("ExecIf(") and handler[2].endswith(":Return())")


def test_the_fail_over_steps_come_after_the_failure_branch_only():
    """The number paths reach the backup only through the label the FAILURE check jumps
    to: on the happy path, [gateway-outbound] still asks once and goes to
    [gateway-decide], whose steps before 'unreachable' are those of a single AGI."""
    outbound = steps("gateway-outbound", "_[+0-9*#]!")
    agi = [i for i, s in enumerate(outbound) if s.startswith("AGI(")]
    assert len(agi) == 1 and outbound[agi[0] + 1].startswith("Goto(gateway-decide,")
    inbound = steps("gateway-inbound", "_[+0-9*#]!")
    assert sum(s.startswith("AGI(") for s in inbound) == 1
    assert inbound[-1].startswith("Goto(gateway-decide,")
    code = "\n".join(dialplan_code())
    decide = code.split("[gateway-decide]", 1)[1].split("\n[", 1)[0]
    before, _, after = decide.partition("same => n(unreachable),")
    assert "AGI(" not in before and var.AGI_BACKUP not in before
    assert "AGI(" in after


def test_the_dialplan_clears_every_answer_variable_before_asking():
    """A parent channel (Local, transfer) must not hand down an ALLOW: the settings
    subroutine empties every variable the gateway answers with. Not GW_ANNOUNCE: it is
    read on the REJECT path only, and every REJECT answer sets it (below), so clearing
    it would only add a channel variable to every allowed call."""
    cleared: set[str] = set()
    for line in dialplan_code():
        for mset in re.findall(r"MSet\(([^)]*)\)", line):
            cleared |= {item[:-1] for item in mset.split(",") if item.endswith("=")}
    assert set(var.ANSWER) <= cleared
    assert var.ANNOUNCE not in cleared


def test_the_allowed_path_has_no_announcement_steps():
    """The announcement's steps sit behind the REJECT branch: an allowed call runs the
    same [gateway-decide] steps as before it (one message each on the AMI queue)."""
    code = "\n".join(dialplan_code())
    decide = code.split("[gateway-decide]", 1)[1].split("\n[", 1)[0]
    before, _, after = decide.partition("same => n(reject),")
    assert var.ANNOUNCE not in before and "Playback(" not in before
    allow = after.partition("same => n(allow),")[2]
    assert var.ANNOUNCE not in allow and "Playback(" not in allow and "Progress(" not in allow
    settings = code.split("[gateway-settings]", 1)[1].split("\n[", 1)[0]
    assert var.ANNOUNCE not in settings and var.WARNING not in settings


class StubRater:
    slice_seconds = 300

    def __init__(self, decision: Decision):
        self.decision = decision

    async def authorise_outbound(self, *args, **kwargs):
        return self.decision


class Session:
    def __init__(self):
        lines = ["agi_network_script: outbound", "agi_uniqueid: 1.1",
                 "agi_channel: PJSIP/alice-00000001", "agi_arg_1: 2125550100",
                 "agi_arg_2: alice", "agi_arg_3: 1.1", ""]
        self.request = parse_environment(lines)
        self.sent: list[tuple[str, str]] = []

    async def set_variables(self, variables):
        self.sent.extend(variables)
        return AgiReply(200, "0", None, "200 result=0")


async def test_the_answer_sets_the_declared_variables_decision_last():
    allow = Decision(True, Reason.FUNDED, uuid.uuid4(), route=Route.PSTN, funded_seconds=300,
                     destination="+12125550100", sources=(Source.POOL,))
    reject = Decision(False, Reason.NO_LICENSE, uuid.uuid4(), destination="2125550100")
    for decision, announcements, expected in (
        (allow, None, var.ANSWER), (reject, None, var.ANSWER),
        # with announcements (as the gateway runs): an ALLOW is unchanged, a REJECT
        # carries GW_ANNOUNCE, even when it is switched off (empty)
        (allow, Announcements(), var.ANSWER), (reject, Announcements(), var.REJECT_ANSWER),
        (reject, Announcements(enabled=False), var.REJECT_ANSWER),
    ):
        service = CallService(StubRater(decision), recovery=None,  # type: ignore[arg-type]
                              announcements=announcements)
        session = Session()
        await service.routes()[var.OUTBOUND_ROUTE](session)  # type: ignore[arg-type]
        assert [name for name, _ in session.sent] == list(expected)
        assert expected[-1] == var.DECISION
        await service.stop()


async def test_the_ping_route_answers_with_pong():
    server = AgiServer({}, host="127.0.0.1", port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"agi_network_script: {var.PING_ROUTE}\n\n".encode())
        command = await asyncio.wait_for(reader.readline(), 3)
        writer.write(b"200 result=1\n")
        await writer.drain()
        writer.close()
    finally:
        await server.stop(grace=1.0)
    assert command.decode().split()[:3] == ["SET", "VARIABLE", var.PONG]
