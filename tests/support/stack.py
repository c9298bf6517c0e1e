"""The container stack of ``docker/`` run with Podman, for the container tests.

``build_images()`` builds the three images with ``scripts/containers build``;
``Stack`` is one compose project (``docker/compose.yaml``) with its own secret files,
free ports and project name, so that it collides with nothing else on the machine;
``StackPbx`` is the containerised Asterisk seen from the host: SIPp phones from the PBX
root folder (``tests/support/pbx``) call it, and its CLI is ``podman exec``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .pbx.asterisk import REPO, Pbx
from .pbx.ports import free_port, free_sip_port, free_udp_ports
from .pbx.processes import PbxError

__all__ = ["COMPOSE_FILE", "IMAGES", "SERVICES", "Stack", "StackError", "StackPbx", "build_images",
           "podman", "sweep_stale", "podman_compose", "tools_missing"]

COMPOSE_FILE = REPO / "docker" / "compose.yaml"
CONTAINERS_CONF = REPO / "docker" / "podman" / "containers.conf"
SERVICES = ("postgres", "gateway", "asterisk")
IMAGES = tuple(f"agi-gateway-{s}" for s in SERVICES)


class StackError(Exception):
    """A podman or compose command that failed; the message holds its output."""


def podman_compose() -> str | None:
    """The podman-compose of this environment (.venv), else the one on PATH."""
    here = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "podman-compose"
    if here.exists():
        return str(here)
    return shutil.which("podman-compose")


def tools_missing() -> list[str]:
    """What of podman, runc and podman-compose this machine lacks."""
    missing = [t for t in ("podman", "runc") if shutil.which(t) is None]
    if podman_compose() is None:
        missing.append("podman-compose")
    return missing


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
         check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise StackError(f"{' '.join(cmd)} timed out after {timeout}s:\n"
                         f"{e.stdout or ''}{e.stderr or ''}") from e
    if check and res.returncode != 0:
        raise StackError(f"{' '.join(cmd)} exited {res.returncode}:\n"
                         f"{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return res


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """One podman command with this repository's containers.conf (runc, low limits)."""
    return _run(["podman", *args], timeout=timeout, check=check)


def build_images(*, clean: bool, timeout: float = 900) -> float:
    """``scripts/containers build [--clean]``; returns the seconds it took."""
    started = time.monotonic()
    _run([str(REPO / "scripts" / "containers"), "build", *(["--clean"] if clean else [])],
         timeout=timeout)
    return time.monotonic() - started


OWNER_LABEL = "agi-gateway.test-pid"


def sweep_stale() -> list[str]:
    """Remove the stacks (containers and volumes) of test processes that died without
    taking theirs down (their restart policy would keep them up for good); returns the
    projects removed."""
    out = podman("ps", "-a", "--filter", f"label={OWNER_LABEL}", "--format",
                 f'{{{{index .Labels "io.podman.compose.project"}}}} '
                 f'{{{{index .Labels "{OWNER_LABEL}"}}}}',
                 check=False).stdout
    stale = {project for project, pid in (line.split() for line in out.splitlines()
                                          if len(line.split()) == 2)
             if not Path(f"/proc/{pid}").exists()}
    for project in sorted(stale):
        label = f"label=io.podman.compose.project={project}"
        ids = podman("ps", "-aq", "--filter", label, check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "2", *ids, check=False)
        volumes = podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
        if volumes:
            podman("volume", "rm", "-f", *volumes, check=False)
    return sorted(stale)


class Stack:
    """One compose project of ``docker/compose.yaml`` in its own folder ``work``: the
    secret files, the phones' pjsip.conf and an override file; ports picked free."""

    def __init__(self, work: Path, *, pjsip_conf: str, gateway_env: dict[str, str]) -> None:
        self.work = work
        self.project = "gwstack" + secrets.token_hex(3)
        self.ports = {name: free_port("tcp") for name in ("db", "agi", "http", "ami")}
        self.secrets_dir = work / "secrets"
        self.secrets_dir.mkdir(mode=0o700, parents=True)
        self.db_password = secrets.token_hex(12)
        values = {
            "db_password": self.db_password,
            "database_url": self.database_url,
            "ami_secret": secrets.token_hex(12),
            "admin_token": "adm-" + secrets.token_hex(12),
            "read_token": "read-" + secrets.token_hex(12),
        }
        for name, value in values.items():
            path = self.secrets_dir / name
            path.write_text(value + "\n")
            path.chmod(0o644)  # the containers' users (gateway, postgres) read them
        (work / "pjsip.conf").write_text(pjsip_conf)
        # every container says which test process started it (sweep_stale())
        owner = {"labels": {OWNER_LABEL: str(os.getpid())}}
        override = {"services": {"gateway": {"environment": gateway_env, **owner},
                                 "postgres": owner, "asterisk": owner}}
        (work / "override.yaml").write_text(json.dumps(override))  # JSON is YAML
        self.env = _env({
            "STACK_DB_PORT": str(self.ports["db"]),
            "STACK_AGI_PORT": str(self.ports["agi"]),
            "STACK_HTTP_PORT": str(self.ports["http"]),
            "STACK_AMI_PORT": str(self.ports["ami"]),
            # above the harness's SIP ports (tests/support/pbx/ports.py), as its PBXs do
            "STACK_RTP_START": "20000",
            "STACK_RTP_END": "30000",
            "STACK_SECRETS": str(self.secrets_dir),
            "STACK_PJSIP_CONF": str(work / "pjsip.conf"),
        })

    @property
    def database_url(self) -> str:
        return f"postgresql://gateway:{self.db_password}@127.0.0.1:{self.ports['db']}/gateway"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def secret(self, name: str) -> str:
        """A secret as the containers read it: from its file."""
        return (self.secrets_dir / name).read_text().strip()

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    # -- compose ------------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        cmd = [podman_compose() or "podman-compose", "-p", self.project,
               "-f", str(COMPOSE_FILE), "-f", str(self.work / "override.yaml"), *args]
        return _run(cmd, env=self.env, timeout=timeout)

    def up(self) -> None:
        self.compose("up", "-d")

    def down(self, *, volumes: bool = False) -> None:
        self.compose("down", *(["--volumes"] if volumes else []))

    def containers(self) -> dict[str, str]:
        """This project's containers: name -> state."""
        out = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                     "--format", "{{.Names}} {{.State}}").stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())

    def volumes(self) -> list[str]:
        out = podman("volume", "ls", "--filter",
                     f"label=io.podman.compose.project={self.project}",
                     "--format", "{{.Name}}").stdout
        return out.split()

    def logs(self, service: str, tail: int = 40) -> str:
        res = podman("logs", "--tail", str(tail), self.container(service), check=False)
        return res.stdout + res.stderr

    def all_logs(self) -> str:
        return "\n".join(f"== {s}\n{self.logs(s)}" for s in SERVICES)

    def healthcheck(self, service: str) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK run now (podman runs them on a timer only with systemd)."""
        return podman("healthcheck", "run", self.container(service), check=False)

    def readyz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.http + "/readyz", timeout=3) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (OSError, ValueError) as e:
            return 0, {"error": str(e)}

    async def wait_ready(self, within: float = 120) -> dict:
        """Wait until /readyz says ready (database, AMI and AGI up); return its body."""
        deadline = time.monotonic() + within
        status, body = 0, {}
        while time.monotonic() < deadline:
            status, body = await asyncio.to_thread(self.readyz)
            if status == 200:
                return body
            await asyncio.sleep(0.5)
        raise StackError(f"/readyz not ready after {within}s: {status} {body}\n"
                         f"{self.all_logs()}")


class StackPbx(Pbx):
    """The stack's Asterisk, seen from the host: SIPp phones (run from the PBX root
    folder, as for ``Pbx``) on ports of their own, and the CLI through ``podman exec``.
    ``pjsip_conf()`` is the phones and trunks the container is started with."""

    def __init__(self, root: Path, **kw) -> None:
        super().__init__(root=root, pjsip_global={"debug": "no"}, **kw)
        self.sip_port = free_sip_port()
        ports = free_udp_ports(len(self.phones) + len(self.trunks), {self.sip_port})
        self.ports = dict(zip((*self.phones, *self.trunks), ports, strict=True))
        name = "gwstack-" + secrets.token_hex(4)
        # SIPp writes its scenario and traces here (inside the root folder)
        self.run_dir = self.root / "run" / name
        self.guest_dir = f"/run/{name}"
        (self.run_dir / "sipp").mkdir(parents=True)
        self.container = ""

    def pjsip_conf(self) -> str:
        return self._pjsip_conf()

    def quiet_port(self, port: int) -> int:
        # each test calls on endpoints whose calls ended cleanly; nothing to drain
        return 0

    def start(self) -> StackPbx:
        raise PbxError("the stack's Asterisk is started by compose")

    def stop(self) -> None:
        self.kill_sipps()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def cli(self, command: str, timeout: float = 10.0) -> str:
        try:
            res = podman("exec", self.container, "asterisk", "-rx", command, timeout=timeout,
                         check=False)
        except StackError as e:
            raise PbxError(str(e)) from e
        out = res.stdout + res.stderr
        if res.returncode != 0 or "Unable to connect to remote asterisk" in out:
            raise PbxError(f"CLI {command!r} failed ({res.returncode}): {out.strip()}")
        return out
