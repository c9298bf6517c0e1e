"""The softphone lab (``gateway lab``, docs/try-it.md) with a real softphone, baresip:
it registers to the lab's Asterisk with digest auth (the phones of
``dialplan/pjsip.conf.example``), calls through the gateway and is answered by the
simulated carrier, hears the documented rejection when unlicensed, and answers the
carrier's toll-free call; the lab command starts from nothing, prints settings that
work, and leaves nothing behind when stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from gateway import lab as lab_module
from gateway.app import open_billing
from gateway.calls.causes import sip_response_for
from gateway.config import Config
from gateway.rating.model import Reason
from tests.support.ci import need
from tests.support.pbx import REPO, free_port
from tests.support.pbx.ports import free_sip_port
from tests.support.softphone import Softphone, baresip_path

pytestmark = [pytest.mark.pbx, pytest.mark.lab]

READY_LINE = "Ctrl-C stops everything."
DOMESTIC = "4165550100"  # Toronto: domestic for the Canadian example tenant


@dataclass
class RunningLab:
    proc: subprocess.Popen
    data_dir: Path
    out: Path
    err: Path
    server: str
    passwords: dict[str, str]
    page: str
    run_dir: Path

    def output(self) -> str:
        return (self.out.read_text(errors="replace") + "\n--- stderr ---\n"
                + self.err.read_text(errors="replace")[-6000:])


@contextlib.contextmanager
def lab_data_dir():
    """A data folder for one lab, outside pytest's temporary folder: the embedded
    PostgreSQL runs as another user (pgserver, when root runs it), which must traverse
    to it, and every pytest session that starts on this machine makes its base folder
    (pytest-of-USER) private again (0700), which cut a lab starting meanwhile off its
    own database ("initdb: could not open file ... Permission denied")."""
    path = Path(tempfile.mkdtemp(prefix="agi-gateway-lab-"))
    try:
        yield path / "lab"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_lab(folder: Path, data_dir: Path, pbx_root: Path) -> RunningLab:
    """Run ``gateway lab`` as a person would (its own process, free ports) and wait
    until it has printed its settings."""
    sip_port, http_port = free_sip_port(), free_port("tcp")
    out, err = folder / "lab.out", folder / "lab.err"
    cmd = [sys.executable, "-m", "gateway", "lab", "--sip-port", str(sip_port),
           "--http-port", str(http_port), "--data-dir", str(data_dir),
           "--pbx-root", str(pbx_root)]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    deadline = time.monotonic() + 120
    while READY_LINE not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            raise AssertionError(f"the lab did not get ready (exit {proc.poll()}):\n"
                                 + out.read_text() + err.read_text()[-6000:])
        time.sleep(0.2)
    text = out.read_text()
    server = re.search(r"SIP server \(registrar and proxy\): (\S+)", text).group(1)
    passwords = dict(re.findall(r"^  (\S+)\s+password (\S+)", text, re.M))
    page = re.search(r"Operator page: (\S+)", text).group(1)
    # the run folder is printed on stderr right after the settings
    while not (m := re.search(r"Asterisk's log: (\S+)/log/full", err.read_text())):
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)
    return RunningLab(proc, data_dir, out, err, server, passwords, page, Path(m.group(1)))


def stop_lab(lab: RunningLab) -> int:
    if lab.proc.poll() is None:
        lab.proc.send_signal(signal.SIGINT)
    try:
        return lab.proc.wait(60)
    except subprocess.TimeoutExpired:
        lab.proc.kill()
        lab.proc.wait()
        raise AssertionError("the lab did not stop within 60 s of SIGINT:\n"
                             + lab.output()) from None


def processes_mentioning(*needles: str) -> list[str]:
    """Command lines of running processes that mention any of ``needles``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in text for n in needles):
            found.append(f"{cmdline.parent.name}: {text}")
    return found


@pytest.fixture(scope="module")
def softphone_ok() -> None:
    if baresip_path() is None:
        need("baresip is not installed (Debian package baresip; scripts/test installs it)")


@pytest.fixture(scope="module")
def lab(pbx_root, softphone_ok, tmp_path_factory):
    with lab_data_dir() as data_dir:
        running = start_lab(tmp_path_factory.mktemp("lab"), data_dir, pbx_root)
        yield running
        stop_lab(running)


async def calls_of(lab: RunningLab, tenant: str) -> list:
    """The tenant's calls, newest first, read as ``gateway calls`` reads them (the
    lab's embedded database, shared with the running lab)."""
    async with open_billing(Config(data_dir=str(lab.data_dir))) as billing:
        return await billing.views.calls(tenant, None, 100)


async def balance_of(lab: RunningLab, tenant: str) -> Decimal:
    async with open_billing(Config(data_dir=str(lab.data_dir))) as billing:
        return (await billing.views.wallet(tenant)).balance


async def settled_call(lab: RunningLab, tenant: str, caller: str, destination: str,
                       seconds: float = 15.0):
    """The newest call from ``caller`` to ``destination``, once it has ended."""
    deadline = time.monotonic() + seconds
    while True:
        calls = [c for c in await calls_of(lab, tenant)
                 if c.caller == caller and c.destination == destination]
        if calls and calls[0].state in ("settled", "rejected"):
            return calls[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no ended call {caller} -> {destination}: {calls}")
        await asyncio.sleep(0.3)


def phone(lab: RunningLab, tmp_path: Path, name: str, password: str | None = None):
    return Softphone(tmp_path, name, lab.passwords[name] if password is None else password,
                     lab.server)


async def test_softphone_registers_calls_domestic_and_is_billed(lab, tmp_path):
    async with phone(lab, tmp_path, "maple-front") as front:
        registered = await front.register()
        assert registered["type"] == "REGISTER_OK", registered
        since = await front.dial(DOMESTIC)
        await front.wait_event("CALL_ESTABLISHED", since=since)
        await asyncio.sleep(3)  # talks: the carrier plays its prompt, the phone a tone
        await front.hangup()
        await front.wait_event("CALL_CLOSED", since=since)
    call = await settled_call(lab, "maple-dental", "maple-front", "+" + "1" + DOMESTIC)
    # authorised for the registered endpoint's user, from the domestic pool
    assert call.user_id == "front.desk@maple-dental"
    assert (call.decision, call.reason, call.route) == ("ALLOW", "FUNDED", "pstn")
    assert call.state == "settled" and call.answered_at is not None
    # one first increment of 60 s, all from the pool: nothing charged to the wallet
    assert call.sources[0] == "pool" and call.billed_seconds == 60
    assert call.charged_amount == 0, call
    assert 2 <= (call.ended_at - call.answered_at).total_seconds() < 30


async def test_wrong_password_is_refused_at_registration(lab, tmp_path):
    async with phone(lab, tmp_path, "maple-marc", password="not-the-password") as marc:
        result = await marc.register()
    assert result["type"] == "REGISTER_FAIL", result
    assert result["param"].startswith(("401", "403")), result
    state = json.loads((lab.data_dir / "lab.json").read_text())
    contacts = lab_module.cli(Path(state["root"]), state["conf"], "pjsip show contacts")
    assert "maple-marc/" not in contacts, contacts


async def rejections(lab: RunningLab, reason: str) -> float:
    """The lab gateway's count of outbound calls rejected for ``reason`` (/metrics):
    a rejected call is not a call of ``gateway calls``, it is counted."""
    async with aiohttp.ClientSession() as session, \
            session.get(lab.page + "metrics") as response:
        text = await response.text()
    m = re.search(r'^gateway_authorisations_total\{decision="REJECT",direction="outbound",'
                  rf'reason="{reason}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_unlicensed_registered_user_hears_no_license(lab, tmp_path):
    before = await rejections(lab, "NO_LICENSE")
    async with phone(lab, tmp_path, "maple-lab") as unlicensed:
        assert (await unlicensed.register())["type"] == "REGISTER_OK"
        since = await unlicensed.dial(DOMESTIC)
        closed = await unlicensed.wait_event("CALL_CLOSED", since=since)
    expected = sip_response_for(Reason.NO_LICENSE)
    assert expected == 603  # what docs/try-it.md and docs/dialplan.md say
    assert closed["param"].startswith(str(expected)), closed
    assert not any(e["type"] == "CALL_ESTABLISHED" for e in unlicensed.events[since:])
    assert await rejections(lab, "NO_LICENSE") == before + 1


async def test_toll_free_call_rings_the_registered_softphone_and_charges_the_wallet(
        lab, tmp_path):
    before = await balance_of(lab, "maple-dental")
    async with phone(lab, tmp_path, "maple-front") as front:
        assert (await front.register())["type"] == "REGISTER_OK"
        since = len(front.events)
        placed = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "lab", "call-in",
                             "--data-dir", str(lab.data_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=30)
        assert placed.returncode == 0, placed.stderr
        incoming = await front.wait_event("CALL_INCOMING", since=since)
        assert "15145550199" in json.dumps(incoming), incoming  # the carrier's caller
        await front.accept()
        await front.wait_event("CALL_ESTABLISHED", since=since)
        await asyncio.sleep(2)
        await front.hangup()
        await front.wait_event("CALL_CLOSED", since=since)
    call = await settled_call(lab, "maple-dental", "15145550199",
                              "+" + lab_module.TOLL_FREE)
    assert (call.direction, call.decision, call.reason) == ("inbound", "ALLOW", "FUNDED")
    assert call.state == "settled" and call.sources == ["wallet"]
    # one first increment of 60 s at the example's toll_free_inbound rate, 0.025 / min
    assert call.billed_seconds == 60 and call.charged_amount == Decimal("0.025")
    assert await balance_of(lab, "maple-dental") == before - Decimal("0.025")


async def test_lab_command_starts_prints_working_settings_and_stops_cleanly(
        pbx_root, softphone_ok, tmp_path):
    with lab_data_dir() as data_dir:
        await lab_starts_and_stops_cleanly(pbx_root, tmp_path, data_dir)


async def lab_starts_and_stops_cleanly(pbx_root: Path, tmp_path: Path, data_dir: Path):
    running = await asyncio.to_thread(start_lab, tmp_path, data_dir, pbx_root)
    try:
        assert set(running.passwords) == set(lab_module.PHONES), running.output()
        # the printed settings work: a softphone registers with them, the page answers
        async with phone(running, tmp_path, "maple-sophie") as sophie:
            assert (await sophie.register())["type"] == "REGISTER_OK", running.output()
        async with aiohttp.ClientSession() as session, session.get(running.page) as page:
            assert page.status == 200
        async with aiohttp.ClientSession() as session, \
                session.get(running.page + "status") as status:
            assert (await status.json())["ready"] is True
        assert running.run_dir.is_dir()
        postgres = processes_mentioning(str(running.data_dir / "pgdata"))
        asterisk = processes_mentioning(running.run_dir.name)
        assert postgres and asterisk  # what must be gone afterwards was there
    finally:
        code = await asyncio.to_thread(stop_lab, running)
    assert code == 0, running.output()
    assert "lab: stopped" in running.err.read_text()
    left = processes_mentioning(running.run_dir.name, str(running.data_dir / "pgdata"))
    assert left == [], left
    assert not running.run_dir.exists()
    assert running.run_dir.name not in Path("/proc/mounts").read_text()  # noqa: ASYNC240
    assert not (running.data_dir / "lab.json").exists()
