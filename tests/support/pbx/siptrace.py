"""SIPp's message trace (``-trace_msg``) parsed into timestamped SIP messages."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

__all__ = ["SipMessage", "parse_message_trace"]


@dataclass
class SipMessage:
    at: float  # wall clock, seconds since the epoch
    direction: str  # "sent" | "received"
    first_line: str
    text: str

    @property
    def is_response(self) -> bool:
        return self.first_line.startswith("SIP/2.0 ")

    @property
    def code(self) -> int | None:
        return int(self.first_line.split()[1]) if self.is_response else None

    @property
    def method(self) -> str:
        """Request method, or the CSeq method of a response."""
        if not self.is_response:
            return self.first_line.split()[0]
        m = re.search(r"^CSeq:\s*\d+\s+(\S+)", self.text, re.M | re.I)
        return m.group(1) if m else ""

    def header(self, name: str) -> str | None:
        m = re.search(rf"^{re.escape(name)}:\s*(.*?)\s*$", self.text, re.M | re.I)
        return m.group(1) if m else None


# SIPp 3.8 writes "----- 2026-11-27T03:47:09.159932Z"; older ones "----- 2024-01-01\t12:00:00.123456".
_SEPARATOR = re.compile(r"^-{20,} (\S+?)(?:[ \t]+(\d{2}:\d{2}:\d{2}(?:\.\d+)?))?[ \t]*$", re.M)
_DIRECTION = re.compile(r"^\S+ message (sent|received)\b.*$", re.M)


def parse_message_trace(text: str) -> list[SipMessage]:
    """Parse a SIPp ``-trace_msg`` file into timestamped messages."""
    out: list[SipMessage] = []
    marks = list(_SEPARATOR.finditer(text))
    for i, mark in enumerate(marks):
        body = text[mark.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        d = _DIRECTION.search(body)
        if not d:
            continue
        msg = body[d.end() :].strip("\r\n")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        if not lines:
            continue
        try:
            stamp = _parse_stamp(mark.group(1), mark.group(2))
        except ValueError:
            continue
        out.append(
            SipMessage(
                at=stamp.timestamp(),
                direction=d.group(1),
                first_line=lines[0],
                text="\n".join(lines),
            )
        )
    return out


def _parse_stamp(first: str, second: str | None) -> _dt.datetime:
    if second:  # local time, "YYYY-MM-DD HH:MM:SS.ffffff"
        return _dt.datetime.strptime(f"{first} {second}", "%Y-%m-%d %H:%M:%S.%f")
    stamp = _dt.datetime.fromisoformat(first.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.astimezone()


