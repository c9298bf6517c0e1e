"""SIP requests Asterisk sent to a port and never saw answered, and a sink that
answers them, so that a SIPp started on an endpoint's port hears only its own calls.

Asterisk retransmits an unanswered request for 32 s (SIP timer B/F): a BYE to a
callee that was killed, or that left before the PBX hung up, keeps arriving at the
callee's port. An endpoint keeps its port for the life of a ``Pbx`` (pjsip.conf
names it), so the next SIPp on that port would take the stray BYE as its first
message, abort ("Aborting call on an unexpected BYE") and leave the next call
unanswered (issue 8 item 16).

``OpenRequests`` reads Asterisk's SIP message log (pjsip ``debug=yes``) and keeps the
requests it sent to each port without a final response from that port;
``answer_open_requests()`` binds the port, answers each retransmission (a final
response ends Asterisk's transaction at once) and returns when none is left.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OpenRequests", "answer_open_requests", "response_to"]

#: 64 x T1: Asterisk gives a request up this long after sending it first.
TIMER_B = 32.0
#: The longest gap between two sends of a non-INVITE request over UDP (T2) ...
NON_INVITE_GAP = 4.0
#: ... and of an INVITE (timer A doubles from T1 without a cap: 0.5, 1, 2, 4, 8, 16 s).
INVITE_GAP = 16.0

_ENTRY = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\] ", re.M)
_SIP_LOG = re.compile(
    r"<--- (Transmitting|Received) SIP (request|response) \(\d+ bytes\) "
    r"(?:to|from) \w+:127\.0\.0\.1:(\d+) --->\n(.*)",
    re.S,
)


@dataclass
class _Request:
    method: str
    first_seen: float  # monotonic; when this reader first saw it (never before it was sent)


class OpenRequests:
    """The requests Asterisk sent to each local port and saw no final response to,
    read from Asterisk's log (the "full" file) as it grows. Thread-safe."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._offset = 0
        self._buffer = ""
        self._open: dict[tuple[int, str, str], _Request] = {}
        self._lock = threading.Lock()

    def to(self, port: int) -> dict[tuple[int, str, str], _Request]:
        """The open requests to ``port`` (key: port, Call-ID, CSeq), the log read up to now."""
        with self._lock:
            self._read()
            now = time.monotonic()
            for key, req in list(self._open.items()):
                if now - req.first_seen > TIMER_B + 1:
                    del self._open[key]  # Asterisk has given it up
            return {k: r for k, r in self._open.items() if k[0] == port}

    def forget(self, key: tuple[int, str, str]) -> None:
        with self._lock:
            self._open.pop(key, None)

    def _read(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        self._buffer += data.decode(errors="replace")
        starts = [m.start() for m in _ENTRY.finditer(self._buffer)]
        if not starts:
            self._buffer = self._buffer[-4096:]  # a fragment of an entry: wait for the rest
            return
        entries = [self._buffer[a:b] for a, b in zip(starts, [*starts[1:], None], strict=True)]
        last = entries[-1]
        # The last entry may still be being written: take it once its headers are in.
        if "<--- " in last and not ("Call-ID:" in last and "CSeq:" in last):
            entries.pop()
            self._buffer = last
        else:
            self._buffer = ""
        for entry in entries:
            self._note(entry)

    def _note(self, entry: str) -> None:
        m = _SIP_LOG.search(entry)
        if m is None:
            return
        direction, kind, port, message = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        headers = _headers(message)
        key = (port, headers.get("call-id", ""), headers.get("cseq", ""))
        first = message.split("\n", 1)[0].strip()
        if direction == "Transmitting" and kind == "request":
            method = first.split(" ", 1)[0]
            if method != "ACK" and key not in self._open:  # an ACK has no transaction
                self._open[key] = _Request(method, time.monotonic())
        elif direction == "Received" and kind == "response":
            parts = first.split(" ")
            if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= 200:
                self._open.pop(key, None)


def _headers(message: str) -> dict[str, str]:
    """The first value of each header (names lower-cased, compact forms expanded)."""
    compact = {"i": "call-id", "v": "via", "f": "from", "t": "to"}
    out: dict[str, str] = {}
    for line in message.replace("\r\n", "\n").split("\n")[1:]:
        if not line.strip():
            break
        name, _, value = line.partition(":")
        name = name.strip().lower()
        out.setdefault(compact.get(name, name), value.strip())
    return out


def response_to(request: bytes) -> bytes | None:
    """The final response that ends Asterisk's transaction for ``request``: 487 for an
    INVITE (nobody will answer that call), 200 for anything else; None for an ACK or
    a response."""
    text = request.decode(errors="replace").replace("\r\n", "\n")
    head = text.split("\n\n", 1)[0].split("\n")
    method = head[0].split(" ", 1)[0]
    if not head[0] or head[0].startswith("SIP/2.0") or method == "ACK":
        return None
    keep = {"via", "v", "from", "f", "to", "t", "call-id", "i", "cseq"}
    lines = ["SIP/2.0 487 Request Terminated" if method == "INVITE" else "SIP/2.0 200 OK"]
    for line in head[1:]:
        name = line.partition(":")[0].strip().lower()
        if name in keep:
            if name in ("to", "t") and ";tag=" not in line:
                line += ";tag=harness-sink"
            lines.append(line)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_open_requests(open_requests: OpenRequests, port: int, within: float = 40.0) -> int:
    """Bind 127.0.0.1:``port`` and answer Asterisk's requests to it until none is open.

    A request still alive is resent within ``NON_INVITE_GAP`` (``INVITE_GAP`` for an
    INVITE) and answered then; one not resent in that time was given up already.
    Returns how many requests were answered. No-op when nothing is open.
    """
    if not open_requests.to(port):
        return 0
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", port))
        bound = time.monotonic()
        while time.monotonic() - bound < within:
            pending = open_requests.to(port)
            held = time.monotonic() - bound
            for key, req in pending.items():
                gap = INVITE_GAP if req.method == "INVITE" else NON_INVITE_GAP
                if held > gap + 0.5:
                    open_requests.forget(key)  # not resent: Asterisk gave it up
            if not open_requests.to(port):
                break
            readable, _, _ = select.select([sink], [], [], 0.1)
            if readable:
                data, peer = sink.recvfrom(65535)
                reply = response_to(data)
                if reply is not None:
                    sink.sendto(reply, peer)
                    answered += 1
    return answered
