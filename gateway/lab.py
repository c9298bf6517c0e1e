"""The softphone lab: a real Asterisk 22, the gateway and a demo tenant on one machine,
for a person to try the product with a SIP softphone (docs/try-it.md).

    gateway lab [--address A] [--sip-port P] [--http-port P] [--data-dir D]
    gateway lab call-in [NUMBER] [--data-dir D]

``gateway lab`` starts, in the foreground until Ctrl-C (SIGINT) or SIGTERM:

- Asterisk 22 from the PBX root folder the tests use (``.ci/pbx-root.sh`` builds it),
  chrooted, with proc mounted in a private mount namespace that vanishes with it. Its
  configuration is the shipped files: ``dialplan/extensions_gateway.conf``,
  ``dialplan/pjsip.conf.example`` (registering phones, digest auth),
  ``dialplan/manager.conf.example`` and ``dialplan/cdr_manager.conf.example``, each
  with only its addresses, ports and secrets replaced, plus the lab's own additions:
  a simulated carrier (the ``lab-pstn`` context, reached over a second SIP transport of
  the same Asterisk) and two more phones;
- the gateway in this process, with the embedded PostgreSQL in ``DATA_DIR/pgdata``
  (a new database at every start);
- the example tenant (``examples/provision.toml``) and the lab's prepaid tenant
  (``examples/lab.toml``), provisioned and topped up.

It prints the softphone settings and the operator page's address, then the gateway's
log. ``gateway lab call-in`` makes the simulated carrier call a number of the running
lab (by default the example tenant's toll-free number, which rings the front desk).

Stopping hangs up every call, stops the gateway (and with it the embedded database)
and Asterisk, and removes Asterisk's run folder: nothing stays running or mounted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIALPLAN_DIR = REPO / "dialplan"
EXAMPLES_DIR = REPO / "examples"
DEFAULT_PBX_ROOT = "/var/cache/agi-gateway/pbx-root"
PBX_NAME = "lab"

#: The example tenant's toll-free number: ``call-in`` rings the front desk with it.
TOLL_FREE = "18885550142"
#: Opening balances (CAD) the lab tops up.
TOPUPS = {"maple-dental": Decimal("20.00"), "lab-prepaid": Decimal("0.05")}

#: The phones the lab prints, in order: endpoint -> what it shows. The first four are
#: the example pjsip.conf's (the example tenant's users); the last two the lab's own.
PHONES: dict[str, str] = {
    "maple-front": "Front desk, maple-dental: Calling Plan (domestic pool); "
                   "international from the wallet; rings for the toll-free number",
    "maple-sophie": "Dr Sophie Tremblay, maple-dental: Calling Plan + International "
                    "Calling Plan (600 international minutes)",
    "maple-marc": "Marc Gagnon, maple-dental: Calling Plan",
    "maple-lab": "Lab, maple-dental: no licence (calls inside the clinic only)",
    "lab-prepaid": "Till, lab-prepaid: Calling Plan, wallet of 0.05 CAD without "
                   "auto-recharge (international calls from the wallet)",
    "lab-guest": "Guest: registers, but no tenant knows this phone",
}

#: What to dial (from which phone) -> what the caller hears. docs/try-it.md says the same.
DIAL: list[tuple[str, str, str]] = [
    ("maple-front", "4165550100", "domestic: answered, plays audio (pool)"),
    ("maple-sophie", "+442079460100", "international: answered (add-on minutes)"),
    ("maple-front", "+442079460100", "international from the wallet (0.045 CAD/min)"),
    ("lab-prepaid", "+442079460100", "cut at the funded end: 60 s, then NO_BALANCE"),
    ("any licensed", "4165550480", "the carrier rings, never answers"),
    ("any licensed", "4165550486", "the carrier is busy (486)"),
    ("any licensed", "4165550404", "the carrier rejects: unallocated number (404)"),
    ("any licensed", "4165550503", "the carrier is congested (503)"),
    ("maple-lab", "4165550100", "NO_LICENSE (603)"),
    ("lab-guest", "4165550100", "UNKNOWN_CALLER (403)"),
    ("maple-front", "19005550100", "BLOCKED_DESTINATION, premium rate (403)"),
    ("maple-sophie", "+4930901820", "NO_RATE, Germany has no rate (404)"),
    ("maple-front", "12", "INVALID_NUMBER (484)"),
    ("lab-prepaid", "+442079460100", "NO_BALANCE once the wallet is spent (480)"),
    ("any", "200", "internal: the front desk's extension rings (not rated)"),
    ("any", "911", "emergency: goes out without the gateway"),
]

#: Modules not to load: absent hardware/back-ends (they log errors or hang on start),
#: things that bind extra ports, and modules that would read the root's samples.
NOLOAD = (
    "chan_iax2.so", "chan_dahdi.so", "chan_console.so", "chan_unistim.so", "chan_motif.so",
    "chan_mobile.so", "chan_ooh323.so", "res_xmpp.so", "res_odbc.so",
    "res_odbc_transaction.so", "res_config_odbc.so", "cdr_odbc.so", "cdr_adaptive_odbc.so",
    "cel_odbc.so", "func_odbc.so", "app_voicemail_odbc.so", "app_voicemail_imap.so",
    "res_config_mysql.so", "app_mysql.so", "cdr_mysql.so", "res_config_ldap.so",
    "cdr_radius.so", "cel_radius.so", "cdr_tds.so", "cel_tds.so", "res_corosync.so",
    "pbx_lua.so", "pbx_ael.so", "pbx_dundi.so", "res_hep.so", "res_hep_pjsip.so",
    "res_hep_rtcp.so", "res_snmp.so", "res_calendar.so", "res_calendar_caldav.so",
    "res_calendar_ews.so", "res_calendar_exchange.so", "res_calendar_icalendar.so",
    "res_stun_monitor.so", "res_phoneprov.so", "res_pjsip_phoneprov_provider.so",
    "res_statsd.so", "res_prometheus.so", "cdr_pgsql.so", "cel_pgsql.so",
    "res_config_pgsql.so", "cdr_csv.so", "cdr_custom.so", "cel_custom.so",
    "cdr_sqlite3_custom.so", "cel_sqlite3_custom.so", "cdr_beanstalkd.so",
    "cel_beanstalkd.so", "res_pjsip_notify.so", "res_parking.so", "app_agent_pool.so",
    "app_confbridge.so", "app_page.so", "cel_manager.so", "app_alarmreceiver.so",
    "app_festival.so", "app_amd.so", "app_followme.so", "app_queue.so", "app_voicemail.so",
    "app_minivm.so", "res_clialiases.so", "res_http_media_cache.so", "app_adsiprog.so",
    "app_getcpeid.so", "res_adsi.so",
)

#: The simulated carrier, by the last four digits of the number it is sent (every
#: other number rings a second, answers and plays audio until the caller hangs up).
PSTN_DIALPLAN = """
[lab-pstn]
; The simulated carrier: calls the PBX sends to its "carrier" trunk arrive here.
exten => _X.,1,NoOp(simulated carrier: call to ${EXTEN})
 same => n,GotoIf($["${EXTEN:-4}" = "0480"]?noanswer)
 same => n,GotoIf($["${EXTEN:-4}" = "0486"]?busy)
 same => n,GotoIf($["${EXTEN:-4}" = "0404"]?unallocated)
 same => n,GotoIf($["${EXTEN:-4}" = "0503"]?congested)
 same => n,Ringing()
 same => n,Wait(1)
 same => n,Answer()
 same => n,Goto(lab-pstn-talk,s,1)
 same => n(noanswer),Ringing()
 same => n,Wait(600)
 same => n,Hangup(19)
 same => n(busy),Hangup(17)
 same => n(unallocated),Hangup(1)
 same => n(congested),Hangup(34)

[lab-pstn-out]
; "gateway lab call-in": the simulated carrier places a call to the PBX.
exten => _X.,1,Set(CALLERID(all)="PSTN caller" <15145550199>)
 same => n,Dial(PJSIP/${EXTEN}@pstn,120)
 same => n,Hangup()

[lab-pstn-talk]
; What the far end says, over and over, until someone hangs up.
exten => s,1,Answer()
 same => n(again),Playback(hello-world)
 same => n,Playback(tt-monkeys)
 same => n,Goto(again)
"""


class LabError(RuntimeError):
    """The lab cannot start (or reach the running lab); the message says why."""


# ---- settings --------------------------------------------------------------------------------


@dataclass
class LabSettings:
    address: str = "127.0.0.1"
    sip_port: int = 5060
    http_port: int = 8080
    data_dir: Path = Path("var/lab")
    pbx_root: Path = Path(DEFAULT_PBX_ROOT)
    # chosen at start: free ports on loopback for what only the lab itself uses
    pstn_port: int = 0
    agi_port: int = 0
    ami_port: int = 0
    ami_secret: str = field(default="", repr=False)
    passwords: dict[str, str] = field(default_factory=dict, repr=False)


def free_port(kind: str, host: str = "127.0.0.1") -> int:
    sock = socket.socket(socket.AF_INET,
                         socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    with sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def phone_passwords(data_dir: Path) -> dict[str, str]:
    """The phones' passwords: made once and kept in DATA_DIR/phones.json, so a
    softphone set up once keeps working across lab runs."""
    path = data_dir / "phones.json"
    known: dict[str, str] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            known = {k: v for k, v in json.loads(path.read_text()).items()
                     if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9]{8,64}", v)}
    passwords = {name: known.get(name) or secrets.token_hex(6) for name in PHONES}
    if passwords != known:
        path.write_text(json.dumps(passwords, indent=1) + "\n")
        path.chmod(0o600)
    return passwords


# ---- Asterisk configuration: the shipped files, their placeholders replaced ------------------


def _replace(text: str, old: str, new: str, what: str) -> str:
    if old not in text:
        raise LabError(f"{what}: expected {old!r} in the shipped file; the lab cannot "
                       f"set its address there")
    return text.replace(old, new)


def pjsip_conf(example: str, s: LabSettings) -> str:
    """``dialplan/pjsip.conf.example`` with the lab's address, ports and passwords, and
    the carrier trunk pointed at the simulated carrier."""
    text = _replace(example, "bind=0.0.0.0:5060", f"bind={s.address}:{s.sip_port}",
                    "pjsip.conf.example [transport-udp]")
    text = _replace(text, "media_address=127.0.0.1", f"media_address={s.address}",
                    "pjsip.conf.example [endpoint-common]")
    pstn = f"{s.address}:{s.pstn_port}"
    text = _replace(text, "contact=sip:203.0.113.10:5060", f"contact=sip:{pstn}",
                    "pjsip.conf.example [carrier]")
    text = _replace(text, "match=203.0.113.10", f"match={pstn}",
                    "pjsip.conf.example [carrier-identify]")
    # each phone's auth section gets its password
    out, section, replaced = [], "", set()
    for line in text.splitlines():
        if m := re.match(r"^\[([^\]]+)\]", line):
            section = m.group(1)
        if line.startswith("password=") and section in s.passwords:
            line = f"password={s.passwords[section]}"
            replaced.add(section)
        out.append(line)
    missing = [p for p in PHONES if p not in LAB_PHONES and p not in replaced]
    if missing:
        raise LabError(f"pjsip.conf.example has no auth section for {', '.join(missing)}")
    return "\n".join(out) + "\n\n#include pjsip_lab.conf\n"


#: Phones the lab adds to the example's: the prepaid tenant's and an unprovisioned one.
LAB_PHONES = ("lab-prepaid", "lab-guest")


def pjsip_lab_conf(s: LabSettings) -> str:
    """The lab's additions: its two extra phones (on the example's ``phone`` template)
    and the simulated carrier, a second transport of the same Asterisk whose endpoint
    ``pstn`` sends calls to the PBX's port (arriving on the example's ``carrier``
    trunk) and takes the calls the PBX sends to the carrier (context ``lab-pstn``)."""
    parts = []
    for name in LAB_PHONES:
        parts.append(f"[{name}](phone)\nauth={name}\naors={name}\n\n"
                     f"[{name}]\ntype=auth\nauth_type=userpass\nusername={name}\n"
                     f"password={s.passwords[name]}\n\n"
                     f"[{name}]\ntype=aor\nmax_contacts=1\nremove_existing=yes\n")
    parts.append(f"""; --- the simulated carrier ---
[transport-pstn]
type=transport
protocol=udp
bind={s.address}:{s.pstn_port}

[pstn](endpoint-common)
context=lab-pstn
transport=transport-pstn
aors=pstn

[pstn]
type=aor
contact=sip:{s.address}:{s.sip_port}

[pstn-identify]
type=identify
endpoint=pstn
match={s.address}:{s.sip_port}
""")
    return "\n".join(parts)


def manager_conf(example: str, s: LabSettings) -> str:
    text = _replace(example, "port = 5038", f"port = {s.ami_port}", "manager.conf.example")
    return _replace(text, "secret = change-me-to-a-long-random-secret",
                    f"secret = {s.ami_secret}", "manager.conf.example")


def extensions_conf(s: LabSettings) -> str:
    return f"""[general]
static = yes
writeprotect = yes

[globals]
GW_AGI=127.0.0.1:{s.agi_port}
GW_PBX={PBX_NAME}
GW_FAIL_POLICY=closed
GW_INBOUND_FAIL_POLICY=closed
GW_PSTN_TRUNK=carrier
GW_PARTNER_TRUNK=partner
GW_EMERGENCY_TRUNK=emergency
GW_EMERGENCY_NUMBERS=911,933,112,999

#include extensions_gateway.conf
{PSTN_DIALPLAN}"""


# ---- Asterisk, chrooted into the PBX root ----------------------------------------------------


def asterisk_conf(guest_dir: str, module_dir: str) -> str:
    """asterisk.conf of an Asterisk chrooted into the PBX root: its folders under
    ``guest_dir`` (a path inside the root), its modules in ``module_dir``."""
    g = guest_dir
    return f"""[directories]
astcachedir => {g}/lib/cache
astetcdir => {g}/etc
astmoddir => {module_dir}
astvarlibdir => {g}/lib
astdbdir => {g}/db
astkeydir => {g}/lib
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => {g}/spool
astrundir => {g}/run
astlogdir => {g}/log
astsbindir => /usr/sbin

[options]
runuser = root
rungroup = root
verbose = 3
nocolor = yes
hideconnect = yes
"""


def modules_conf(noload: Iterable[str] = NOLOAD) -> str:
    """modules.conf: every module loads but those of ``noload``."""
    return "[modules]\nautoload = yes\n" + "".join(f"noload => {m}\n" for m in noload)


# the full log with millisecond stamps (tests read timings from it)
LOGGER_CONF = ("[general]\ndateformat = %F %T.%3q\n\n"
               "[logfiles]\nfull => notice,warning,error,verbose\n")

# A private mount namespace: proc is mounted for Asterisk only and vanishes with it, so a
# crash or a kill -9 leaves no mount behind. The shell also watches a pipe from the
# starting process (the Popen's stdin): if that process dies without stopping Asterisk,
# the pipe closes and the shell takes Asterisk down with it.
_IN_ROOT = (
    'mount -t proc proc "$1/proc" || exit 1\n'
    "exec 3<&0\n"
    'chroot "$1" asterisk -C "$2" -f </dev/null &\n'
    "pid=$!\n"
    '( while read -r _; do :; done; kill -KILL "$pid" 2>/dev/null ) <&3 &\n'
    "exec 3<&-\n"
    'wait "$pid"\n'
)


def sweep_stale_runs(run_root: Path, pattern: str, min_age: float) -> None:
    """Remove the run folders under ``run_root`` named like ``pattern`` whose Asterisk
    (``run/asterisk.pid``) is gone and that are older than ``min_age`` seconds (so that
    one just starting in another process is left alone)."""
    now = time.time()
    for folder in run_root.glob(pattern):
        with contextlib.suppress(OSError, ValueError):
            if now - folder.stat().st_mtime < min_age:
                continue
            pid_file = folder / "run" / "asterisk.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().strip() or 0)
                if pid > 0 and Path(f"/proc/{pid}").exists():
                    continue
            shutil.rmtree(folder, ignore_errors=True)


def asterisk_command(root: Path, conf: str) -> list[str]:
    """The command that runs Asterisk in the foreground, chrooted into ``root`` with the
    configuration ``conf`` (a path inside the root); start it with ``stdin=PIPE``."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_ROOT, "sh",
            str(root), conf]


def root_ready(root: Path) -> bool:
    return all((root / p).exists() for p in ("usr/sbin/asterisk", "usr/sbin/chroot"))


class Asterisk:
    """One Asterisk of the lab, run from the PBX root folder with ``chroot`` in a
    private mount namespace (proc is mounted there only, and vanishes with it). If
    this process dies without ``stop()``, a watchdog kills Asterisk when the pipe from
    this process closes."""

    def __init__(self, settings: LabSettings):
        self.s = settings
        self.root = settings.pbx_root
        self.name = "lab-" + secrets.token_hex(4)
        self.run_dir = self.root / "run" / self.name
        self.guest_dir = f"/run/{self.name}"
        self.proc: subprocess.Popen | None = None
        self._out = None

    @property
    def conf(self) -> str:
        return f"{self.guest_dir}/etc/asterisk.conf"

    def sweep_stale_runs(self, min_age: float = 60.0) -> None:
        """Remove the run folders of labs killed with ``kill -9`` (their Asterisk died
        with them, by the watchdog, but nobody removed the folder)."""
        sweep_stale_runs(self.root / "run", "lab-*", min_age)

    def write_config(self) -> None:
        s, g, etc = self.s, self.guest_dir, self.run_dir / "etc"
        for sub in ("etc", "lib", "db", "spool", "run", "log"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        mod_dirs = sorted(self.root.glob("usr/lib/*/asterisk/modules"))
        if not mod_dirs:
            raise LabError(f"no Asterisk modules under {self.root}/usr/lib")
        files = {
            "asterisk.conf": asterisk_conf(g, f"/{mod_dirs[0].relative_to(self.root)}"),
            "modules.conf": modules_conf(),
            "logger.conf": LOGGER_CONF,
            "extensions.conf": extensions_conf(s),
            "pjsip.conf": pjsip_conf((DIALPLAN_DIR / "pjsip.conf.example").read_text(), s),
            "pjsip_lab.conf": pjsip_lab_conf(s),
            "manager.conf": manager_conf(
                (DIALPLAN_DIR / "manager.conf.example").read_text(), s),
            "cdr_manager.conf": (DIALPLAN_DIR / "cdr_manager.conf.example").read_text(),
            "cdr.conf": "[general]\nenable = yes\n",
            "rtp.conf": "[general]\nrtpstart = 20000\nrtpend = 30000\n",
        }
        for empty in ("http.conf", "ari.conf", "acl.conf", "udptl.conf", "features.conf"):
            files[empty] = ""
        shutil.copy(DIALPLAN_DIR / "extensions_gateway.conf", etc / "extensions_gateway.conf")
        for name, text in files.items():
            (etc / name).write_text(text)
        (etc / "manager.conf").chmod(0o600)

    def start(self, boot_timeout: float = 60.0) -> None:
        self.sweep_stale_runs()
        self.write_config()
        self._out = open(self.run_dir / "log" / "console.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            asterisk_command(self.root, self.conf),
            stdin=subprocess.PIPE, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + boot_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"Asterisk exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
            with contextlib.suppress(LabError):
                if "fully booted" in self.cli("core waitfullybooted", 5).lower():
                    return
            time.sleep(0.2)
        raise LabError(f"Asterisk did not boot in {boot_timeout:.0f} s:\n{self.log_tail()}")

    def cli(self, command: str, timeout: float = 10.0) -> str:
        return cli(self.root, self.conf, command, timeout)

    def hang_up_all(self, seconds: float = 5.0) -> None:
        """Hang up every call and wait (a while) until no channel is left."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(LabError):
            self.cli("channel request hangup all", seconds)
            while time.monotonic() < deadline:
                if "!" not in self.cli("core show channels concise", seconds):
                    return
                time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("full", "console.out"):
            p = self.run_dir / "log" / name
            if p.exists():
                text += p.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self.hang_up_all()
                with contextlib.suppress(LabError):
                    self.cli("core stop now", 5)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            with contextlib.suppress(OSError):
                proc.stdin.close()  # releases the watchdog
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not group_alive(proc.pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                deadline = time.monotonic() + 5
                while group_alive(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


def cli(root: Path, conf: str, command: str, timeout: float = 10.0) -> str:
    """One Asterisk CLI command (``asterisk -rx``) on the lab's Asterisk."""
    try:
        res = subprocess.run(["chroot", str(root), "asterisk", "-C", conf, "-rx", command],
                             capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"Asterisk CLI {command!r} timed out") from exc
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    if res.returncode != 0 or "Unable to connect to remote asterisk" in out:
        raise LabError(f"Asterisk CLI {command!r} failed: {out.strip()}")
    return out


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# ---- the lab -------------------------------------------------------------------------------


def _state_path(data_dir: Path) -> Path:
    return data_dir / "lab.json"


def _running_lab(data_dir: Path) -> dict | None:
    """The running lab of ``data_dir`` (its state file, when its process is alive)."""
    try:
        state = json.loads(_state_path(data_dir).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def _gateway_config(s: LabSettings):
    from .config import Config

    return Config(data_dir=str(s.data_dir), agi_host="127.0.0.1", agi_port=s.agi_port,
                  http_host=s.address, http_port=s.http_port, ami_host="127.0.0.1",
                  ami_port=s.ami_port, ami_username="gateway", ami_secret=s.ami_secret,
                  pbx_name=PBX_NAME, log_format="console", log_level="info")


def _write_gateway_toml(s: LabSettings) -> Path:
    """The lab gateway's configuration, for operator commands run beside it
    (``gateway --config DATA_DIR/gateway.toml calls maple-dental``)."""
    path = s.data_dir / "gateway.toml"
    path.write_text(
        "# Written by 'gateway lab' for operator commands against the running lab.\n"
        f'data_dir = "{s.data_dir}"\n'
        f'http_host = "{s.address}"\nhttp_port = {s.http_port}\n')
    return path


def settings_text(s: LabSettings, config_path: Path) -> str:
    """What the lab prints once it is ready: softphone settings, numbers, where to look."""
    host = s.address
    server = host if s.sip_port == 5060 else f"{host}:{s.sip_port}"
    web = f"http://{host}:{s.http_port}/"
    width = max(len(p) for p in PHONES)
    lines = [
        "",
        "=== softphone lab ready ===",
        f"SIP server (registrar and proxy): {server}   transport UDP   "
        "codecs G.711 u-law / A-law (PCMU, PCMA)",
        "Phones (user name = authentication name = endpoint; one registration each):",
    ]
    for name, what in PHONES.items():
        lines.append(f"  {name:<{width}}  password {s.passwords[name]}   {what}")
    lines += ["", "Dial (from -> number: what you hear):"]
    for who, number, what in DIAL:
        lines.append(f"  {who:<12} -> {number:<15} {what}")
    lines += [
        "",
        "Inbound toll-free call to the front desk: scripts/lab call-in"
        "   (another number: scripts/lab call-in NUMBER)",
        f"Operator page: {web}    status: {web}status",
        f"Calls: .venv/bin/gateway --config {config_path} calls maple-dental",
        f"Live:  .venv/bin/gateway --config {config_path} live",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def _provision(gw) -> None:
    from .billing.provisioning_file import apply_provision_file, check_provision_file

    for path in (EXAMPLES_DIR / "provision.toml", EXAMPLES_DIR / "lab.toml"):
        data = tomllib.loads(path.read_text())
        check_provision_file(data)
        await apply_provision_file(gw.provisioning, data, lambda _line: None)
    for tenant, amount in TOPUPS.items():
        await gw.provisioning.topup(tenant, amount, "lab opening balance")


async def _wait_ready(gw, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        ok, comps = await gw.readiness()
        if ok:
            return
        if time.monotonic() > deadline:
            raise LabError(f"the gateway is not ready: {comps}")
        await asyncio.sleep(0.2)


async def run(s: LabSettings) -> int:
    from .app import Gateway, StartupError

    if os.geteuid() != 0:
        raise LabError("the lab runs Asterisk with chroot: run it as root")
    if not root_ready(s.pbx_root):
        raise LabError(f"no Asterisk root folder at {s.pbx_root} (scripts/lab builds it "
                       "with .ci/pbx-root.sh)")
    s.data_dir = s.data_dir.resolve()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    other = _running_lab(s.data_dir)
    if other:
        raise LabError(f"a lab is already running on {s.data_dir} (pid {other['pid']})")
    # a new database at every start: the demo's wallets and pools start full
    _stop_leftover_database(s.data_dir / "pgdata")
    shutil.rmtree(s.data_dir / "pgdata", ignore_errors=True)
    s.passwords = phone_passwords(s.data_dir)
    s.pstn_port = s.pstn_port or free_port("udp", s.address)
    s.agi_port = s.agi_port or free_port("tcp")
    s.ami_port = s.ami_port or free_port("tcp")
    s.ami_secret = secrets.token_hex(16)
    _check_free(s)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    pbx = Asterisk(s)
    gw = None
    state = _state_path(s.data_dir)
    try:
        print(f"lab: starting Asterisk from {s.pbx_root}", file=sys.stderr, flush=True)
        await asyncio.to_thread(pbx.start)
        state.write_text(json.dumps({"pid": os.getpid(), "root": str(s.pbx_root),
                                     "conf": pbx.conf, "address": s.address}))
        print("lab: starting the gateway (embedded database in "
              f"{s.data_dir / 'pgdata'})", file=sys.stderr, flush=True)
        gw = Gateway(_gateway_config(s))
        try:
            await gw.start()
        except StartupError as exc:
            raise LabError(f"the gateway cannot start: {exc}") from exc
        await _provision(gw)
        await _wait_ready(gw)
        config_path = _write_gateway_toml(s)
        print(settings_text(s, config_path), flush=True)
        print(f"lab: Asterisk's log: {pbx.run_dir / 'log' / 'full'}", file=sys.stderr,
              flush=True)
        await stopping.wait()
        print("lab: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        if pbx.proc is not None:
            # calls up end first, so that the gateway hears their hangup reports
            await asyncio.to_thread(pbx.hang_up_all)
        if gw is not None:
            await gw.stop()
        await asyncio.to_thread(pbx.stop)
        with contextlib.suppress(OSError):
            state.unlink()
        print("lab: stopped", file=sys.stderr, flush=True)


def _stop_leftover_database(pgdata: Path) -> None:
    """Stop the embedded PostgreSQL a lab killed with ``kill -9`` left running on
    ``pgdata`` (a lab that stopped normally stopped it), before it is deleted."""
    if not (pgdata / "postmaster.pid").exists():
        return
    import pgserver  # the embedded database's own binaries

    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs it so as root
    with contextlib.suppress(Exception):  # noqa: BLE001 - not running: nothing to stop
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)


def _check_free(s: LabSettings) -> None:
    """The ports people point things at must be free: say which one is not."""
    for kind, port, what in (("udp", s.sip_port, "SIP (--sip-port)"),
                             ("tcp", s.http_port, "HTTP (--http-port)")):
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp"
                                 else socket.SOCK_DGRAM)
            with sock:
                sock.bind((s.address, port))
        except OSError as exc:
            raise LabError(f"cannot use {s.address}:{port} for {what}: {exc.strerror}") \
                from exc


def call_in(data_dir: Path, number: str) -> str:
    """The simulated carrier calls ``number`` on the running lab's PBX."""
    if not re.fullmatch(r"\+?[0-9]{3,15}", number):
        raise LabError(f"{number!r} is not a number (digits, optionally a leading +)")
    state = _running_lab(data_dir.resolve())
    if state is None:
        raise LabError(f"no lab is running on {data_dir} (start it with scripts/lab)")
    number = number.lstrip("+")
    cli(Path(state["root"]), state["conf"],
        f"channel originate Local/{number}@lab-pstn-out extension s@lab-pstn-talk")
    return number


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", default="run", choices=("run", "call-in"))
    parser.add_argument("number", nargs="?", default=TOLL_FREE,
                        help=f"call-in: the number the carrier calls (default {TOLL_FREE})")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address for SIP, RTP and the page (default 127.0.0.1)")
    parser.add_argument("--sip-port", type=int, default=5060)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--data-dir", default="var/lab", type=Path)
    parser.add_argument("--pbx-root", type=Path,
                        default=Path(os.environ.get("PBX_ROOT") or DEFAULT_PBX_ROOT))
    args = parser.parse_args(argv)
    try:
        if args.action == "call-in":
            sent = call_in(args.data_dir, args.number)
            print(f"lab: the carrier is calling {sent}")
            return 0
        try:
            socket.inet_aton(args.address)
        except OSError:
            raise LabError(f"--address {args.address!r} is not an IPv4 address") from None
        if args.address == "0.0.0.0":
            raise LabError("--address must be one address of this machine, not 0.0.0.0")
        settings = LabSettings(address=args.address, sip_port=args.sip_port,
                               http_port=args.http_port, data_dir=args.data_dir,
                               pbx_root=args.pbx_root)
        return asyncio.run(run(settings))
    except LabError as exc:
        print(f"gateway lab: {exc}", file=sys.stderr)
        return 1
