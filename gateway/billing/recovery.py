"""What the call service reads back from the store to recover: the calls still open,
the PBX's own record of a call (its CDR), and which gateway processes are alive.

Typed views, so that ``gateway/calls/`` never sees a database row nor imports the store:
it reconciles with these after a restart, an AMI reconnect, and on a timer.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from ..store.repository import Repository

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


class Recovery:
    """Reads for reconciliation, and this process's heartbeat."""

    def __init__(self, repo: Repository):
        self._repo = repo

    async def open_call_id(self, pbx_uniqueid: str) -> uuid.UUID | None:
        """The id of the open call whose caller channel is ``pbx_uniqueid``, if any."""
        row = await self._repo.find_call_by_uniqueid(pbx_uniqueid)
        if row is None or row["state"] not in OPEN_STATES:
            return None
        return row["id"]  # type: ignore[no-any-return]

    async def open_calls(self) -> list[OpenCall]:
        """Every open call, oldest first."""
        return [OpenCall.from_row(r) for r in await self._repo.open_calls()]

    async def cdr(self, pbx_uniqueid: str) -> CdrRecord | None:
        """The PBX's last record of a channel (an answered one first), if it wrote one."""
        row = await self._repo.find_cdr(pbx_uniqueid)
        if row is None:
            return None
        return CdrRecord(billsec=row["billsec"] or 0, disposition=row["disposition"] or "")

    async def cdr_table_check(self, now: dt.datetime) -> CdrTableCheck:
        """Look for the PBX's records of the last answered calls settled from a minute
        to a week ago (cdr_pgsql writes a call's row at its hangup; a minute covers the
        write). Any one record found is enough: cdr_pgsql is loaded and writing."""
        checked, recorded = await self._repo.cdr_coverage(
            now, settled_before=dt.timedelta(seconds=60),
            settled_after=dt.timedelta(days=7))
        state = "unverified" if checked == 0 else "up" if recorded else "missing"
        return CdrTableCheck(state, checked, recorded)

    async def live_instances(self, within_seconds: float) -> set[str]:
        """Gateway processes that sent a heartbeat within the last ``within_seconds``."""
        return await self._repo.live_instances(within_seconds)

    async def heartbeat(self, instance_id: str) -> None:
        """Tell the other processes sharing the database that ``instance_id`` is alive."""
        await self._repo.heartbeat(instance_id)


__all__ = ["CdrRecord", "CdrTableCheck", "OpenCall", "Recovery"]
