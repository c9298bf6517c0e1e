"""Record real FastAGI sessions and AMI event streams into ``tests/fixtures/``.

    .venv/bin/python -m tests.record_transcripts [--out tests/fixtures]

Starts the real PBX harness (Asterisk 22 + SIPp, ``tests/support/pbx/``) and the
real gateway (``gateway.app.Gateway``) on a scratch PostgreSQL database that this
script creates and drops. Two taps sit on the wire:

* a TCP recording proxy between Asterisk and the gateway's FastAGI port (the PBX's
  ``GW_AGI`` points at the proxy). It forwards bytes unchanged and writes each line,
  in the order Asterisk sent or received it, to ``fixtures/agi/<call>-<route>.txt``;
* a raw AMI connection of its own, logged in with the harness's AMI account, that
  writes every byte it receives (and the actions it sends, secret masked) to
  ``fixtures/ami/<call>.txt``; one such connection per call.

The file formats are documented in ``tests/fixtures/README.md``; the fast tests in
``tests/test_transcripts.py`` replay them without a PBX or a database.

The proxy can hold back the gateway's first bytes of one session
(``AgiRecorder.hold_next``): that is how the "caller hangs up while the gateway is
deciding" call gets Asterisk's unsolicited ``HANGUP`` on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from gateway import logs
from gateway.app import Gateway
from gateway.config import Config
from tests.support.pbx import Pbx, PbxError, Sipp, free_port, root_ready
from tests.support.tenant import standard_tenant

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"
ADMIN_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET_MASK = "********"
TIME_NOTE_GAP = 0.05  # a pause this long on the wire gets a "# +t s" comment line

DOMESTIC = "2125550100"  # New York: domestic for the Canadian tenant, billed from the pool
TOLL_FREE = "18005550199"  # the tenant's toll-free number, rings alice, charged to the wallet


# ---------------------------------------------------------------------------------------
# The byte-exact line format shared by both kinds of fixture (tests/fixtures/README.md)
# ---------------------------------------------------------------------------------------

_ESCAPES = {ord("\\"): "\\\\", ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t"}


def escape(data: bytes) -> str:
    """Printable UTF-8 stays as it is; backslash, CR, LF, TAB become ``\\\\ \\r \\n \\t``;
    any other control byte and any byte that is not valid UTF-8 becomes ``\\xNN``."""
    out: list[str] = []
    text = data.decode("utf-8", errors="surrogateescape")
    for ch in text:
        code = ord(ch)
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def split_lines(data: bytes) -> list[bytes]:
    """Split after each LF, keeping it; a last piece without LF is kept as it is."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


# ---------------------------------------------------------------------------------------
# FastAGI recording proxy
# ---------------------------------------------------------------------------------------


@dataclass
class AgiRecording:
    """One FastAGI connection as Asterisk saw it: (direction, one line's bytes, seconds
    since the connection opened), and when each side closed."""

    opened: float
    held: float = 0.0
    lines: list[tuple[str, bytes, float]] = field(default_factory=list)
    _partial: dict[str, bytes] = field(default_factory=lambda: {"A": b"", "G": b""})
    done: asyncio.Event = field(default_factory=asyncio.Event)
    closed: dict[str, float] = field(default_factory=dict)  # direction -> when its EOF came

    def feed(self, direction: str, chunk: bytes, at: float) -> None:
        data = self._partial[direction] + chunk
        *complete, rest = data.split(b"\n")
        for line in complete:
            self.lines.append((direction, line + b"\n", at - self.opened))
        self._partial[direction] = rest

    def eof(self, direction: str, at: float) -> None:
        if self._partial[direction]:
            self.lines.append((direction, self._partial[direction], at - self.opened))
            self._partial[direction] = b""
        self.closed[direction] = at - self.opened

    @property
    def script(self) -> str:
        for direction, line, _ in self.lines:
            if direction == "A" and line.startswith(b"agi_network_script:"):
                return line.split(b":", 1)[1].strip().decode()
        return "unknown"

    def render(self, header: list[str]) -> str:
        events: list[tuple[float, int, str]] = []
        for i, (direction, line, at) in enumerate(self.lines):
            if line.endswith(b"\n"):
                events.append((at, i, f"{direction}> {escape(line[:-1])}"))
            else:  # the connection closed in the middle of this line
                events.append((at, i, f"{direction}- {escape(line)}"))
        for direction, at in self.closed.items():
            events.append((at, len(self.lines), f"{direction}."))
        out = [f"# {h}" if h else "#" for h in header]
        last = 0.0
        for at, _, text in sorted(events):
            if at - last >= TIME_NOTE_GAP:
                out.append(f"# +{at:.3f} s")
            last = at
            out.append(text)
        return "\n".join(out) + "\n"


class AgiRecorder:
    """A TCP proxy: Asterisk connects here, every byte goes on to the gateway unchanged."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sessions: list[AgiRecording] = []
        self.hold_next = 0.0  # hold the gateway's bytes of the next session this long
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _handle(self, a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter):
        loop = asyncio.get_running_loop()
        rec = AgiRecording(opened=loop.time(), held=self.hold_next)
        self.hold_next = 0.0
        self.sessions.append(rec)
        try:
            g_reader, g_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            a_writer.close()
            rec.done.set()
            return

        async def pump(src, dst, direction: str, hold_until: float) -> None:
            try:
                while chunk := await src.read(65536):
                    delay = hold_until - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    # recorded when forwarded: the order in which Asterisk saw the bytes
                    rec.feed(direction, chunk, loop.time())
                    dst.write(chunk)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                rec.eof(direction, loop.time())
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()

        try:
            async with asyncio.timeout(60):
                await asyncio.gather(
                    pump(a_reader, g_writer, "A", 0.0),
                    pump(g_reader, a_writer, "G", rec.opened + rec.held),
                )
        finally:
            for w in (a_writer, g_writer):
                w.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(1):
                        await w.wait_closed()
            rec.done.set()


# ---------------------------------------------------------------------------------------
# Raw AMI tap
# ---------------------------------------------------------------------------------------


class AmiTap:
    """A plain AMI connection that keeps every byte: what it receives, what it sends."""

    def __init__(self, host: str, port: int, username: str, secret: str) -> None:
        self.host, self.port, self.username, self.secret = host, port, username, secret
        self.chunks: list[tuple[str, bytes]] = []  # ("<" received | ">" sent, bytes)
        self.received = b""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._task = asyncio.create_task(self._read())
        await self._wait_for(b"\r\n")  # the banner
        self._send(f"Action: Login\r\nActionID: tap-login\r\nUsername: {self.username}\r\n"
                   f"Secret: {self.secret}\r\nEvents: on\r\n\r\n")
        await self._wait_for(b"ActionID: tap-login")
        if b"Response: Success" not in self.received:
            raise PbxError(f"AMI tap login refused: {self.received!r}")
        await self._wait_for(b"Event: FullyBooted")

    def count(self, marker: bytes) -> int:
        return self.received.count(marker)

    async def close(self) -> None:
        self._send("Action: Logoff\r\nActionID: tap-logoff\r\n\r\n")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._task
        self._writer.close()

    def _send(self, text: str) -> None:
        data = text.encode()
        self.chunks.append((">", data))
        self._writer.write(data)

    async def _read(self) -> None:
        while chunk := await self._reader.read(65536):
            self.chunks.append(("<", chunk))
            self.received += chunk

    async def _wait_for(self, marker: bytes, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while marker not in self.received:
            if time.monotonic() > deadline or self._task.done():
                raise PbxError(f"AMI tap: no {marker!r} within {within}s: {self.received!r}")
            await asyncio.sleep(0.02)

    def render(self, header: list[str]) -> str:
        out = [f"# {h}" if h else "#" for h in header]
        # Coalesce by direction, then one file line per wire line.
        merged: list[tuple[str, bytes]] = []
        for direction, data in self.chunks:
            if merged and merged[-1][0] == direction:
                merged[-1] = (direction, merged[-1][1] + data)
            else:
                merged.append((direction, data))
        secret = self.secret.encode()
        for direction, data in merged:
            data = data.replace(secret, SECRET_MASK.encode())
            out.extend(f"{direction} {escape(line)}" for line in split_lines(data))
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# A SIPp phone that cancels as soon as Asterisk says "100 Trying" (the gateway is deciding)
# ---------------------------------------------------------------------------------------

CANCEL_WHILE_DECIDING_XML = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="uac_cancel_while_deciding">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=z9hG4bK-[pid]-[call_number]-inv
      From: "[caller]" <sip:[caller]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:[caller]@[local_ip]:[local_port]>
      Max-Forwards: 70
      User-Agent: gateway-test-phone
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv response="100"/>
  <pause milliseconds="@@CANCEL_MS@@"/>
  <send>
    <![CDATA[

      CANCEL sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=z9hG4bK-[pid]-[call_number]-inv
      From: "[caller]" <sip:[caller]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=z9hG4bK-[pid]-[call_number]-inv
      From: "[caller]" <sip:[caller]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


class InlineSipp(Sipp):
    """A ``Sipp`` whose scenario text lives here rather than in ``tests/support/pbx/scenarios``."""

    def __init__(self, pbx: Pbx, endpoint: str, xml: str, **kw) -> None:
        super().__init__(pbx, endpoint, "inline", **kw)
        self._xml = xml

    def _write_scenario(self) -> str:
        text = self._xml
        for key, value in self.params.items():
            text = text.replace(f"@@{key}@@", str(value))
        self.host_dir.mkdir(parents=True, exist_ok=True)
        (self.host_dir / "scenario.xml").write_text(text)
        return f"{self.guest_dir}/scenario.xml"


# ---------------------------------------------------------------------------------------
# The calls
# ---------------------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    description: str
    place: Callable[[Pbx, AgiRecorder], Awaitable[str]]  # returns what the phone saw
    cdrs: int = 1  # Cdr events to wait for before closing the AMI tap


async def _domestic_answered(pbx: Pbx, agi: AgiRecorder) -> str:
    trunk = await pbx.uas("carrier").started()
    phone = await pbx.call("alice", DOMESTIC, hold=2.0)
    callee = await trunk.result()
    _expect(phone.final_code == 200 and phone.bye_from == "phone", phone, callee)
    return phone.summary()


async def _no_license(pbx: Pbx, agi: AgiRecorder) -> str:
    phone = await pbx.call("carol", DOMESTIC, scenario="expect_error")
    _expect(phone.final_code == 603, phone)
    return phone.summary()


async def _toll_free_inbound(pbx: Pbx, agi: AgiRecorder) -> str:
    alice = await pbx.uas("alice").started()
    phone = await pbx.call("carrier", TOLL_FREE, hold=2.0, caller_id="14165550123")
    callee = await alice.result()
    _expect(phone.final_code == 200 and callee.final_code == 200, phone, callee)
    return phone.summary()


async def _cancelled_ringing(pbx: Pbx, agi: AgiRecorder) -> str:
    trunk = await pbx.uas("carrier", answer=False).started()
    phone = await pbx.call("alice", DOMESTIC, scenario="cancel", cancel_after=1.5)
    callee = await trunk.result()
    _expect(phone.cancelled and phone.final_code == 487, phone, callee)
    return phone.summary()


async def _caller_gone_while_deciding(pbx: Pbx, agi: AgiRecorder) -> str:
    # The proxy holds the gateway's answer for 2 s; the phone cancels 0.3 s after
    # "100 Trying", so Asterisk sends HANGUP while the gateway's first command waits.
    agi.hold_next = 2.0
    sipp = InlineSipp(pbx, "alice", CANCEL_WHILE_DECIDING_XML, params={"CANCEL_MS": 300},
                      service=DOMESTIC, timeout=30)
    pbx._sipps.add(sipp)  # so that pbx.kill_sipps() covers it
    phone = await sipp.run()
    _expect(phone.cancelled and phone.final_code == 487, phone)
    return phone.summary()


CALLS = [
    Call("domestic_answered", "alice dials 2125550100 (domestic, pool); the carrier "
         "answers; alice hangs up after 2 s", _domestic_answered),
    # no Cdr event for calls that never dialled (cdr.conf unanswered = no)
    Call("no_license", "carol (no licence) dials 2125550100: REJECT NO_LICENSE, SIP 603",
         _no_license, cdrs=0),
    Call("toll_free_inbound", "the carrier delivers a call from 14165550123 to the toll-free "
         "18005550199 (wallet); alice answers; the carrier hangs up after 2 s",
         _toll_free_inbound),
    Call("cancelled_ringing", "alice dials 2125550100; the carrier rings and never answers; "
         "alice cancels after 1.5 s of ringing", _cancelled_ringing),
    Call("caller_gone_while_deciding", "alice dials 2125550100 and cancels 0.3 s after 100 "
         "Trying, while the recording proxy holds the gateway's answer for 2 s",
         _caller_gone_while_deciding, cdrs=0),
]


def _expect(ok: bool, *results) -> None:
    if not ok:
        raise PbxError("the call did not go as planned:\n"
                       + "\n".join(r.summary() for r in results))


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


def _common_header(kind: str, call: Call, version: str) -> list[str]:
    return [
        f"{kind} recorded by tests/record_transcripts.py on "
        f"{dt.date.today().isoformat()} from Asterisk {version} (format: tests/fixtures/README.md)",
        f"call {call.name}: {call.description}",
    ]


async def _settle(pbx: Pbx, agi: AgiRecorder, tap: AmiTap, call: Call) -> None:
    """Wait until the call is over on the PBX, every AGI session closed, the CDRs out."""
    if not await asyncio.to_thread(pbx.wait_no_channels, 15):
        raise PbxError(f"{call.name}: channels still up: {pbx.channels()}")
    deadline = time.monotonic() + 15
    while not all(s.done.is_set() for s in agi.sessions):
        if time.monotonic() > deadline:
            raise PbxError(f"{call.name}: an AGI session is still open")
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 5
    while tap.count(b"Event: Cdr\r\n") < call.cdrs:
        if time.monotonic() > deadline:
            print(f"   {call.name}: only {tap.count(b'Event: Cdr')} Cdr events, "
                  f"expected {call.cdrs}", file=sys.stderr)
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # late events still arrive


async def _create_database() -> tuple[str, Callable[[], Awaitable[None]]]:
    name = f"gw_record_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rpartition("/")[0]

    async def drop() -> None:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return f"{base}/{name}", drop


def _check_portable(text: str, where: str, banned: list[str]) -> None:
    for needle in banned:
        if needle and needle in text:
            raise SystemExit(f"{where}: contains a machine path {needle!r}; not writing it")


async def record(out: Path, only: set[str] | None = None) -> list[Path]:
    logs.configure("console", "warning")
    database_url, drop_database = await _create_database()
    gw_port = free_port()
    recorder = AgiRecorder(gw_port)
    pbx: Pbx | None = None
    written: list[Path] = []
    gateway: Gateway | None = None
    try:
        pbx = Pbx(gw_agi=f"127.0.0.1:{await recorder.start()}")
        await asyncio.to_thread(pbx.start)
        version = (await pbx.acli("core show version")).split()[1]
        banned = [str(pbx.root), str(pbx.run_dir), pbx.guest_dir, str(HERE.parent)]
        config = Config(database_url=database_url, agi_port=gw_port, http_port=0,
                        ami_host=pbx.ami_host, ami_port=pbx.ami_port,
                        ami_username=pbx.ami_user, ami_secret=pbx.ami_secret,
                        reconcile_interval_seconds=3600, log_format="console",
                        log_level="warning")
        gateway = Gateway(config, configure_logs=False)
        await gateway.start()
        await standard_tenant(gateway.provisioning, wallet="1.00")
        (out / "agi").mkdir(parents=True, exist_ok=True)
        (out / "ami").mkdir(parents=True, exist_ok=True)

        for call in CALLS:
            if only and call.name not in only:
                continue
            tap = AmiTap(pbx.ami_host, pbx.ami_port, pbx.ami_user, pbx.ami_secret)
            await tap.open()
            first = len(recorder.sessions)
            stats_before = dict(gateway.agi.stats)
            try:
                seen = await call.place(pbx, recorder)
                await _settle(pbx, recorder, tap, call)
            finally:
                pbx.kill_sipps()
                await tap.close()
            stats = {k: v - stats_before.get(k, 0) for k, v in gateway.agi.stats.items()}
            print(f"== {call.name}\n{seen}\n   gateway AGI stats for this call: {stats}")

            ami_text = tap.render(_common_header("AMI stream", call, version))
            _check_portable(ami_text, call.name, banned)
            path = out / "ami" / f"{call.name}.txt"
            path.write_text(ami_text, encoding="utf-8", newline="\n")
            written.append(path)
            for session in recorder.sessions[first:]:
                header = _common_header("FastAGI session", call, version)
                if session.held:
                    header.append(f"the proxy held the gateway's bytes until "
                                  f"{session.held:.1f} s after the connection opened")
                agi_text = session.render(header)
                _check_portable(agi_text, call.name, banned)
                path = out / "agi" / f"{call.name}-{session.script}.txt"
                if path in written:
                    raise SystemExit(f"{call.name}: two {session.script} sessions")
                path.write_text(agi_text, encoding="utf-8", newline="\n")
                written.append(path)
                print(f"   {path.relative_to(out)}: {len(session.lines)} lines")
        rows = await gateway.pool.fetch(
            "SELECT direction, decision, reason, state, billable_seconds, billed_seconds,"
            " settled_by FROM calls ORDER BY authorised_at")
        print("calls as the gateway recorded them:")
        for row in rows:
            print("   " + ", ".join(f"{k}={v}" for k, v in row.items()))
    finally:
        if gateway is not None:
            await gateway.stop()
        await recorder.stop()
        if pbx is not None:
            await asyncio.to_thread(pbx.stop)
        await drop_database()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="fixtures folder (default: tests/fixtures)")
    parser.add_argument("--only", action="append", choices=[c.name for c in CALLS],
                        help="record only this call (repeatable)")
    args = parser.parse_args(argv)
    if not root_ready():
        print("no PBX root folder: run .ci/pbx-root.sh first", file=sys.stderr)
        return 2
    written = asyncio.run(record(args.out, set(args.only or ())))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
