"""A PostgreSQL high-availability cluster of the test's own: one etcd member and two
PostgreSQL servers managed by Patroni (a primary and a synchronous streaming replica), on
free loopback ports, in a temporary folder.

Timings are tuned low (``ttl`` 5 s, ``loop_wait`` 1 s, ``retry_timeout`` 2 s) so that a
dead primary's leader key expires and the replica is promoted within seconds. Synchronous
mode is on: a transaction the primary reported committed is on the replica too, so a
promotion never loses a settlement that a caller was told about.

Every process started here (etcd, each Patroni, each postmaster, which Patroni starts in
a session of its own) is registered with ``tests.support.pbx.processes`` so that none
outlives the test run, even when a test fails before ``close()``.

PostgreSQL refuses to run as root: as root, everything runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.faults.postgres import _bindir
from tests.support.pbx import free_port
from tests.support.pbx.processes import track, untrack

__all__ = ["HaCluster", "HaError", "PatroniNode", "tools_missing"]

SCOPE = "gwha"
TTL = 5
LOOP_WAIT = 1
RETRY_TIMEOUT = 2


class HaError(RuntimeError):
    """The cluster could not be started or did not reach the state asked for."""


def tools_missing() -> list[str]:
    """The programs this harness needs that this machine lacks."""
    return [name for name in ("etcd", "patroni") if shutil.which(name) is None]


@dataclass(frozen=True)
class _Group:
    """A process group to kill at exit (``processes.kill_leftovers`` kills ``pid``'s
    group): a postmaster runs in the session Patroni made for it."""

    pid: int


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a postmaster's backends and helpers, each
    of which PostgreSQL puts in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class PatroniNode:
    """One Patroni agent and the PostgreSQL server it manages."""

    def __init__(self, cluster: HaCluster, name: str):
        self.cluster = cluster
        self.name = name
        self.port = free_port()
        self.api_port = free_port()
        self.dir = cluster.dir / name
        self.data = self.dir / "data"
        self.config_path = self.dir / "patroni.yml"
        self.log_path = self.dir / "patroni.log"
        self.proc: subprocess.Popen | None = None
        self._postmaster_group: _Group | None = None
        self._signalled: list[int] = []
        self.killed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict:
        c = self.cluster
        return {
            "scope": SCOPE, "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.api_port}",
                        "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{c.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    # a commit waits for the replica; with the replica gone (or promoted)
                    # Patroni lifts the wait, so one server alone still takes writes
                    "synchronous_mode": True, "synchronous_mode_strict": False,
                    "postgresql": {"use_pg_rewind": False, "parameters": {
                        "max_connections": 60, "wal_level": "replica",
                        "hot_standby": "on", "max_wal_senders": 5,
                        "max_replication_slots": 5, "wal_keep_size": "64MB"}},
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.port}",
                "connect_address": f"127.0.0.1:{self.port}",
                "data_dir": str(self.data), "bin_dir": str(c.bindir),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "postgres", "password": "postgres"},
                },
                "pg_hba": ["local all all trust",
                           "host all all 127.0.0.1/32 trust",
                           "host replication all 127.0.0.1/32 trust"],
                "parameters": {"unix_socket_directories": str(self.dir),
                               "fsync": "off", "full_page_writes": "off",
                               "synchronous_commit": "on"},
                "basebackup": [{"checkpoint": "fast"}],
            },
        }

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed
        self.config_path.write_text(json.dumps(self.config(), indent=1))
        self.cluster.give(self.dir)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [shutil.which("patroni") or "patroni", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **self.cluster.as_user(self.dir))
        track(self.proc)

    # ---- what the node says about itself ----------------------------------------------

    def api(self, path: str) -> tuple[int, dict]:
        """GET Patroni's REST API; (status, body), status 0 when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}",
                                        timeout=2) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            with contextlib.suppress(ValueError):
                return e.code, json.loads(e.read() or b"{}")
            return e.code, {}
        except (OSError, ValueError):
            return 0, {}

    def role(self) -> str | None:
        """``primary``, ``replica`` (or Patroni's other words), None when unreachable."""
        status, body = self.api("/patroni")
        return body.get("role") if status else None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def watch_postmaster(self) -> None:
        """Register the running postmaster's process group for the kill at exit."""
        pid = self.postmaster_pid()
        group = _pgid(pid) if pid and _alive(pid) else None
        if group and (self._postmaster_group is None or self._postmaster_group.pid != group):
            if self._postmaster_group is not None:
                untrack(self._postmaster_group)  # type: ignore[arg-type]
            self._postmaster_group = _Group(group)
            track(self._postmaster_group)  # type: ignore[arg-type]

    # ---- the node dies ----------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL Patroni and its PostgreSQL server at once, as when the host dies."""
        self.killed = True
        self._signal(signal.SIGKILL)  # a stopped (frozen) process too
        deadline = time.monotonic() + 10
        while self._any_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def freeze(self) -> None:
        """SIGSTOP Patroni and its PostgreSQL server: the host hangs (its kernel still
        accepts connections, nothing answers them, not even on the connections already
        open). ``kill`` ends a frozen node."""
        self._signal(signal.SIGSTOP)

    def _signal(self, signo: int) -> None:
        """Signal Patroni's group, the postmaster's, and each of the postmaster's
        children: PostgreSQL puts every backend in a session of its own, out of reach
        of a signal to the postmaster's group. The postmaster is signalled first (a
        stopped or dead postmaster starts no more backends), its children are listed
        before (a dead postmaster's children are no longer its children)."""
        self.watch_postmaster()
        postmaster = self.postmaster_pid()
        children = _children(postmaster) if postmaster and _alive(postmaster) else []
        for group in reversed(self._groups()):  # the postmaster's group, then Patroni's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signo)
        if postmaster:
            children = sorted({*children, *_children(postmaster)})
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signo)
        self._signalled = children

    def _groups(self) -> list[int]:
        groups = []
        if self.proc is not None:
            groups.append(self.proc.pid)
        if self._postmaster_group is not None:
            groups.append(self._postmaster_group.pid)
        return groups

    def _any_alive(self) -> bool:
        pid = self.postmaster_pid()
        if pid is not None and _alive(pid):
            return True
        if any(_alive(child) for child in self._signalled):
            return True
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.kill()
        if self.proc is not None:
            untrack(self.proc)
        if self._postmaster_group is not None:
            untrack(self._postmaster_group)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 30) -> str:
        """The first lines of the log (the bootstrap: initdb's and the server's first
        words, which a long wait pushes out of the tail) and its last ``lines``, without
        Patroni's repeated heartbeat lines."""
        with contextlib.suppress(OSError):
            every = self.log_path.read_text(errors="replace").splitlines()
            said = [line for line in every if not line.endswith(HEARTBEATS)]
            head = said[:20] if len(said) > 20 + lines else []
            return "\n".join([*head, *(["..."] if head else []), *said[-lines:]])
        return ""


# Patroni says these every loop while it waits; they bury what happened before
HEARTBEATS = ("not healthy enough for leader race", "bootstrap in progress",
              "Lock owner: None; I am pg1", "Lock owner: None; I am pg2")


class HaCluster:
    """etcd and two Patroni nodes; ``url`` lists both servers and asks for the one that
    takes writes (``target_session_attrs=read-write``)."""

    def __init__(self) -> None:
        missing = tools_missing()
        if missing:
            raise HaError(f"not installed: {', '.join(missing)} (apt-get install "
                          "etcd-server patroni)")
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-ha-"))
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self._owner = (user.pw_uid, user.pw_gid)
        self.give(self.dir)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd: subprocess.Popen | None = None
        self.nodes = [PatroniNode(self, "pg1"), PatroniNode(self, "pg2")]

    def as_user(self, home: Path) -> dict:
        """Popen keywords: run as the ``postgres`` user when this process is root (no
        ``runuser`` in between: the program is this process's own child)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "PATRONI", "ETCD"))}
        env["HOME"] = str(home)
        # started in ``home``: the checkout may be a folder the server user cannot
        # enter (a 0700 temporary folder), and Patroni's helper processes chdir to the
        # folder they were started in (bootstrap hung on "Permission denied" otherwise)
        if self._owner is None:
            return {"env": env, "cwd": str(home)}
        env.update(USER="postgres", LOGNAME="postgres")
        return {"env": env, "cwd": str(home), "user": self._owner[0],
                "group": self._owner[1], "extra_groups": []}

    def give(self, path: Path) -> None:
        """Hand ``path`` (and what is in it) to the user the servers run as."""
        if self._owner is None:
            return
        for p in [path, *path.rglob("*")]:
            os.chown(p, *self._owner)

    @property
    def url(self) -> str:
        hosts = ",".join(n.address for n in self.nodes)
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    # ---- start ------------------------------------------------------------------------

    def start(self, within: float = 180.0) -> HaCluster:
        """etcd, then the first node (it bootstraps the cluster and becomes the primary),
        then the second (a base backup of the first); returns once the second is the
        primary's synchronous standby, streaming."""
        self._start_etcd()
        first, second = self.nodes
        deadline = time.monotonic() + within
        first.start()
        self._until(lambda: first.api("/primary")[0] == 200, deadline, "first node primary")
        first.watch_postmaster()
        second.start()
        self._until(lambda: self.sync_standby() == second.name, deadline,
                    "second node the synchronous standby")
        second.watch_postmaster()
        return self

    def _start_etcd(self) -> None:
        data = self.dir / "etcd"
        data.mkdir()
        self.give(data)
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        with (self.dir / "etcd.log").open("ab") as log:
            self.etcd = subprocess.Popen(
                [shutil.which("etcd") or "etcd", "--name", "e1",
                 "--data-dir", str(data), "--listen-client-urls", client,
                 "--advertise-client-urls", client, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"e1={peer}",
                 "--initial-cluster-state", "new", "--logger", "zap",
                 "--log-outputs", "stderr", "--unsafe-no-fsync"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **self.as_user(self.dir))
        track(self.etcd)
        self._until(self._etcd_healthy, time.monotonic() + 30, "etcd healthy")

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health",
                                        timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _until(self, predicate, deadline: float, what: str) -> None:
        while not predicate():
            for proc, name in [(self.etcd, "etcd"),
                               *((n.proc, n.name) for n in self.nodes if not n.killed)]:
                if proc is not None and proc.poll() is not None:
                    raise HaError(f"{name} exited with {proc.returncode} waiting for "
                                  f"{what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise HaError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    # ---- state ------------------------------------------------------------------------

    def members(self) -> list[dict]:
        """Patroni's view of the cluster (``/cluster`` of any node that answers)."""
        for node in self.nodes:
            status, body = node.api("/cluster")
            if status == 200:
                return body.get("members", [])
        return []

    def leader(self) -> str | None:
        return next((m["name"] for m in self.members() if m.get("role") == "leader"), None)

    def sync_standby(self) -> str | None:
        return next((m["name"] for m in self.members()
                     if m.get("role") == "sync_standby" and m.get("state") in ("running", "streaming")),
                    None)

    def node(self, name: str) -> PatroniNode:
        return next(n for n in self.nodes if n.name == name)

    def primary(self) -> PatroniNode:
        for node in self.nodes:
            if node.api("/primary")[0] == 200:
                return node
        raise HaError(f"no primary:\n{self.logs()}")

    def wait_primary(self, other_than: str, within: float) -> PatroniNode:
        """The node that is primary once it is not ``other_than`` (after a fail-over)."""
        deadline = time.monotonic() + within
        found: list[PatroniNode] = []

        def promoted() -> bool:
            found[:] = [n for n in self.nodes
                        if n.name != other_than and n.api("/primary")[0] == 200]
            return bool(found)

        self._until(promoted, deadline, f"a primary other than {other_than}")
        found[0].watch_postmaster()
        return found[0]

    def logs(self) -> str:
        parts = []
        for node in self.nodes:
            parts.append(f"--- {node.name} (patroni) ---\n{node.log_tail()}")
        with contextlib.suppress(OSError):
            etcd = (self.dir / "etcd.log").read_text(errors="replace").splitlines()[-10:]
            parts.append("--- etcd ---\n" + "\n".join(etcd))
        return "\n".join(parts)

    # ---- stop -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill everything started here (nothing is kept) and remove the folder."""
        for node in self.nodes:
            node.close()
        if self.etcd is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.etcd.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.etcd.wait(timeout=10)
            untrack(self.etcd)
        shutil.rmtree(self.dir, ignore_errors=True)
