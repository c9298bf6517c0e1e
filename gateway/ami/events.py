"""The AMI events the gateway acts on, parsed at the edge into small frozen types.

Asterisk's header case is not stable across events (``DialEnd`` says ``Uniqueid``,
``Cdr`` says ``UniqueID``), and a header may be missing. Parsing here, once, means the
rest of the code reads typed fields and never a raw header dict: headers match whatever
their case, a missing text header is ``None``, a missing or malformed number is 0.
Only the fields the gateway uses are kept.
"""

from __future__ import annotations

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

    @property
    def answered(self) -> bool:
        return self.dial_status == "ANSWER"

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> DialEnd:
        h = Headers(headers)
        return cls(uniqueid=h.text("Uniqueid"), dial_status=h.text("DialStatus"),
                   dest_channel=h.text("DestChannel"), linkedid=h.text("Linkedid"))


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


__all__ = ["AmiEvent", "Cdr", "CoreShowChannel", "DialEnd", "Hangup", "Headers"]
