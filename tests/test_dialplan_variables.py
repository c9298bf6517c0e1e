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
from tests.support.agi import mset_items

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
    answers = (set(var.ALLOW_ANSWER) | set(var.REJECT_ANSWER)) - {var.HANGUP_HANDLER}
    gateway_sets = answers | {var.PONG, var.WARNING}
    assert names == var.DIALPLAN | gateway_sets
    assert len(names) == len(declared())  # no name declared twice
    # what the gateway answers (or originates with), the dialplan reads
    assert answers | {var.WARNING} <= var.DIALPLAN
    assert not var.DIALPLAN_ONLY & answers
    # the decision last in both; only a REJECT carries the announcement and the cause
    assert var.ALLOW_ANSWER[-1] == var.REJECT_ANSWER[-1] == var.DECISION
    assert var.ANNOUNCE not in var.ALLOW_ANSWER and var.CAUSE not in var.ALLOW_ANSWER
    assert set(var.CLEARED) == {var.DECISION}
    # the hangup handler is pushed by the answer, right after the call id it reports
    for answer in (var.ALLOW_ANSWER, var.REJECT_ANSWER):
        assert answer.index(var.HANGUP_HANDLER) == answer.index(var.CALL_ID) + 1
    assert var.HANGUP_HANDLER_AT == "gateway-hangup,s,1"
    assert "[gateway-hangup]" in dialplan_code()


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
    agi = re.compile(r"AGI\(agi://" + re.escape(var.AGI_ADDRESS) + r"/(\w+),(.*)\)\s*$")
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
    # no AGI() goes anywhere but GW_AGI or its default (the backup is swapped into it)
    assert sum("AGI(" in line for line in dialplan_code()) == len(calls)


def test_the_pbx_name_is_the_last_argument_of_every_route():
    assert var.OUTBOUND_PBX == 3 and var.INBOUND_PBX == 3 and var.HANGUP_PBX == 4
    for route, index in ((var.OUTBOUND_ROUTE, var.OUTBOUND_PBX),
                         (var.INBOUND_ROUTE, var.INBOUND_PBX),
                         (var.HANGUP_ROUTE, var.HANGUP_PBX)):
        args = var.ROUTES[route]
        assert index == len(args) - 1 and args[index] == "${" + var.PBX + "}", route


def mset_step_items(step: str) -> dict[str, str]:
    """name -> value of one MSet step of the dialplan."""
    body = re.fullmatch(r"MSet\((.*)\)", step.strip())
    assert body, step
    return mset_items(body.group(1))


ASKING = (("gateway-outbound", "_[+0-9*#]!"), ("gateway-outbound", "_[A-Za-z]."),
          ("gateway-inbound", "_[+0-9*#]!"))


def test_one_step_before_asking_clears_the_decision_and_names_the_pbx():
    """Right before the first AGI() of each asking extension, one MSet: the decision
    emptied (a parent channel must not hand down an ALLOW) and the PBX's name on the
    CDR. No hangup handler is pushed there: the answer that sets a call id pushes it."""
    for context, extension in ASKING:
        ext_steps = steps(context, extension)
        first_agi = next(i for i, st in enumerate(ext_steps) if st.startswith("AGI("))
        items = mset_step_items(ext_steps[first_agi - 1])
        assert items == {var.DECISION: "",
                         f"CDR({var.CDR_PBX})": "${" + var.PBX + "}"}, (context, items)
        assert not any("Gosub(" in st for st in ext_steps)
    assert var.HANGUP_HANDLER not in "\n".join(dialplan_code())


def steps(context: str, extension: str) -> list[str]:
    """The steps of one extension of one context, in order, without labels."""
    code, out, current = dialplan_code(), [], None
    for line in code:
        if line.startswith("["):
            current = line.strip()[1:-1]
            continue
        if current != context:
            continue
        m = re.match(r"\s*(exten => (\S+?),1(?:\([\w]+\))?,|same => n(?:\([\w]+\))?,)(.*)$",
                     line)
        assert m, line
        if m.group(2) is not None:
            out.append((m.group(2), m.group(3)))
        elif out:
            out.append((out[-1][0], m.group(3)))
    return [step for exten, step in out if exten == extension]


def test_a_delivered_hangup_report_takes_two_steps():
    """Report, ExecIf that returns: the fail-over costs nothing when the gateway answers,
    and there is no call id to check (only an answer with one pushes the handler; every
    step is a message on the AMI queue, docs/benchmarks.md)."""
    handler = steps("gateway-hangup", "s")
    assert handler[0].startswith("AGI(agi://" + var.AGI_ADDRESS + "/hangup,")
    assert handler[1].startswith("ExecIf(") and handler[1].endswith(":Return())")


def test_the_fail_over_steps_come_after_the_failure_branch_only():
    """The number paths reach the backup only through [gateway-decide], where the
    FAILURE check jumps: on the common path each asks once, checks the answer in one
    step and dials; [gateway-decide]'s steps before 'unreachable' are those of a single
    AGI."""
    for context in ("gateway-outbound", "gateway-inbound"):
        ext_steps = steps(context, "_[+0-9*#]!")
        agi = [i for i, st in enumerate(ext_steps) if st.startswith("AGI(")]
        assert len(agi) == 1, context
        check, dial = ext_steps[agi[0] + 1], ext_steps[agi[0] + 2]
        assert check.startswith("GotoIf(") and ":gateway-decide," in check, context
        assert dial.startswith("Dial(PJSIP/"), context
    code = "\n".join(dialplan_code())
    decide = code.split("[gateway-decide]", 1)[1].split("\n[", 1)[0]
    before, _, after = decide.partition("same => n(unreachable),")
    assert "AGI(" not in before and var.AGI_BACKUP not in before
    assert "AGI(" in after


def test_an_allowed_call_to_a_trunk_takes_four_steps_to_dial():
    """Check (emergency or not a number), clear and push, ask, check the answer, Dial:
    every dialplan step and every variable set is a message on the PBX's AMI queue
    (docs/benchmarks.md), and only Dial's own variables come after."""
    ext_steps = steps("gateway-outbound", "_[+0-9*#]!")
    assert [st.split("(", 1)[0] for st in ext_steps[:5]] == [
        "GotoIf", "MSet", "AGI", "GotoIf", "Dial"]
    inbound = steps("gateway-inbound", "_[+0-9*#]!")
    assert [st.split("(", 1)[0] for st in inbound[:4]] == ["MSet", "AGI", "GotoIf", "Dial"]
    # no step on the way sets a variable but the one MSet
    assert not any(st.startswith("Set(") for st in ext_steps[:5] + inbound[:4])


def test_the_allowed_path_has_no_announcement_steps():
    """The announcement's steps sit behind the REJECT branch: an allowed call never
    reads GW_ANNOUNCE nor plays anything."""
    code = "\n".join(dialplan_code())
    decide = code.split("[gateway-decide]", 1)[1].split("\n[", 1)[0]
    before, _, after = decide.partition("same => n(reject),")
    assert var.ANNOUNCE not in before and "Playback(" not in before
    allow = after.partition("same => n(allow),")[2]
    assert var.ANNOUNCE not in allow and "Playback(" not in allow and "Progress(" not in allow
    for context in ("gateway-outbound", "gateway-inbound"):
        common = steps(context, "_[+0-9*#]!")[:5]
        assert not any(var.ANNOUNCE in st or var.WARNING in st for st in common)


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
    call_id = uuid.uuid4()
    allow = Decision(True, Reason.FUNDED, call_id, route=Route.PSTN, funded_seconds=300,
                     destination="+12125550100", sources=(Source.POOL,))
    internal = Decision(True, Reason.INTERNAL, None, route=Route.INTERNAL, target="bob",
                        destination="bob")
    reject = Decision(False, Reason.NO_LICENSE, None, destination="2125550100")
    # a call id comes with the hangup handler that will report it
    trunk_allow = [(var.REASON, "FUNDED"), (var.CALL_ID, str(call_id)),
                   (var.HANGUP_HANDLER, "gateway-hangup,s,1"), (var.ROUTE, "pstn"),
                   (var.NUMBER, "12125550100"), (var.FUNDED, "300"), (var.DECISION, "ALLOW")]
    for decision, announcements, expected in (
        (allow, None, trunk_allow),
        (internal, None, [(var.REASON, "INTERNAL"), (var.ROUTE, "internal"),
                          (var.TARGET, "bob"), (var.FUNDED, ""), (var.DECISION, "ALLOW")]),
        (reject, None, [(var.REASON, "NO_LICENSE"), (var.CAUSE, "50"),
                        (var.DECISION, "REJECT")]),
        # with announcements (as the gateway runs): an ALLOW is unchanged, a REJECT
        # carries GW_ANNOUNCE, even when it is switched off (empty)
        (allow, Announcements(), trunk_allow),
        (reject, Announcements(enabled=False), [
            (var.REASON, "NO_LICENSE"), (var.CAUSE, "50"), (var.ANNOUNCE, ""),
            (var.DECISION, "REJECT")]),
    ):
        service = CallService(StubRater(decision), recovery=None,  # type: ignore[arg-type]
                              announcements=announcements)
        session = Session()
        await service.routes()[var.OUTBOUND_ROUTE](session)  # type: ignore[arg-type]
        assert session.sent == expected
        names = [name for name, _ in session.sent]
        assert names == [n for n in (var.ALLOW_ANSWER if decision.allow
                                     else var.REJECT_ANSWER) if n in names]
        await service.stop()
    # a REJECT with announcements on carries the reason's prompt
    service = CallService(StubRater(reject), recovery=None,  # type: ignore[arg-type]
                          announcements=Announcements())
    session = Session()
    await service.routes()[var.OUTBOUND_ROUTE](session)  # type: ignore[arg-type]
    assert [n for n, _ in session.sent] == [var.REASON, var.CAUSE, var.ANNOUNCE, var.DECISION]
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
