"""A fleet on one machine: several real PBXs and several gateway processes sharing one
PostgreSQL (issue 9).

- ``FleetPbx``: a ``Pbx`` with a name (the ``GW_PBX`` global), a first and a second
  gateway address (``GW_AGI``, ``GW_AGI_BACKUP``), and ``restart()``, which stops its
  Asterisk and starts it again on the same ports and configuration (so the gateways'
  AMI settings stay right, and the uniqueid counter starts again at 0).
- ``FleetGateway``: a gateway process (``tests.faults.process.GatewayProcess``) whose
  PBXs come from a TOML file of ``[[pbx]]`` tables, with its own instance name and
  AGI port; it can be SIGKILLed and started again as the same instance.
- Reads of the lease table and waits on conditions, each bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from gateway.lab import asterisk_command
from tests.faults.process import GatewayProcess

from .pbx import Pbx, free_port
from .pbx.processes import PbxError, group_alive, track, untrack

__all__ = ["GATEWAYS", "LEASE", "PHONES", "SLICE", "FleetGateway", "FleetPbx", "fleet_ports",
           "gateway_toml", "lease_owners", "leases",
           "poll", "seed_leases", "until_value"]

#: the suite's layout: two gateway processes, two PBXs and their phones
GATEWAYS = ("gw-a", "gw-b")
PHONES = {"pbx1": tuple(f"a{i:02d}" for i in range(10)),
          "pbx2": tuple(f"b{i:02d}" for i in range(4))}
SLICE = 10  # seconds of funding per slice; renewed 3 s before each slice ends
LEASE = 3  # lease_seconds: renewed every second, taken over about 4 s after a death


class FleetPbx(Pbx):
    """One named PBX of the fleet."""

    def __init__(self, name: str, *, gw_agi: str, gw_agi_backup: str = "",
                 globals: dict[str, str] | None = None, **kw: Any) -> None:
        merged = {"GW_PBX": name, "GW_AGI_BACKUP": gw_agi_backup, **(globals or {})}
        super().__init__(gw_agi=gw_agi, globals=merged, **kw)
        self.name = name

    def restart(self, *, crash: bool = False) -> None:
        """Stop Asterisk and start it again with the same folder, ports and
        configuration. ``core stop now`` hangs up every channel (hangup handlers run,
        CDRs are written); ``crash=True`` SIGKILLs it instead (nothing is reported)."""
        proc = self._proc
        if proc is None:
            raise PbxError("not started")
        if crash:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(PbxError):
                self.cli("core stop now", timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(OSError):
            proc.stdin.close()  # releases the watchdog
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        untrack(proc)
        self._proc = None
        # A killed Asterisk's threads may still hold its control socket for a moment
        # after its main thread is a zombie; a new one refuses to start while they do.
        deadline = time.monotonic() + 15
        while self._control_answers():
            if time.monotonic() > deadline:
                raise PbxError("the stopped Asterisk still answers on its control socket")
            time.sleep(0.1)
        self._launch()

    def _control_answers(self) -> bool:
        assert self.run_dir is not None
        path = self.run_dir / "run" / "asterisk.ctl"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError:
                return False
        return True

    def _launch(self) -> None:
        """Start Asterisk again in the folder ``start()`` prepared (the same steps)."""
        assert self.run_dir is not None
        if self._out is not None:
            self._out.close()
        self._out = open(self.run_dir / "log" / "console.out", "ab")  # noqa: SIM115
        cmd = asterisk_command(self.root, f"{self.guest_dir}/etc/asterisk.conf")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        track(self._proc)
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise


def gateway_toml(path: Path, *, pbxes: Sequence[FleetPbx], lease_seconds: int,
                 **flat: Any) -> Path:
    """Write a gateway configuration with one ``[[pbx]]`` table per PBX."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a TOML basic string

    lines = [f"lease_seconds = {lease_seconds}"]
    lines += [f"{k} = {value(v)}" for k, v in flat.items()]
    for pbx in pbxes:
        lines += ["", "[[pbx]]", f"name = {value(pbx.name)}",
                  f"ami_host = {value(pbx.ami_host)}", f"ami_port = {pbx.ami_port}",
                  f"ami_username = {value(pbx.ami_user)}",
                  f"ami_secret = {value(pbx.ami_secret)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


class FleetGateway(GatewayProcess):
    """A gateway process serving ``pbxes`` as instance ``name`` on AGI port ``agi_port``."""

    def __init__(self, name: str, *, agi_port: int, pbxes: Sequence[FleetPbx],
                 lease_seconds: int, **config: Any) -> None:
        self.name = name
        self.agi_port = agi_port
        fd, toml = tempfile.mkstemp(prefix=f"gw-fleet-{name}-", suffix=".toml")
        os.close(fd)
        self.toml = gateway_toml(Path(toml), pbxes=pbxes, lease_seconds=lease_seconds)
        super().__init__(config=str(self.toml), instance_name=name, agi_port=agi_port,
                         **config)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def pbx_status(self) -> dict[str, Any]:
        """``/status``'s ``pbxes`` (an empty dict while the process does not answer)."""
        with contextlib.suppress(Exception):
            return (await self.status()).get("pbxes") or {}
        return {}

    async def owns(self, pbx: str) -> bool:
        """Whether this process says it owns ``pbx`` with its AMI link up."""
        entry = (await self.pbx_status()).get(pbx) or {}
        return bool(entry.get("owned")) and (entry.get("ami") or {}).get("state") == "up"

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line of this process whose ``event`` is ``event``."""
        found = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(OSError):
            self.toml.unlink()


def fleet_ports(names: Iterable[str]) -> dict[str, int]:
    """A free AGI port per gateway name, fixed for the session so that the PBXs'
    ``GW_AGI``/``GW_AGI_BACKUP`` can point at a process before it starts."""
    return {name: free_port() for name in names}


async def poll(check: Callable[[], Awaitable[Any]], within: float, what: str,
               every: float = 0.1) -> Any:
    """Call ``check()`` until it returns something true; return that. Fail the test
    after ``within`` seconds, saying ``what`` was awaited and the last value seen."""
    deadline = time.monotonic() + within
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {within} s: {what} (last: {last!r})")
        await asyncio.sleep(every)


async def until_value(pool: asyncpg.Pool, sql: str, expected: Any, within: float,
                      *args: Any) -> None:
    """Wait until the query's single value equals ``expected``."""
    seen: list[Any] = []

    async def check() -> bool:
        seen[:] = [await pool.fetchval(sql, *args)]
        return seen[0] == expected

    try:
        await poll(check, within, sql)
    except AssertionError:
        raise AssertionError(f"not in {within} s: {sql} = {expected!r} "
                             f"(last: {seen[0] if seen else None!r})") from None


async def leases(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    """The lease table by PBX name, with ``live`` (not expired by the database's clock)."""
    rows = await pool.fetch("SELECT pbx, owner, generation, expires_at,"
                            " expires_at > now() AS live FROM pbx_leases")
    return {r["pbx"]: dict(r) for r in rows}


async def lease_owners(pool: asyncpg.Pool) -> dict[str, str]:
    """The PBXs with a live lease -> owner."""
    return {pbx: row["owner"] for pbx, row in (await leases(pool)).items() if row["live"]}


async def seed_leases(pool: asyncpg.Pool, owners: dict[str, str], seconds: float) -> None:
    """Give each PBX's lease to an owner before the processes start, so that who serves
    which PBX is known in advance; a process renews its own at its first beat."""
    for pbx, owner in owners.items():
        await pool.execute(
            "INSERT INTO pbx_leases (pbx, owner, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))"
            " ON CONFLICT (pbx) DO UPDATE SET owner = excluded.owner,"
            " expires_at = excluded.expires_at", pbx, owner, float(seconds))
