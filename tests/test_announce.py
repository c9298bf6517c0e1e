"""What callers hear, without a PBX: the prompts chosen by reason and language, the
configuration that names them, the warning's arithmetic, and the live-call table that
schedules the warning (a stub AMI link records the Originate). The real PBX plays them
in tests/test_pbx_announce.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import pytest

from gateway import dialplan_variables as var
from gateway.agi import AgiReply, parse_environment
from gateway.ami.events import DialEnd
from gateway.billing.rater import Renewal
from gateway.calls.announce import (
    DEFAULT_PROMPTS,
    DEFAULT_WARNING_SECONDS,
    AnnouncementError,
    Announcements,
    renew_margin,
    warning_due,
)
from gateway.calls.causes import REJECT_CAUSES
from gateway.calls.live import LiveCall, LiveCalls
from gateway.calls.service import CallService
from gateway.config import ConfigError, load
from gateway.metrics import Metrics
from gateway.rating.model import Decision, Reason

# ---- prompts ---------------------------------------------------------------------------


def test_every_reject_reason_has_a_stock_prompt_by_default():
    a = Announcements.configured()
    assert set(DEFAULT_PROMPTS) == set(REJECT_CAUSES)
    assert a.for_rejection("NO_BALANCE") == "cannot-complete-as-dialed&please-try-call-later"
    assert a.for_rejection("UNKNOWN_NUMBER") == "ss-noservice"
    assert a.for_rejection("FUNDED") == ""  # an allow reason is never announced
    assert Announcements.configured(enabled=False).for_rejection("NO_BALANCE") == ""


def test_prompts_per_reason_and_per_language_over_the_stock_ones():
    a = Announcements.configured(prompts={
        "NO_BALANCE": "custom/no-balance", "NO_LICENSE": "",
        "fr": {"NO_BALANCE": "custom/fr/plus-de-credit"}})
    assert a.for_rejection("NO_BALANCE", "en") == "custom/no-balance"
    assert a.for_rejection("NO_BALANCE", "fr") == "custom/fr/plus-de-credit"
    assert a.for_rejection("NO_LICENSE", "fr") == ""  # switched off, in every language
    assert a.for_rejection("NO_RATE", "fr") == DEFAULT_PROMPTS[Reason.NO_RATE]


@pytest.mark.parametrize("prompts, error", [
    ({"NO_MONEY": "beep"}, "announce.prompts: 'NO_MONEY' is not a reason"),
    ({"FUNDED": "beep"}, "announce.prompts: 'FUNDED' is not a reason"),
    ({"NO_BALANCE": "beep,n"}, "announce.prompts.NO_BALANCE: 'beep,n' is not a prompt"),
    ({"NO_BALANCE": "beep&"}, "announce.prompts.NO_BALANCE: 'beep&' is not a prompt"),
    ({"fr": {"NO_BALANCE": "a b"}}, "announce.prompts.fr.NO_BALANCE: 'a b' is not a prompt"),
    ({"f r": {"NO_BALANCE": "beep"}}, "announce.prompts.f r: not a language name"),
])
def test_a_prompt_or_reason_that_cannot_work_is_refused_by_name(prompts, error):
    with pytest.raises(AnnouncementError) as err:
        Announcements.configured(prompts=prompts)
    assert str(err.value).startswith(error)


def test_the_configuration_file_names_prompts_per_reason_and_language(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[announce]\nwarning_seconds = 20\nwarning_prompt = "beep"\n'
                    '[announce.prompts]\nNO_BALANCE = "custom/nb"\nGATEWAY_ERROR = ""\n'
                    '[announce.prompts.fr]\nNO_BALANCE = "custom/fr/nb"\n')
    cfg = load(path, environ={})
    assert cfg.announce_prompts == {"NO_BALANCE": "custom/nb", "GATEWAY_ERROR": "",
                                    "fr": {"NO_BALANCE": "custom/fr/nb"}}
    assert (cfg.announce_warning_seconds, cfg.announce_warning_prompt) == (20, "beep")
    path.write_text('[announce.prompts]\nNO_BALANCE = "x,y"\n')
    with pytest.raises(ConfigError, match="announce.prompts.NO_BALANCE: 'x,y' is not"):
        load(path, environ={})
    with pytest.raises(ConfigError, match="announce.warning_seconds must be from 0"):
        load(None, environ={"GATEWAY_ANNOUNCE_WARNING_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="announce_prompts: cannot read"):
        load(None, environ={"GATEWAY_ANNOUNCE_PROMPTS": "NO_BALANCE=beep"})
    assert load(None, environ={"GATEWAY_ANNOUNCE_REJECTIONS": "false"}).announce_rejections \
        is False


async def test_a_rejection_answers_with_the_prompt_of_the_channels_language():
    class Rater:
        slice_seconds = 300

        async def authorise_outbound(self, *args, **kwargs):
            return Decision(False, Reason.NO_BALANCE, uuid.uuid4(), destination="2125550100")

    class Session:
        def __init__(self, language: str):
            self.request = parse_environment([
                "agi_network_script: outbound", f"agi_language: {language}",
                "agi_uniqueid: 1.1", "agi_channel: PJSIP/alice-00000001",
                "agi_arg_1: 2125550100", "agi_arg_2: alice", ""])
            self.sent: dict[str, str] = {}

        async def set_variables(self, variables):
            self.sent.update(variables)
            return AgiReply(200, "0", None, "200 result=0")

    announcements = Announcements.configured(prompts={"fr": {"NO_BALANCE": "custom/fr/nb"}})
    service = CallService(Rater(), recovery=None,  # type: ignore[arg-type]
                          announcements=announcements)
    heard = {}
    for language in ("fr", "en"):
        session = Session(language)
        await service.routes()[var.OUTBOUND_ROUTE](session)  # type: ignore[arg-type]
        heard[language] = session.sent[var.ANNOUNCE]
        assert (session.sent[var.DECISION], session.sent[var.CAUSE]) == ("REJECT", "31")
    await service.stop()
    assert heard == {"fr": "custom/fr/nb", "en": DEFAULT_PROMPTS[Reason.NO_BALANCE]}


# ---- the warning's arithmetic --------------------------------------------------------------


def test_the_default_warning_comes_30_seconds_before_a_60_second_funding():
    assert DEFAULT_WARNING_SECONDS == 30
    assert warning_due(60.0, DEFAULT_WARNING_SECONDS) == 30.0  # at answer: in 30 s
    assert warning_due(45.0, DEFAULT_WARNING_SECONDS) == 15.0  # 15 s into the call
    assert warning_due(20.0, DEFAULT_WARNING_SECONDS) == 0.0  # learnt late: at once
    assert warning_due(0.0, DEFAULT_WARNING_SECONDS) is None  # the deadline is here
    assert warning_due(60.0, 0) is None  # switched off


def test_renewals_come_early_enough_to_know_before_the_warning():
    assert renew_margin(30, DEFAULT_WARNING_SECONDS, 300) == 32  # before the warning
    assert renew_margin(30, 0, 300) == 30  # warnings off: as before
    assert renew_margin(30, 10, 10) == 3  # never more than a third of a slice ahead
    assert renew_margin(30, 0, 10) == 3  # (as before)
    assert renew_margin(40, 10, 300) == 40  # never later than without warnings


# ---- the live-call table schedules it ----------------------------------------------------


class StubRater:
    slice_seconds = 10

    def __init__(self, renewals: list[Renewal]):
        self.renewals = renewals

    def clock(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def answered(self, call_id, at):
        return True

    async def renew(self, call_id, seconds=None, *, fence=None):
        return self.renewals.pop(0) if self.renewals else Renewal(0, 0, True)


class StubAmi:
    def __init__(self):
        self.originated: list[tuple[float, tuple]] = []
        self.moved: list[str] = []

    async def setvar(self, channel, variable, value):
        self.moved.append(value)

    async def originate_application(self, *args):
        self.originated.append((time.monotonic(), args))


def live_table(rater, warning_seconds: int) -> tuple[LiveCalls, StubAmi]:
    table = LiveCalls(rater, Metrics(), renew_before_seconds=30, monotonic=time.monotonic,
                      announcements=Announcements.configured(
                          warning_seconds=warning_seconds, warning_prompt="beep"))
    table.ami = ami = StubAmi()
    return table, ami


def answer(table: LiveCalls, funded: int, *, final: bool) -> LiveCall:
    call = LiveCall(call_id=uuid.uuid4(), direction="outbound", tenant_id="t", caller="alice",
                    destination="+12125550100", route="pstn", rated=True,
                    funded_seconds=funded, uniqueid="1.1", channel="PJSIP/alice-00000001",
                    funding_final=final)
    table.track(call)
    return call


async def test_a_call_funded_short_at_authorisation_warns_its_caller_once():
    table, ami = live_table(StubRater([]), warning_seconds=2)
    call = answer(table, 3, final=True)
    answered = time.monotonic()
    await table.on_dial_end(DialEnd("1.1", "ANSWER", "PJSIP/carrier-00000002", None))
    await asyncio.sleep(1.6)
    await table.stop()
    [(at, args)] = ami.originated
    assert args == (f"Local/{var.WARNING_EXTEN}@{var.WARNING_CONTEXT}/n", "ChanSpy",
                    "PJSIP/alice-00000001,qwEu",
                    {var.WARNING: "beep", "CDR_PROP(disable)": "1"})
    assert 0.8 <= at - answered <= 1.3  # 3 s funded, warned 2 s before the end
    assert call.warned and table.metrics.cutoff_warnings.labels("sent")._value.get() == 1


async def test_a_short_renewal_makes_the_funding_final_and_warns():
    # slice 10: a renewal of 2 s is short, the sources ran dry
    table, ami = live_table(StubRater([Renewal(2, 3, True)]), warning_seconds=1)
    call = answer(table, 1, final=False)
    await table.on_dial_end(DialEnd("1.1", "ANSWER", "PJSIP/carrier-00000002", None))
    await asyncio.sleep(2.4)
    await table.stop()
    assert call.funding_final and call.funded_seconds == 3
    assert ami.moved and len(ami.originated) == 1


async def test_funding_that_goes_on_is_never_warned():
    table, ami = live_table(StubRater([Renewal(10, 11, True)]), warning_seconds=1)
    call = answer(table, 1, final=False)
    await table.on_dial_end(DialEnd("1.1", "ANSWER", "PJSIP/carrier-00000002", None))
    await asyncio.sleep(0.5)
    await table.stop()
    assert not call.funding_final and call.funded_seconds == 11 and ami.originated == []


async def test_a_top_up_before_the_warning_cancels_it():
    """Funded short at authorisation (3 s of a 10 s slice), then a renewal (done early
    enough to know before the warning) reserves a whole slice: no warning."""
    table, ami = live_table(StubRater([Renewal(10, 13, True)]), warning_seconds=2)
    call = answer(table, 3, final=True)
    await table.on_dial_end(DialEnd("1.1", "ANSWER", "PJSIP/carrier-00000002", None))
    await asyncio.sleep(1.5)  # past the 1 s the warning was first due at
    await table.stop()
    assert not call.funding_final and call.funded_seconds == 13
    assert ami.originated == [] and not call.warned
