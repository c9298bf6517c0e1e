"""A real SIP softphone for tests: baresip (Debian package ``baresip``), headless.

``Softphone`` runs one ``baresip -f DIR`` with one account (digest auth, UDP, G.711),
a WAV file of a tone as its microphone (``aufile``) and a sink as its speaker
(``aubridge``). It is driven over baresip's ``ctrl_tcp`` module (netstring-framed
JSON): commands ``dial``, ``accept``, ``hangup``, ``uareg``; events ``REGISTER_OK``,
``REGISTER_FAIL``, ``CALL_INCOMING``, ``CALL_RINGING``, ``CALL_ESTABLISHED``,
``CALL_CLOSED`` (its ``param`` says why, e.g. "603 Decline")::

    async with Softphone(tmp_path, "maple-front", password, "127.0.0.1:5060") as phone:
        await phone.register()                     # REGISTER_OK, or SoftphoneError
        await phone.dial("4165550100")
        await phone.wait_event("CALL_ESTABLISHED")
        await phone.hangup()

The account is made only when asked (``uanew``, by ``register()``), so that no
registration event is sent before the control connection is there to hear it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import struct
import wave
from pathlib import Path
from typing import Any

from .pbx.ports import free_port
from .pbx.processes import track, untrack

__all__ = ["BARESIP", "Softphone", "SoftphoneError", "baresip_path", "tone_wav"]

BARESIP = "baresip"
MODULE_DIR = "/usr/lib/baresip/modules"


class SoftphoneError(RuntimeError):
    """baresip could not be started or did not do what it was asked."""


def baresip_path() -> str | None:
    """Where baresip is, with the modules the tests use; None when it is missing."""
    exe = shutil.which(BARESIP)
    modules = ("g711.so", "aufile.so", "aubridge.so", "ctrl_tcp.so", "menu.so", "account.so")
    if exe and all((Path(MODULE_DIR) / m).exists() for m in modules):
        return exe
    return None


def tone_wav(path: Path, seconds: float = 120.0, hz: float = 440.0) -> Path:
    """A 8 kHz mono 16-bit WAV of a sine tone, longer than any test call: baresip's
    ``aufile`` source hangs the call up when it reaches the end of the file."""
    if path.exists():
        return path
    frames = int(8000 * seconds)
    one_second = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / 8000)))
                          for i in range(8000))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        for _ in range(frames // 8000):
            w.writeframes(one_second)
    return path


class Softphone:
    """One baresip with one account. ``server`` is ``host:port`` of the registrar."""

    def __init__(self, folder: Path, user: str, password: str, server: str, *,
                 address: str = "127.0.0.1"):
        self.dir = Path(folder) / f"baresip-{user}-{os.urandom(3).hex()}"
        self.user = user
        self.password = password
        self.server = server
        self.address = address
        self.ctrl_port = 0
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task | None = None
        self._new = asyncio.Condition()
        self._responses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._token = 0

    async def __aenter__(self) -> Softphone:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        exe = baresip_path()
        if exe is None:
            raise SoftphoneError("baresip is not installed (Debian package baresip)")
        self.dir.mkdir(parents=True)
        wav = tone_wav(self.dir.parent / "tone.wav")
        self.ctrl_port = free_port("tcp")
        (self.dir / "config").write_text(f"""poll_method epoll
sip_listen {self.address}:0
sip_trans_def udp
call_local_timeout 120
audio_source aufile,{wav}
audio_player aubridge,sink
audio_alert aubridge,sink
module_path {MODULE_DIR}
module g711.so
module aufile.so
module aubridge.so
module_app account.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}
""")
        (self.dir / "accounts").write_text("")  # the account comes with register()
        (self.dir / "contacts").write_text("")
        self._log = open(self.dir / "baresip.log", "wb")  # noqa: SIM115, ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            exe, "-f", str(self.dir), stdin=asyncio.subprocess.DEVNULL, stdout=self._log,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        track(self.proc)
        for _ in range(100):
            if self.proc.returncode is not None:
                raise SoftphoneError(f"baresip exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()}")
            try:
                self._reader, self._writer = await asyncio.open_connection(
                    "127.0.0.1", self.ctrl_port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise SoftphoneError(f"baresip's ctrl_tcp did not listen:\n{self.log_text()}")
        self._pump = asyncio.create_task(self._read_messages())

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    await self.proc.wait()
            untrack(self.proc)
            self.proc = None
            self._log.close()

    def log_text(self) -> str:
        p = self.dir / "baresip.log"
        text = p.read_text(errors="replace") if p.exists() else ""
        # the call statistics line is redrawn in place many times a second
        return "\n".join(ln for ln in text.replace("\r", "\n").splitlines()
                         if "audio=" not in ln)

    # -- control ---------------------------------------------------------------------

    async def _read_messages(self) -> None:
        while True:
            head = await self._reader.readuntil(b":")
            body = await self._reader.readexactly(int(head[:-1]) + 1)
            message = json.loads(body[:-1])
            if message.get("response"):
                await self._responses.put(message)
            elif message.get("event"):
                async with self._new:
                    self.events.append(message)
                    self._new.notify_all()

    async def command(self, command: str, params: str = "") -> str:
        """Send one command and return its answer's data; an error raises."""
        self._token += 1
        body = json.dumps({"command": command, "params": params,
                           "token": str(self._token)}).encode()
        self._writer.write(str(len(body)).encode() + b":" + body + b",")
        await self._writer.drain()
        reply = await asyncio.wait_for(self._responses.get(), 10)
        if not reply.get("ok"):
            raise SoftphoneError(f"{command} {params}: {reply.get('data')}")
        return reply.get("data", "")

    async def wait_event(self, *types: str, seconds: float = 20.0, since: int = 0
                         ) -> dict[str, Any]:
        """The first event of one of ``types`` (from the ``since``-th event on)."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[since:] if e.get("type") in types), None)

        async with self._new:
            try:
                await asyncio.wait_for(self._new.wait_for(found), seconds)
            except TimeoutError:
                raise SoftphoneError(
                    f"{self.user}: no {'/'.join(types)} in {seconds} s; events: "
                    f"{[(e.get('type'), e.get('param')) for e in self.events]}\n"
                    f"{self.log_text()[-3000:]}") from None
            return found()

    async def register(self, seconds: float = 15.0) -> dict[str, Any]:
        """Register (digest auth) and return REGISTER_OK or REGISTER_FAIL."""
        since = len(self.events)
        await self.command("uanew", f"<sip:{self.user}@{self.server}>;auth_pass="
                           f"{self.password};regint=600;answermode=manual;"
                           "audio_codecs=PCMU,PCMA")
        return await self.wait_event("REGISTER_OK", "REGISTER_FAIL", seconds=seconds,
                                     since=since)

    async def dial(self, number: str) -> int:
        """Call ``number`` at the server; returns the index of the next event."""
        since = len(self.events)
        await self.command("dial", f"sip:{number}@{self.server}")
        return since

    async def accept(self) -> None:
        await self.command("accept")

    async def hangup(self) -> None:
        await self.command("hangup")
