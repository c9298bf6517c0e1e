"""The AMI events the gateway acts on, parsed at the edge into small frozen types.

Asterisk's header case is not stable across events (``DialEnd`` says ``Uniqueid``,
``Cdr`` says ``UniqueID``), and a header may be missing. Parsing here, once, means the
rest of the code reads typed fields and never a raw header dict: headers match whatever
their case, a missing text header is ``None``, a missing or malformed number is 0.
Only the fields the gateway uses are kept.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self


class Headers:
    """Case-insensitive read access to one AMI header block."""

    def __init__(self, headers: Mapping[str, str]):
        self._by_lower = {key.lower(): value for key, value in headers.items()}

    def text(self, name: str) -> str | None:
        """The header's value, or ``None`` when it is missing or empty."""
        return self._by_lower.get(name.lower()) or None

    def epoch(self, name: str) -> float | None:
        """The header as seconds since the epoch (``Timestamp: 1795838217.123456``, sent
        with every event when manager.conf has ``timestampevents = yes``); ``None`` when
        missing or not a finite number."""
        value = (self._by_lower.get(name.lower()) or "").strip()
        try:
            seconds = float(value)
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) and seconds > 0 else None

    def number(self, name: str) -> int:
        """The header as a whole number; 0 when missing or not a number."""
        value = (self._by_lower.get(name.lower()) or "").strip()
        try:
            return int(value)
        except ValueError:
            return 0


class AmiEvent(Protocol):
    NAME: ClassVar[str]

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> Self: ...


@dataclass(frozen=True)
class DialEnd:
    """A Dial attempt ended: ``dial_status`` ANSWER means the callee answered."""

    NAME: ClassVar[str] = "DialEnd"

    uniqueid: str | None  # the caller's channel: the AGI session's agi_uniqueid
    dial_status: str | None
    dest_channel: str | None  # the callee's channel, where the hangup deadline lives
    linkedid: str | None
    # when the PBX sent it, by its clock (``timestampevents = yes``); None without it
    sent_at: float | None = None

    @property
    def answered(self) -> bool:
        return self.dial_status == "ANSWER"

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> DialEnd:
        h = Headers(headers)
        return cls(uniqueid=h.text("Uniqueid"), dial_status=h.text("DialStatus"),
                   dest_channel=h.text("DestChannel"), linkedid=h.text("Linkedid"),
                   sent_at=h.epoch("Timestamp"))


@dataclass(frozen=True)
class Hangup:
    """A channel is gone."""

    NAME: ClassVar[str] = "Hangup"

    uniqueid: str | None
    channel: str | None

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> Hangup:
        h = Headers(headers)
        return cls(uniqueid=h.text("Uniqueid"), channel=h.text("Channel"))


@dataclass(frozen=True)
class Cdr:
    """The PBX's own record of a call, sent once it ended (cdr_manager)."""

    NAME: ClassVar[str] = "Cdr"

    uniqueid: str | None  # the caller's channel
    disposition: str | None  # ANSWERED, NO ANSWER, BUSY, FAILED...
    billable_seconds: int  # whole seconds from answer, truncated

    @property
    def answered(self) -> bool:
        return self.disposition == "ANSWERED"

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> Cdr:
        h = Headers(headers)
        return cls(uniqueid=h.text("UniqueID"), disposition=h.text("Disposition"),
                   billable_seconds=h.number("BillableSeconds"))


@dataclass(frozen=True)
class CoreShowChannel:
    """One live channel, as listed by the ``CoreShowChannels`` action."""

    NAME: ClassVar[str] = "CoreShowChannel"

    uniqueid: str | None
    channel: str | None
    linkedid: str | None  # the same for every channel of one call

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> CoreShowChannel:
        h = Headers(headers)
        return cls(uniqueid=h.text("Uniqueid"), channel=h.text("Channel"),
                   linkedid=h.text("Linkedid"))


# ``STRFTIME(,,%s %z)`` read with ``Getvar`` (no channel): the PBX's clock and its UTC
# offset, the zone ``CoreStatus`` writes its local dates in
PBX_CLOCK_FUNCTION = "STRFTIME(,,%s %z)"
_PBX_CLOCK = re.compile(r"^\s*(\d+)\s+([+-])(\d\d):?(\d\d)\s*$")


@dataclass(frozen=True)
class CoreStatus:
    """The PBX's answer to ``CoreStatus`` (with its clock, read at the same time).

    Asterisk 22 writes ``CoreStartupDate: 2026-11-27`` and ``CoreStartupTime: 23:56:25``
    in the PBX's local time, whole seconds, no zone; ``Getvar`` of
    ``STRFTIME(,,%s %z)`` gives the PBX's epoch and the offset of that local time
    (``1795823785 +0000``). ``started_at`` is the start of the PBX's current run, in UTC
    and by the PBX's clock; ``clock_ahead`` is how far the PBX's clock is ahead of ours
    (whole seconds: the PBX's epoch is truncated)."""

    started_at: dt.datetime | None
    current_calls: int
    clock_ahead: float = 0.0

    @classmethod
    def parse(cls, headers: Mapping[str, str], pbx_clock: str, *,
              read_at: float) -> CoreStatus:
        h = Headers(headers)
        epoch, offset = _parse_pbx_clock(pbx_clock)
        started: dt.datetime | None = None
        date, time = h.text("CoreStartupDate"), h.text("CoreStartupTime")
        if date and time and offset is not None:
            try:
                local = dt.datetime.fromisoformat(f"{date.strip()}T{time.strip()}")
            except ValueError:
                local = None
            if local is not None:
                started = (local - offset).replace(tzinfo=dt.UTC)
        ahead = epoch - read_at if epoch is not None else 0.0
        return cls(started_at=started, current_calls=h.number("CoreCurrentCalls"),
                   clock_ahead=ahead)


def _parse_pbx_clock(value: str) -> tuple[int | None, dt.timedelta | None]:
    match = _PBX_CLOCK.match(value or "")
    if match is None:
        return None, None
    epoch, sign, hours, minutes = match.groups()
    offset = dt.timedelta(hours=int(hours), minutes=int(minutes))
    return int(epoch), -offset if sign == "-" else offset


def uniqueid_epoch(uniqueid: str | None) -> int | None:
    """The PBX's clock when it made the channel: a uniqueid is ``<epoch>.<sequence>``
    (``<systemname>-<epoch>.<sequence>`` with a ``systemname``); None when it is not."""
    if not uniqueid:
        return None
    head = uniqueid.rsplit("-", 1)[-1].split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) >= 9 else None


@dataclass
class LinkLife:
    """One AMI link's life, kept for a while after it ended: when it was made, the last
    time the PBX said anything on it (any message: an event, an answer, a Ping's reply:
    proof the PBX was alive then) and the start of the PBX's run it spoke to, once read
    (``CoreStatus``). Times are this process's wall clock (epoch seconds)."""

    connected_at: float
    last_heard: float
    pbx_started_at: dt.datetime | None = None
    lost_at: float | None = None

    @property
    def last_heard_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.last_heard, dt.UTC)

    @property
    def connected(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.connected_at, dt.UTC)


__all__ = ["PBX_CLOCK_FUNCTION", "AmiEvent", "Cdr", "CoreShowChannel", "CoreStatus",
           "DialEnd", "Hangup", "Headers", "LinkLife", "uniqueid_epoch"]
