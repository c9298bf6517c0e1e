"""A real Asterisk 22 running the shipped gateway dialplan, for tests, without Docker.

Asterisk runs from a Debian sid root folder (built by ``.ci/pbx-root.sh``) with
``chroot``; it shares the host's network and meets the code under test on 127.0.0.1.

``Pbx`` starts one Asterisk with the shipped ``dialplan/extensions_gateway.conf``
and a generated PJSIP/AMI/CDR configuration; every run lives in its own folder
``ROOT/run/gwpbx-<random>`` and on its own free ports, so several instances can
run one after another (or side by side) in one session::

    with Pbx(gw_agi=f"127.0.0.1:{agi_port}") as pbx:
        uas = pbx.uas("carrier", ring_ms=1000)          # the PSTN answers after 1 s
        await uas.started()
        caller = await pbx.call("alice", "15551234567", scenario="until_bye")
        callee = await uas.result()
        caller.final_code, caller.talk, caller.bye_from   # 200, 5.01, "pbx"

Every process is bounded by a timeout and killed by ``stop()`` / on exit; proc
is mounted in a private mount namespace (``unshare -m``) that disappears with
Asterisk, so nothing stays mounted on the host whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Modules not to load (absent hardware and back-ends, extra ports, sample dialplans):
# the product's list, which the softphone lab (gateway/lab.py) runs Asterisk with too.
from gateway.lab import (
    LOGGER_CONF,
    NOLOAD,
    asterisk_command,
    asterisk_conf,
    modules_conf,
    sweep_stale_runs,
)

from .ports import free_port, free_sip_port, free_udp_ports
from .processes import PbxError, group_alive, track, untrack
from .sipp import CallResult, Sipp
from .transactions import OpenRequests, answer_open_requests

__all__ = ["DEFAULT_PBX_ROOT", "DIALPLAN_DIR", "NOLOAD", "REPO", "Pbx", "pbx_root_path",
           "root_ready"]

DEFAULT_PBX_ROOT = "/var/cache/agi-gateway/pbx-root"
REPO = Path(__file__).resolve().parents[3]
DIALPLAN_DIR = REPO / "dialplan"


def pbx_root_path() -> Path:
    """Where the sid root folder lives: ``$PBX_ROOT`` or the documented default."""
    return Path(os.environ.get("PBX_ROOT") or DEFAULT_PBX_ROOT)


def root_ready(root: Path | str | None = None) -> bool:
    """Whether the root folder holds Asterisk, SIPp and chroot."""
    root = Path(root) if root else pbx_root_path()
    return all(
        (root / p).exists() for p in ("usr/sbin/asterisk", "usr/bin/sipp", "usr/sbin/chroot")
    )


class Pbx:
    """One Asterisk 22 running the shipped gateway dialplan.

    Parameters (all keyword-only, all optional):

    root
        the sid root folder (default: ``pbx_root_path()``).
    gw_agi
        ``host:port`` of the FastAGI server (the ``GW_AGI`` global).
    pbx_name
        the PBX's name, the ``GW_PBX`` global (passed with every AGI request and
        written on each CDR as ``CDR(pbx)``); empty: no such global, as on a PBX
        set up before PBX names existed.
    fail_policy, inbound_fail_policy, emergency_numbers
        the ``GW_FAIL_POLICY`` / ``GW_INBOUND_FAIL_POLICY`` /
        ``GW_EMERGENCY_NUMBERS`` globals.
    phones
        PJSIP endpoints in context ``gateway-outbound``; each is identified by
        its own SIPp source port on 127.0.0.1 and reached at that same port.
    trunks
        PJSIP endpoints in context ``gateway-inbound`` (same port scheme);
        ``carrier`` is the PSTN trunk and the source of inbound calls.
    pstn_trunk, partner_trunk, emergency_trunk
        which trunk names the dialplan globals point at.
    globals
        more (or overriding) ``[globals]`` entries.
    extra_config
        ``{file name: text}`` written next to the generated configuration
        (e.g. ``cdr_pgsql.conf``); ``noload``: module names added to
        ``NOLOAD``; ``load``: module names removed from it.
    cdr
        ``[general]`` options of cdr.conf.
    contexts
        ``{endpoint: context}`` to put an endpoint in another context than
        the default (phones: ``gateway-outbound``, trunks: ``gateway-inbound``).
    extra_dialplan
        text appended to the test extensions.conf after the shipped include
        (test-only contexts).
    pjsip_global
        more options of pjsip.conf's ``[global]`` section (e.g.
        ``taskprocessor_overload_trigger``).
    extra_manager
        text appended to manager.conf (e.g. a second account for measurements).
    command_prefix
        a program and its arguments Asterisk runs under (a benchmark's
        ``perf record ... --``); it must pass stdin on and end with Asterisk.

    After ``start()``: ``sip_port``, ``ami_host``/``ami_port``/``ami_user``/
    ``ami_secret``, ``ports`` (endpoint name -> SIPp port), ``run_dir`` (host
    path) and ``guest_dir`` (the same folder seen from inside the root).

    An endpoint keeps its port for the life of the PBX, so each SIPp started on
    it first waits until Asterisk has nothing left to resend to that port
    (``quiet_port()``): the PBX logs every SIP message (pjsip ``debug=yes``) to
    tell which of its requests are still unanswered.
    """

    AMI_USER = "gateway"

    def __init__(
        self,
        *,
        root: Path | str | None = None,
        gw_agi: str = "127.0.0.1:4573",
        pbx_name: str = "",
        fail_policy: str = "closed",
        inbound_fail_policy: str = "closed",
        emergency_numbers: str = "911,933,112,999",
        phones: Iterable[str] = ("alice", "bob", "carol", "dave"),
        trunks: Iterable[str] = ("carrier", "partner", "emergency"),
        pstn_trunk: str = "carrier",
        partner_trunk: str = "partner",
        emergency_trunk: str = "emergency",
        globals: Mapping[str, str] | None = None,
        extra_config: Mapping[str, str] | None = None,
        noload: Iterable[str] = (),
        load: Iterable[str] = (),
        cdr: Mapping[str, str] | None = None,
        contexts: Mapping[str, str] | None = None,
        extra_dialplan: str = "",
        pjsip_global: Mapping[str, str] | None = None,
        boot_timeout: float = 60.0,
        ami_eventfilters: bool = True,
        extra_manager: str = "",
        command_prefix: Iterable[str] = (),
    ) -> None:
        self.root = Path(root) if root else pbx_root_path()
        self.phones = tuple(phones)
        self.trunks = tuple(trunks)
        self.globals: dict[str, str] = {
            "GW_AGI": gw_agi,
            "GW_FAIL_POLICY": fail_policy,
            "GW_INBOUND_FAIL_POLICY": inbound_fail_policy,
            "GW_PSTN_TRUNK": pstn_trunk,
            "GW_PARTNER_TRUNK": partner_trunk,
            "GW_EMERGENCY_TRUNK": emergency_trunk,
            "GW_EMERGENCY_NUMBERS": emergency_numbers,
        }
        if pbx_name:
            self.globals["GW_PBX"] = pbx_name
        self.globals.update(globals or {})
        self.extra_config = dict(extra_config or {})
        self.noload = [m for m in (*NOLOAD, *noload) if m not in set(load)]
        self.cdr = {"enable": "yes"} | dict(cdr or {})
        self.contexts = dict(contexts or {})
        self.extra_dialplan = extra_dialplan
        self.pjsip_global = dict(pjsip_global or {})
        self.boot_timeout = boot_timeout
        self.extra_manager = extra_manager
        # run Asterisk under another program (a benchmark's ``perf record ... --``)
        self.command_prefix = tuple(command_prefix)
        # False: the AMI user without the example's eventfilter lines (every event)
        self.ami_eventfilters = ami_eventfilters

        self.ami_host = "127.0.0.1"
        self.ami_port = 0
        self.ami_user = self.AMI_USER
        self.ami_secret = ""
        self.sip_port = 0
        self.ports: dict[str, int] = {}
        self.run_dir: Path | None = None
        self.guest_dir = ""
        self._proc: subprocess.Popen | None = None
        self._sipps: set[Sipp] = set()
        self._out = None
        self._open_requests: OpenRequests | None = None

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Pbx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Pbx:
        if self._proc is not None:
            raise PbxError("already started")
        if not root_ready(self.root):
            raise PbxError(f"no Asterisk/SIPp root folder at {self.root} (run .ci/pbx-root.sh)")
        if not os.environ.get("PBX_KEEP_RUNS"):
            # test processes that died without stop()
            sweep_stale_runs(self.root / "run", "gwpbx-*", min_age=600.0)
        name = "gwpbx-" + secrets.token_hex(4)
        self.run_dir = self.root / "run" / name
        self.guest_dir = f"/run/{name}"
        for sub in ("etc", "lib", "db", "spool", "run", "log", "sipp"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.ami_secret = secrets.token_hex(12)
        self.ami_port = free_port("tcp")
        self.sip_port = free_sip_port()
        ports = free_udp_ports(len(self.phones) + len(self.trunks), {self.sip_port})
        self.ports = dict(zip((*self.phones, *self.trunks), ports, strict=True))
        self._write_config()
        self._open_requests = OpenRequests(self.run_dir / "log" / "full")
        self._out = open(self.run_dir / "log" / "console.out", "wb")  # noqa: SIM115
        # proc mounted for Asterisk only; if the test run dies without stop()
        # (kill -9, a CI job killed), Asterisk goes down with it (asterisk_command)
        cmd = [*self.command_prefix,
               *asterisk_command(self.root, f"{self.guest_dir}/etc/asterisk.conf")]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        track(self._proc)
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PbxError(f"asterisk exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                out = self.cli(
                    "core waitfullybooted", timeout=max(1.0, deadline - time.monotonic())
                )
                if "fully booted" in out.lower():
                    return
                last = out
            except PbxError as e:
                last = str(e)
            time.sleep(0.2)
        raise PbxError(f"asterisk did not boot in {self.boot_timeout}s: {last}\n{self.log_tail()}")

    def kill_sipps(self) -> None:
        """Kill every SIPp process of this PBX that is still running."""
        for sipp in list(self._sipps):
            sipp.kill()
        self._sipps.clear()

    async def clear(self) -> None:
        """Between two tests: kill every SIPp, hang up every channel, and wait until none
        is left, so that the next test starts on an idle PBX."""
        self.kill_sipps()
        await self.acli("channel request hangup all")
        await asyncio.to_thread(self.wait_no_channels, 10)

    def quiet_port(self, port: int) -> int:
        """Answer what Asterisk still resends to ``port`` (e.g. a BYE to a callee that
        was killed) until nothing is left, so that the SIPp about to bind the port
        hears only its own calls. Returns how many stray requests were answered."""
        if self._open_requests is None:
            return 0
        return answer_open_requests(self._open_requests, port)

    def stop(self) -> None:
        """Hang up everything, stop Asterisk (gracefully, then by force), remove the run folder."""
        self.kill_sipps()
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.cli("core stop now", timeout=5)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            with contextlib.suppress(Exception):
                proc.stdin.close()  # releases the watchdog
            # Whatever is left of the process group (a hung Asterisk, the
            # watchdog): TERM, then KILL.
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if not group_alive(proc.pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                deadline = time.monotonic() + grace
                while group_alive(proc.pid) and time.monotonic() < deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            untrack(proc)
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.run_dir is not None and self.run_dir.exists():
            if os.environ.get("PBX_KEEP_RUNS"):
                return
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- control ------------------------------------------------------------

    def _cli_cmd(self, command: str) -> list[str]:
        return [
            "chroot",
            str(self.root),
            "asterisk",
            "-C",
            f"{self.guest_dir}/etc/asterisk.conf",
            "-rx",
            command,
        ]

    def cli(self, command: str, timeout: float = 10.0) -> str:
        """Run one CLI command on this Asterisk (``asterisk -rx``) and return its output."""
        if not self.guest_dir:
            raise PbxError("not started")
        try:
            res = subprocess.run(
                self._cli_cmd(command),
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise PbxError(f"CLI {command!r} timed out") from e
        out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
        if res.returncode != 0 or "Unable to connect to remote asterisk" in out:
            raise PbxError(f"CLI {command!r} failed ({res.returncode}): {out.strip()}")
        return out

    async def acli(self, command: str, seconds: float = 10.0) -> str:
        """``cli()`` without blocking the event loop."""
        return await asyncio.to_thread(self.cli, command, seconds)

    def set_global(self, name: str, value: str) -> None:
        """Change a dialplan global at run time (``dialplan set global``); ``""`` empties it."""
        self.cli(f"dialplan set global {name} " + (value or '""'))
        self.globals[name] = value

    def get_global(self, name: str) -> str:
        out = self.cli("dialplan show globals")
        m = re.search(rf"^\s*{re.escape(name)}=(.*)$", out, re.M)
        return m.group(1).strip() if m else ""

    def hangup_all(self) -> None:
        """Hang up every channel (between tests)."""
        self.cli("channel request hangup all")

    def channels(self) -> list[str]:
        out = self.cli("core show channels concise")
        return [line.split("!")[0] for line in out.splitlines() if "!" in line]

    def wait_no_channels(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.channels():
                return True
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        """Asterisk's full log of this run (notice, warning, error, verbose)."""
        if self.run_dir is None:
            return ""
        p = self.run_dir / "log" / "full"
        return p.read_text(errors="replace") if p.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text()
        if self.run_dir is not None and (self.run_dir / "log" / "console.out").exists():
            text += (self.run_dir / "log" / "console.out").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- SIPp ---------------------------------------------------------------

    def sipp(self, endpoint: str, scenario: str, **kw) -> Sipp:
        """A SIPp process acting as ``endpoint`` (a phone or trunk name) with ``scenario``."""
        if endpoint not in self.ports:
            raise PbxError(f"unknown endpoint {endpoint!r}; have {sorted(self.ports)}")
        sipp = Sipp(self, endpoint, scenario, **kw)
        self._sipps.add(sipp)
        return sipp

    def uas(
        self,
        endpoint: str,
        *,
        ring_ms: int = 0,
        max_wait: float = 60.0,
        answer: bool = True,
        reject: int | None = None,
        calls: int = 1,
    ) -> Sipp:
        """A callee (trunk or phone) that rings ``ring_ms`` then answers and waits for BYE.

        With ``answer=False`` it rings until the caller cancels; with
        ``reject=486`` (any 4xx-6xx) it refuses the call with that code after
        ringing. Call ``await uas.started()`` before placing the call,
        ``await uas.result()`` after.
        """
        if reject is not None:
            scenario = "uas_reject"
        else:
            scenario = "uas_answer" if answer else "uas_ring"
        return self.sipp(
            endpoint,
            scenario,
            params={
                "RING_MS": max(1, int(ring_ms)),
                "MAX_MS": int(max_wait * 1000),
                "CODE": int(reject or 0),
            },
            timeout=max_wait + ring_ms / 1000 + 15,
            calls=calls,
        )

    async def call(
        self,
        endpoint: str,
        number: str,
        *,
        scenario: str = "hold",
        hold: float = 1.0,
        cancel_after: float = 1.0,
        max_wait: float = 60.0,
        caller_id: str | None = None,
    ) -> CallResult:
        """Place one call from ``endpoint`` to ``number`` and return what the phone saw.

        scenario:
          ``hold``         answered, held ``hold`` seconds, then the phone hangs up
                           (unless the PBX hangs up first);
          ``until_bye``    answered and held until the PBX sends BYE (the phone
                           gives up and hangs up itself after ``max_wait``);
          ``expect_error`` expects a final error response (ACKs it; if the call
                           is answered instead, hangs up at once);
          ``cancel``       cancels ``cancel_after`` seconds after ringing starts.
        """
        names = {
            "hold": "uac_hold",
            "until_bye": "uac_until_bye",
            "expect_error": "uac_expect_error",
            "cancel": "uac_cancel",
        }
        if scenario not in names:
            raise PbxError(f"unknown scenario {scenario!r}")
        hold_ms = int(hold * 1000) if scenario == "hold" else int(max_wait * 1000)
        sipp = self.sipp(
            endpoint,
            names[scenario],
            params={
                "HOLD_MS": max(1, hold_ms),
                "CANCEL_MS": max(1, int(cancel_after * 1000)),
                "MAX_MS": int(max_wait * 1000),
            },
            service=number,
            caller_id=caller_id or endpoint,
            timeout=max_wait + (hold if scenario == "hold" else 0) + 15,
        )
        return await sipp.run()

    # -- configuration --------------------------------------------------------

    def _mod_dir(self) -> str:
        found = sorted(self.root.glob("usr/lib/*/asterisk/modules"))
        if not found:
            raise PbxError(f"no asterisk modules under {self.root}/usr/lib")
        return "/" + str(found[0].relative_to(self.root))

    def _write_config(self) -> None:
        g = self.guest_dir
        etc = self.run_dir / "etc"
        files: dict[str, str] = {}
        files["asterisk.conf"] = asterisk_conf(g, self._mod_dir())
        files["modules.conf"] = modules_conf(self.noload)
        files["logger.conf"] = LOGGER_CONF
        globals_text = "".join(f"{k}={v}\n" for k, v in self.globals.items())
        files["extensions.conf"] = (
            "[general]\nstatic = yes\nwriteprotect = yes\n\n"
            f"[globals]\n{globals_text}\n"
            "#include extensions_gateway.conf\n\n"
            f"{self.extra_dialplan}\n"
        )
        shutil.copy(DIALPLAN_DIR / "extensions_gateway.conf", etc / "extensions_gateway.conf")
        files["pjsip.conf"] = self._pjsip_conf()
        read, write, filters = _manager_perms()
        if not self.ami_eventfilters:
            filters = []
        files["manager.conf"] = f"""[general]
enabled = yes
port = {self.ami_port}
bindaddr = 127.0.0.1
displayconnects = no
timestampevents = yes

[{self.ami_user}]
secret = {self.ami_secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = {read}
write = {write}
""" + "".join(f"{line}\n" for line in filters) + self.extra_manager
        files["cdr.conf"] = "[general]\n" + "".join(f"{k} = {v}\n" for k, v in self.cdr.items())
        files["cdr_manager.conf"] = "[general]\nenabled = yes\n\n[mappings]\nlinkedid => LinkedID\n"
        files["rtp.conf"] = "[general]\nrtpstart = 20000\nrtpend = 30000\n"
        # Empty files for modules that would otherwise read the root's samples.
        for empty in ("http.conf", "ari.conf", "acl.conf", "udptl.conf", "features.conf"):
            files.setdefault(empty, "")
        files.update(self.extra_config)
        for name, text in files.items():
            (etc / name).write_text(text)

    def _pjsip_conf(self) -> str:
        common = (
            "type=endpoint\ndisallow=all\nallow=ulaw\n"
            # native RTP bridging re-INVITEs both legs; SIPp scenarios don't expect that
            "direct_media=no\n"
            # without these, Asterisk resolves a host name for every stream and
            # stalls for seconds with no DNS
            "media_address=127.0.0.1\nbind_rtp_to_media_address=yes\n"
            "rtp_symmetric=yes\n"
        )
        out = [
            "[global]\ntype=global\nendpoint_identifier_order=ip\nuser_agent=gateway-test-pbx\n"
            # every SIP message in the log: quiet_port() reads what is unanswered
            + ("" if "debug" in self.pjsip_global else "debug=yes\n")
            + "".join(f"{k}={v}\n" for k, v in self.pjsip_global.items()),
            f"[transport-udp]\ntype=transport\nprotocol=udp\nbind=127.0.0.1:{self.sip_port}\n",
        ]
        for name, port in self.ports.items():
            context = self.contexts.get(
                name, "gateway-outbound" if name in self.phones else "gateway-inbound"
            )
            out.append(f"[{name}]\n{common}context={context}\naors={name}\n")
            out.append(f"[{name}]\ntype=aor\ncontact=sip:{name}@127.0.0.1:{port}\n")
            out.append(f"[{name}-id]\ntype=identify\nendpoint={name}\nmatch=127.0.0.1:{port}\n")
        return "\n".join(out)


def _manager_perms() -> tuple[str, str, list[str]]:
    """The read/write permissions and the ``eventfilter`` lines of the shipped
    least-privilege AMI user."""
    text = (DIALPLAN_DIR / "manager.conf.example").read_text()
    section = text.split("[gateway]", 1)[1]
    read = re.search(r"^\s*read\s*=\s*(\S+)", section, re.M)
    write = re.search(r"^\s*write\s*=\s*(\S+)", section, re.M)
    if not read or not write:
        raise PbxError("dialplan/manager.conf.example has no read/write for [gateway]")
    filters = re.findall(r"^\s*(eventfilter\b.*?)\s*$", section, re.M)
    return read.group(1), write.group(1), filters


def cdr_pgsql(database_url: str) -> dict[str, Any]:
    """``Pbx`` keywords that make Asterisk write every CDR into the gateway's ``cdr``
    table of ``database_url`` (on the test server, trust auth). The table must exist
    before Asterisk starts: 22.10 aborts with a double free when ``cdr_pgsql`` loads
    without it, so migrate first. cdr_pgsql reads the table's columns when it loads
    and fills each by name, so the ``pbx`` column gets ``CDR(pbx)`` (the dialplan sets
    it from ``GW_PBX``; see ``pbx_name``)."""
    name = database_url.rpartition("/")[2]
    conf = (f"[global]\nhostname=127.0.0.1\nport=5432\ndbname={name}\nuser=postgres\n"
            "password=\ntable=cdr\nencoding=UTF8\n")
    return {"extra_config": {"cdr_pgsql.conf": conf}, "load": ("cdr_pgsql.so",)}
