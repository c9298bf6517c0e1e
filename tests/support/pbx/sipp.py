"""SIPp "phones": one SIPp process per call (``Sipp``) run inside the PBX root folder
with ``chroot``, and what that phone saw (``CallResult``), read from SIPp's message
trace, which stamps every SIP message with the wall clock to the microsecond."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .ports import free_sipp_block, release_sipp_block, udp_port_bound
from .processes import PbxError, track, untrack
from .siptrace import SipMessage, parse_message_trace

if TYPE_CHECKING:
    from .asterisk import Pbx

__all__ = ["SCENARIO_DIR", "CallResult", "Sipp"]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


@dataclass
class CallResult:
    """What one SIPp phone saw during one call."""

    endpoint: str
    scenario: str
    returncode: int | None
    messages: list[SipMessage] = field(default_factory=list)
    stderr: str = ""
    errors: str = ""

    # -- INVITE transaction ---------------------------------------------------
    def _invite_responses(self) -> list[SipMessage]:
        return [m for m in self.messages if m.is_response and m.method == "INVITE"]

    @property
    def invited(self) -> bool:
        """A UAS received an INVITE (the phone rang)."""
        return any(m.first_line.startswith("INVITE ") for m in self.messages)

    @property
    def invite(self) -> SipMessage | None:
        return next((m for m in self.messages if m.first_line.startswith("INVITE ")), None)

    @property
    def provisional_codes(self) -> list[int]:
        return [m.code for m in self._invite_responses() if m.code < 200]

    @property
    def final_code(self) -> int | None:
        """The final response to the INVITE (sent or received, whichever side this is)."""
        finals = [m for m in self._invite_responses() if m.code >= 200]
        return finals[0].code if finals else None

    @property
    def final_response(self) -> SipMessage | None:
        finals = [m for m in self._invite_responses() if m.code >= 200]
        return finals[0] if finals else None

    @property
    def answered_at(self) -> float | None:
        """When the 200 OK to the INVITE was received (UAC) or sent (UAS)."""
        for m in self._invite_responses():
            if m.code == 200:
                return m.at
        return None

    @property
    def bye(self) -> SipMessage | None:
        return next((m for m in self.messages if m.first_line.startswith("BYE ")), None)

    @property
    def bye_at(self) -> float | None:
        b = self.bye
        return b.at if b else None

    @property
    def bye_from(self) -> str | None:
        """ "pbx" if the PBX sent the BYE, "phone" if this phone did."""
        b = self.bye
        if b is None:
            return None
        return "pbx" if b.direction == "received" else "phone"

    @property
    def talk(self) -> float | None:
        """Seconds from the 200 OK to the BYE, as this phone saw them."""
        if self.answered_at is None or self.bye_at is None:
            return None
        return self.bye_at - self.answered_at

    @property
    def cancelled(self) -> bool:
        return any(m.first_line.startswith("CANCEL ") for m in self.messages)

    def summary(self) -> str:
        lines = [f"{self.endpoint} {self.scenario} rc={self.returncode}"]
        t0 = self.messages[0].at if self.messages else 0.0
        for m in self.messages:
            arrow = "->" if m.direction == "sent" else "<-"
            lines.append(f"  {m.at - t0:8.3f} {arrow} {m.first_line}")
        if self.errors.strip():
            lines.append("  errors: " + self.errors.strip()[-800:])
        if self.stderr.strip():
            lines.append("  stderr: " + self.stderr.strip()[-800:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class Sipp:
    """One SIPp process for one call, run inside the root with ``chroot``.

    Use ``run()`` for a UAC (start and wait), or ``start()``/``started()``
    then ``result()`` for a UAS that must be listening before the call.
    """

    def __init__(
        self,
        pbx: Pbx,
        endpoint: str,
        scenario: str,
        *,
        params: Mapping[str, int | str] | None = None,
        service: str = "s",
        caller_id: str | None = None,
        timeout: float = 60.0,
        calls: int = 1,
    ) -> None:
        self.pbx = pbx
        self.calls = calls  # a UAS can take several calls at once (one port, -m/-l)
        self.endpoint = endpoint
        self.scenario = scenario
        self.params = dict(params or {})
        self.service = service
        self.caller_id = caller_id or endpoint
        self.timeout = timeout
        self.port = pbx.ports[endpoint]
        self.proc: asyncio.subprocess.Process | None = None
        tag = f"{scenario}-{endpoint}-{secrets.token_hex(3)}"
        self.host_dir = pbx.run_dir / "sipp" / tag
        self.guest_dir = f"{pbx.guest_dir}/sipp/{tag}"
        self._result: CallResult | None = None
        self._block: int | None = None  # control and media ports (ports.free_sipp_block)

    def _write_scenario(self) -> str:
        text = (SCENARIO_DIR / f"{self.scenario}.xml").read_text()
        for key, value in self.params.items():
            text = text.replace(f"@@{key}@@", str(value))
        if "@@" in text:
            left = sorted(set(re.findall(r"@@(\w+)@@", text)))
            raise PbxError(f"scenario {self.scenario}: no value for {left}")
        self.host_dir.mkdir(parents=True, exist_ok=True)
        (self.host_dir / "scenario.xml").write_text(text)
        return f"{self.guest_dir}/scenario.xml"

    def command(self) -> list[str]:
        scen = self._write_scenario()
        g = self.guest_dir
        pbx = self.pbx
        # SIPp's own ports: control socket and media ports must not collide with
        # other SIPp processes running at the same time.
        if self._block is None:
            self._block = free_sipp_block()
        cp, mp = self._block, self._block + 2
        return [
            "chroot",
            str(pbx.root),
            "sipp",
            f"127.0.0.1:{pbx.sip_port}",
            "-sf",
            scen,
            "-i",
            "127.0.0.1",
            "-mi",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-cp",
            str(cp),
            "-mp",
            str(mp),
            "-t",
            "u1",
            "-m",
            str(self.calls),
            "-l",
            str(self.calls),
            "-s",
            self.service,
            "-key",
            "caller",
            self.caller_id,
            "-nostdin",
            "-timeout",
            f"{int(self.timeout)}s",
            "-trace_msg",
            "-message_file",
            f"{g}/messages.log",
            "-trace_err",
            "-error_file",
            f"{g}/errors.log",
        ]

    def _open_stdout(self):
        return open(self.host_dir / "stdout.log", "wb")  # noqa: SIM115

    async def start(self) -> Sipp:
        if self.proc is not None:
            return self
        # Asterisk may still resend to this port what the previous SIPp on it left
        # unanswered; answered here, it cannot reach (and abort) this one.
        await asyncio.to_thread(self.pbx.quiet_port, self.port)
        cmd = self.command()
        self._stdout = self._open_stdout()
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        track(self.proc)
        return self

    async def started(self, seconds: float = 10.0) -> Sipp:
        """Start, and return once SIPp listens on its port (a UAS must before the call)."""
        await self.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise PbxError(f"sipp {self.scenario} exited early:\n{await self.result()}")
            if udp_port_bound(self.port):
                return self
            await asyncio.sleep(0.02)
        raise PbxError(f"sipp {self.scenario} did not bind 127.0.0.1:{self.port}")

    async def result(self, within: float | None = None) -> CallResult:
        """Wait for SIPp to finish and parse what it saw.

        Bounded by the run's own timeout, or by ``within`` seconds, after which
        SIPp is killed and the result holds what it saw so far (e.g. a callee
        that must NOT have been called: ``await uas.result(within=0.5)``).
        """
        if self._result is not None:
            return self._result
        if self.proc is None:
            await self.start()
        stderr = b""
        try:
            _, stderr = await asyncio.wait_for(
                self.proc.communicate(), self.timeout + 10 if within is None else within
            )
        except TimeoutError:
            self.kill()
            with contextlib.suppress(Exception):
                _, stderr = await asyncio.wait_for(self.proc.communicate(), 5)
        finally:
            untrack(self.proc)
            self.pbx._sipps.discard(self)
            if self._block is not None:
                release_sipp_block(self._block)
            with contextlib.suppress(Exception):
                self._stdout.close()
        msgs_path = self.host_dir / "messages.log"
        err_path = self.host_dir / "errors.log"
        self._result = CallResult(
            endpoint=self.endpoint,
            scenario=self.scenario,
            returncode=self.proc.returncode,
            messages=parse_message_trace(msgs_path.read_text(errors="replace"))
            if msgs_path.exists()
            else [],
            stderr=(stderr or b"").decode(errors="replace"),
            errors=err_path.read_text(errors="replace") if err_path.exists() else "",
        )
        return self._result

    async def run(self) -> CallResult:
        await self.start()
        return await self.result()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def __aenter__(self) -> Sipp:
        return await self.started()

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.kill()
        await self.result()


