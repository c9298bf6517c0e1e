"""What the call service reads back from the store to recover: the calls still open,
the PBX's own record of a call (its CDR), which gateway processes are alive, and which
process owns which PBX (its lease).

Typed views, so that ``gateway/calls/`` never sees a database row nor imports the store:
it reconciles with these after a restart, an AMI reconnect, and on a timer.

Every read of calls and CDRs is scoped by PBX name: a channel's uniqueid is unique on
its own PBX only. The methods that had no PBX before PBX names take it first
(``open_call_id(pbx, uniqueid)``); called the old way, with the uniqueid (or the time)
alone, they read PBX 'default', the name of a single-PBX gateway's PBX.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from ..store.repository import DEFAULT_PBX, Repository

OPEN_STATES = ("authorised", "answered")  # reserved and not yet settled nor released


@dataclass(frozen=True)
class OpenCall:
    """A call authorised and not yet settled nor released."""

    call_id: uuid.UUID
    direction: str
    tenant_id: str
    caller: str
    destination: str
    route: str | None
    sources: tuple[str, ...]  # where its funding comes from; empty = not rated
    funded_seconds: int
    pbx_uniqueid: str | None  # the caller's channel on the PBX
    linkedid: str | None
    owner: str | None  # the gateway process that authorised it
    authorised_at: dt.datetime
    answered_at: dt.datetime | None
    pbx: str = DEFAULT_PBX  # the PBX the call's channel lives on

    @property
    def rated(self) -> bool:
        return bool(self.sources)

    @classmethod
    def from_row(cls, row: Any) -> OpenCall:
        return cls(
            call_id=row["id"], direction=row["direction"], tenant_id=row["tenant_id"],
            caller=row["caller"], destination=row["destination"], route=row["route"],
            sources=tuple(row["sources"] or ()), funded_seconds=row["funded_seconds"],
            pbx_uniqueid=row["pbx_uniqueid"], linkedid=row["linkedid"], owner=row["owner"],
            authorised_at=row["authorised_at"], answered_at=row["answered_at"],
            pbx=row["pbx"],
        )


@dataclass(frozen=True)
class CdrRecord:
    """The PBX's record of a call's caller channel (cdr_pgsql, table ``cdr``)."""

    billsec: int  # whole seconds from answer, truncated
    disposition: str  # ANSWERED, NO ANSWER, BUSY, FAILED...

    @property
    def billable_seconds(self) -> int:
        """What the call is billed for: its talk time if it was answered, else nothing."""
        return self.billsec if self.disposition == "ANSWERED" else 0


@dataclass(frozen=True)
class CdrTableCheck:
    """Is the PBX writing its records into the ``cdr`` table (cdr_pgsql)? Exact recovery
    of calls that end while no gateway listens depends on it (docs/billing.md)."""

    state: str  # up: recent calls have their record; missing: none has; unverified
    checked: int  # recent answered calls looked at
    recorded: int  # of those, with a row in cdr

    def view(self) -> dict[str, Any]:
        reasons = {
            "up": "the PBX writes its records (cdr_pgsql) into table cdr",
            "missing": "none of the last answered calls has a record in table cdr: "
                       "load cdr_pgsql (docs/billing.md, Recovery); calls that end while "
                       "the gateway is down are billed by estimate until then",
            "unverified": "no answered call settled recently to check table cdr against",
        }
        return {"state": self.state, "reason": reasons[self.state],
                "checked_calls": self.checked, "recorded_calls": self.recorded}


@dataclass(frozen=True)
class Lease:
    """Which gateway process owns a PBX, until when (the database's clock)."""

    pbx: str
    owner: str  # the instance name of the process holding (or last holding) it
    generation: int  # +1 at each new tenure: another owner, or a lapsed lease taken again
    expires_at: dt.datetime
    held: bool = True  # False: expired or released (a lease listed by ``leases()``)

    def owned_by(self, owner: str) -> bool:
        """Whether ``owner`` holds this lease (as the database saw it when read)."""
        return self.held and self.owner == owner


def _scoped(pbx: str, uniqueid: str | None) -> tuple[str, str]:
    """(pbx, uniqueid) of a read called as ``(pbx, uniqueid)`` or, the form before PBX
    names, as ``(uniqueid)`` alone: PBX 'default'."""
    return (DEFAULT_PBX, pbx) if uniqueid is None else (pbx, uniqueid)


@dataclass(frozen=True)
class GatewayProcess:
    """A gateway process sharing this database, as its heartbeat and leases show it."""

    name: str  # its instance name (calls.owner, pbx_leases.owner)
    started_at: dt.datetime
    last_seen: dt.datetime
    alive: bool  # heartbeat recent enough; a SIGKILLed process stays listed, not alive
    pbxes: tuple[str, ...]  # the PBXs whose lease it holds now

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "started_at": self.started_at.isoformat(),
                "last_seen": self.last_seen.isoformat(), "alive": self.alive,
                "pbxes": list(self.pbxes)}


class Recovery:
    """Reads for reconciliation, this process's heartbeat, and the PBX leases."""

    def __init__(self, repo: Repository):
        self._repo = repo

    async def open_call_id(self, pbx: str, uniqueid: str | None = None) -> uuid.UUID | None:
        """The id of the open call whose caller channel is ``uniqueid`` on PBX ``pbx``,
        if any."""
        call = await self.open_call(*_scoped(pbx, uniqueid))
        return call.call_id if call is not None else None

    async def open_call(self, pbx: str, uniqueid: str) -> OpenCall | None:
        """The open call whose caller channel is ``uniqueid`` on PBX ``pbx``, if any."""
        row = await self._repo.find_call_by_uniqueid(pbx, uniqueid)
        if row is None or row["state"] not in OPEN_STATES:
            return None
        return OpenCall.from_row(row)

    async def open_calls(self, pbx: str | None = DEFAULT_PBX) -> list[OpenCall]:
        """The open calls of PBX ``pbx`` (None: of every PBX), oldest first."""
        return [OpenCall.from_row(r) for r in await self._repo.open_calls(pbx)]

    async def cdr(self, pbx: str, uniqueid: str | None = None) -> CdrRecord | None:
        """PBX ``pbx``'s last record of channel ``uniqueid`` (an answered one first), if
        it wrote one. Records without a PBX name count as PBX 'default''s."""
        row = await self._repo.find_cdr(*_scoped(pbx, uniqueid))
        if row is None:
            return None
        return CdrRecord(billsec=row["billsec"] or 0, disposition=row["disposition"] or "")

    async def cdr_table_check(self, pbx: str | dt.datetime,
                              now: dt.datetime | None = None) -> CdrTableCheck:
        """Look for PBX ``pbx``'s records of its last answered calls settled from a minute
        to a week ago (cdr_pgsql writes a call's row at its hangup; a minute covers the
        write). Any one record found is enough: cdr_pgsql is loaded and writing.
        ``cdr_table_check(now)`` alone checks PBX 'default'."""
        if isinstance(pbx, dt.datetime):
            pbx, now = DEFAULT_PBX, pbx
        if now is None:
            raise TypeError("cdr_table_check needs the time")
        checked, recorded = await self._repo.cdr_coverage(
            now, settled_before=dt.timedelta(seconds=60),
            settled_after=dt.timedelta(days=7), pbx=pbx)
        state = "unverified" if checked == 0 else "up" if recorded else "missing"
        return CdrTableCheck(state, checked, recorded)

    # ---- PBX leases ------------------------------------------------------------------

    async def lease(self, pbx: str, owner: str, seconds: float) -> Lease:
        """Take or renew ``owner``'s lease of ``pbx`` for ``seconds`` from now (the
        database's clock). The lease as it is afterwards: ``owner`` holds it if
        ``lease.owner == owner``; otherwise it says who does."""
        row = await self._repo.lease(pbx, owner, seconds)
        return Lease(pbx=pbx, owner=row["owner"], generation=row["generation"],
                     expires_at=row["expires_at"])

    async def release_lease(self, pbx: str, owner: str) -> bool:
        """Give up ``owner``'s lease of ``pbx`` (a graceful stop): the next process takes
        it at once. Whether ``owner`` held it."""
        return await self._repo.release_lease(pbx, owner)

    async def leases(self) -> list[Lease]:
        """Every PBX's lease by PBX name, expired and released ones too (``held``)."""
        return [Lease(pbx=r["pbx"], owner=r["owner"], generation=r["generation"],
                      expires_at=r["expires_at"], held=r["held"])
                for r in await self._repo.leases()]

    async def processes(self, alive_within: float) -> list[GatewayProcess]:
        """Every gateway process that ever sent a heartbeat to this database (a graceful
        stop removes its row), whether it is alive (a heartbeat within
        ``alive_within`` seconds), and the PBXs it serves now."""
        return [GatewayProcess(name=r["id"], started_at=r["started_at"],
                               last_seen=r["last_seen"],
                               alive=r["silent_seconds"] <= alive_within,
                               pbxes=tuple(r["pbxes"]))
                for r in await self._repo.instances()]

    async def live_instances(self, within_seconds: float) -> set[str]:
        """Gateway processes that sent a heartbeat within the last ``within_seconds``."""
        return await self._repo.live_instances(within_seconds)

    async def heartbeat(self, instance_id: str) -> None:
        """Tell the other processes sharing the database that ``instance_id`` is alive."""
        await self._repo.heartbeat(instance_id)


__all__ = ["DEFAULT_PBX", "CdrRecord", "CdrTableCheck", "GatewayProcess", "Lease", "OpenCall",
           "Recovery"]
